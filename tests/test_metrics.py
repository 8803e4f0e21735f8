"""Tests of batchrun.metrics: exposition text, escaping, atomic writes, write pacing."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from batchrun.metrics import MetricsWriter, render_metrics, write_metrics
from batchrun.stats import RunStats


def busy_stats() -> RunStats:
    stats = RunStats(total=10, in_flight=3)
    stats.record_outcome(
        ok=True, error_code=None, attempts=3, latency_s=0.5, tokens_in=7, tokens_out=11
    )
    stats.record_outcome(ok=True, error_code=None, attempts=1, latency_s=1.5, tokens_in=5)
    stats.record_outcome(ok=False, error_code="rate_limited", attempts=2, latency_s=2.0)
    stats.record_outcome(ok=False, error_code="invalid_line", attempts=0, latency_s=None)
    return stats


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """Family name -> (type, samples), as Prometheus' own parser reads the text."""
    return {
        family.name: (family.type, family.samples)
        for family in text_string_to_metric_families(text)
    }


def values(samples: list[Sample]) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in samples}


def test_rendered_text_parses_with_names_labels_and_values() -> None:
    stats = busy_stats()
    text = render_metrics(stats, job="nightly", shard="1/4", extra={"rpm_limit": 600.0})
    families = parse(text)
    common = (("batch_job", "nightly"), ("shard", "1/4"))

    def single(name: str) -> float:
        (value,) = values(families[name][1]).values()
        return value

    assert single("batchrun_rows_total") == 10
    assert single("batchrun_rows_done") == 4
    assert single("batchrun_rows_ok") == 2
    assert single("batchrun_in_flight") == 3
    assert single("batchrun_rpm_limit") == 600
    assert values(families["batchrun_rows_failed"][1]) == {
        tuple(sorted((("code", "invalid_line"), *common))): 1,
        tuple(sorted((("code", "rate_limited"), *common))): 1,
    }
    # The parser names counter families without their _total suffix.
    assert families["batchrun_retries"][0] == "counter"
    assert single("batchrun_retries") == 3
    tokens = values(families["batchrun_tokens"][1])
    assert tokens == {
        tuple(sorted((("direction", "in"), *common))): 12,
        tuple(sorted((("direction", "out"), *common))): 11,
    }
    latency = {s.labels["quantile"]: s.value for s in families["batchrun_latency_seconds"][1]}
    assert latency == {
        "0.5": stats.latency.percentile(50),
        "0.95": stats.latency.percentile(95),
        "0.99": stats.latency.percentile(99),
    }
    for _, samples in families.values():
        assert all(s.labels["batch_job"] == "nightly" for s in samples)
        assert all(s.labels["shard"] == "1/4" for s in samples)


def test_every_family_has_help_and_type_and_the_text_ends_with_a_newline() -> None:
    text = render_metrics(busy_stats(), job="j", shard=None, extra={})
    assert text.endswith("\n")
    lines = text.splitlines()
    names = {line.split("{")[0] for line in lines if not line.startswith("#")}
    for name in names:
        assert any(line.startswith(f"# HELP {name} ") for line in lines)
        assert any(line.startswith(f"# TYPE {name} ") for line in lines)
    assert all(name.startswith("batchrun_") for name in names)
    assert "shard=" not in text


def test_unknown_total_empty_latency_and_no_failures_are_left_out() -> None:
    families = parse(render_metrics(RunStats(), job="j", shard=None, extra={}))
    assert "batchrun_rows_total" not in families
    assert "batchrun_latency_seconds" not in families
    assert "batchrun_rows_failed" not in families
    assert values(families["batchrun_rows_done"][1]) == {(("batch_job", "j"),): 0}


def test_label_values_are_escaped() -> None:
    job = 'a "quoted" \\ back\nslash'
    stats = RunStats()
    stats.record_outcome(ok=False, error_code='odd"code\\', attempts=1, latency_s=None)
    text = render_metrics(stats, job=job, shard=None, extra={})
    assert 'batch_job="a \\"quoted\\" \\\\ back\\nslash"' in text
    families = parse(text)
    (failed,) = families["batchrun_rows_failed"][1]
    assert failed.labels == {"batch_job": job, "code": 'odd"code\\'}


def test_extra_names_are_sanitised_and_values_formatted() -> None:
    extra = {"rate-limit.rpm": 1.5, "paused": True, "nan value": float("nan")}
    text = render_metrics(RunStats(), job="j", shard=None, extra=extra)
    families = parse(text)
    assert families["batchrun_rate_limit_rpm"][1][0].value == 1.5
    assert "batchrun_paused" in families
    assert 'batchrun_paused{batch_job="j"} 1\n' in text
    assert 'batchrun_nan_value{batch_job="j"} NaN\n' in text


def test_an_extra_that_clashes_with_a_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="second metric batchrun_rows_done"):
        render_metrics(RunStats(), job="j", shard=None, extra={"rows.done": 1.0})
    with pytest.raises(ValueError, match="second metric batchrun_a_b"):
        render_metrics(RunStats(), job="j", shard=None, extra={"a.b": 1.0, "a-b": 2.0})


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "batchrun.prom"
    write_metrics(path, "first\n")
    write_metrics(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in tmp_path.iterdir()] == ["batchrun.prom"]


def test_failed_write_cleans_up_its_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "batchrun.prom"
    path.mkdir()  # the rename onto it fails after the temporary was written
    (path / "keep").touch()
    with pytest.raises(IsADirectoryError):
        write_metrics(path, "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batchrun.prom"]
    with pytest.raises(FileNotFoundError):
        write_metrics(tmp_path / "no-such-dir" / "x.prom", "new\n")


def test_writer_writes_the_counts_and_extra_gauges_at_each_write(tmp_path: Path) -> None:
    path = tmp_path / "batchrun.prom"
    stats = RunStats(total=5)
    calls: list[int] = []

    def extra() -> dict[str, float]:
        calls.append(stats.done)
        return {"calls": float(len(calls))}

    writer = MetricsWriter(path, stats, job="j", shard="0/2", extra=extra, interval=10)
    writer.write()
    assert calls == [0]
    stats.record_outcome(ok=True, error_code=None, attempts=1, latency_s=0.1)
    writer.write()
    assert calls == [0, 1]
    assert 'batchrun_rows_done{batch_job="j",shard="0/2"} 1\n' in path.read_text()
    MetricsWriter(path, stats, job="j", shard="0/2", output="/data/j").write()
    assert 'batchrun_rows_done{batch_job="j",output="/data/j",shard="0/2"} 1\n' in path.read_text()


def test_writer_rejects_a_non_positive_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval"):
        MetricsWriter(tmp_path / "m.prom", RunStats(), job="j", shard=None, interval=0)
