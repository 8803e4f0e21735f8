"""Tests of batchrun.stats' Counts and Summary.from_dict, and of the files
that carry them: checkpoint.json and finished.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.errors import CorruptStateError
from batchrun.state import Checkpoint, StateDir
from batchrun.stats import Counts, RunStats, Summary, Tally

# --- Counts -------------------------------------------------------------------

verdicts = st.builds(
    Tally,
    ok=st.booleans(),
    error_code=st.one_of(st.none(), st.sampled_from(["rate_limited", "server_error", "x"])),
    retryable=st.booleans(),
    tokens_in=st.integers(min_value=0, max_value=10**6),
    tokens_out=st.integers(min_value=0, max_value=10**6),
    cost=st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
    reused=st.booleans(),
)


def counted(tallies: list[Tally], counts: Counts | None = None) -> Counts:
    counts = Counts() if counts is None else counts
    for verdict in tallies:
        counts.count_record(verdict)
    return counts


def through_checkpoint_json(counts: Counts, rows: int) -> Counts:
    """``counts`` saved in a checkpoint as ``checkpoint.json`` holds it, and read back."""
    saved = orjson.dumps(Checkpoint(rows=rows, counts=counts).to_dict())
    return Checkpoint.from_dict(orjson.loads(saved)).counts


def test_count_splits_verdicts_by_code() -> None:
    counts = Counts()
    counts.count(True, None, 10, 5, 0.25)
    counts.count(False, "rate_limited", 1, 0)
    counts.count(False, None)
    assert counts.ok == 1
    assert counts.failed_by_code == {"rate_limited": 1, "unknown": 1}
    assert counts.failed == 2
    assert (counts.tokens_in, counts.tokens_out, counts.cost) == (11, 5, 0.25)


def test_a_reused_record_counts_its_verdict_but_not_its_tokens_or_cost() -> None:
    counts = counted([Tally(False, "server_error", False, 7, 8, 1.5, reused=True)])
    assert counts == Counts(failed_by_code=Counter({"server_error": 1}))


def test_copy_shares_no_counter() -> None:
    counts = counted([Tally(False, "x", False, 0, 0)])
    copy = counts.copy()
    copy.count(False, "x")
    assert counts.failed_by_code == {"x": 1}
    assert copy.failed_by_code == {"x": 2}


@given(tallies=st.lists(verdicts, max_size=60))
def test_property_counting_then_a_checkpoint_round_trip_keeps_the_counts(
    tallies: list[Tally],
) -> None:
    counts = counted(tallies)
    assert through_checkpoint_json(counts, rows=len(tallies)) == counts
    assert counts.ok + counts.failed == len(tallies)


@given(tallies=st.lists(verdicts, max_size=60), cut=st.integers(min_value=0, max_value=60))
def test_property_counting_on_after_a_checkpoint_is_counting_in_one_go(
    tallies: list[Tally], cut: int
) -> None:
    resumed = through_checkpoint_json(counted(tallies[:cut]), rows=min(cut, len(tallies)))
    assert counted(tallies[cut:], resumed) == counted(tallies)


def test_run_stats_count_like_the_resume_scan() -> None:
    tallies = [
        Tally(True, None, False, 3, 4, 0.5),
        Tally(False, "server_error", True, 0, 0, 0.0),
        Tally(True, None, False, 9, 9, 2.0, reused=True),
    ]
    stats = RunStats()
    stats.record_outcome(
        ok=True, error_code=None, attempts=1, latency_s=0.1, tokens_in=3, tokens_out=4, cost=0.5
    )
    stats.record_earlier(tallies[1])
    stats.record_reused(tallies[2])
    assert stats.counts == counted(tallies)
    assert (stats.done, stats.skipped, stats.reused, stats.cost, stats.cost_saved) == (
        3,
        1,
        1,
        0.5,
        2.0,
    )


def test_resumed_stats_start_from_a_copy_of_the_counts() -> None:
    counts = counted([Tally(True, None, False, 1, 2, 0.5), Tally(False, "x", False, 0, 0)])
    stats = RunStats.resumed(2, counts)
    stats.record_outcome(ok=False, error_code="x", attempts=1, latency_s=None)
    assert (stats.done, stats.skipped, stats.ok, stats.failed) == (3, 2, 1, 2)
    assert (stats.tokens_in, stats.tokens_out, stats.cost) == (1, 2, 0.0)
    assert counts.failed_by_code == {"x": 1}


# --- checkpoint.json: its keys are a contract ---------------------------------

# checkpoint.json as the versions before Counts wrote it (dataclasses.asdict of
# a flat Checkpoint), byte for byte.
OLD_CHECKPOINT = (
    b'{\n  "rows": 7,\n  "output_bytes": 812,\n  "input_line": 7,\n  "input_offset": 640,\n'
    b'  "ok": 5,\n  "failed_by_code": {\n    "server_error": 2\n  },\n  "tokens_in": 30,\n'
    b'  "tokens_out": 45,\n  "in_doubt": 1,\n  "cost": 0.125\n}'
)


def test_an_older_checkpoint_reads_and_writes_back_byte_for_byte(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()
    state.checkpoint_path.write_bytes(OLD_CHECKPOINT)

    checkpoint = state.read_checkpoint()
    assert (checkpoint.rows, checkpoint.in_doubt) == (7, 1)
    assert checkpoint.counts == Counts(5, Counter({"server_error": 2}), 30, 45, 0.125)
    state.write_checkpoint(checkpoint)
    assert state.checkpoint_path.read_bytes() == OLD_CHECKPOINT


def test_a_checkpoint_without_the_later_keys_counts_them_as_zero(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()
    state.checkpoint_path.write_bytes(b'{"rows": 2, "output_bytes": 20, "ok": 2}')

    checkpoint = state.read_checkpoint()
    assert (checkpoint.rows, checkpoint.output_bytes, checkpoint.in_doubt) == (2, 20, 0)
    assert checkpoint.counts == Counts(ok=2)


@pytest.mark.parametrize("text", [b'{"rows": 1, "surprise": 2}', b'{"counts": {}}'])
def test_a_checkpoint_with_an_unknown_key_is_damaged(tmp_path: Path, text: bytes) -> None:
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()
    state.checkpoint_path.write_bytes(text)
    with pytest.raises(CorruptStateError, match=r"checkpoint\.json is damaged"):
        state.read_checkpoint()


# --- Summary.from_dict ---------------------------------------------------------

summaries = st.builds(
    Summary,
    rows=st.integers(min_value=0),
    ok=st.integers(min_value=0),
    failed=st.integers(min_value=0),
    failed_by_code=st.dictionaries(st.text(min_size=1), st.integers(min_value=1)),
    retries=st.integers(min_value=0),
    skipped=st.integers(min_value=0),
    tokens_in=st.integers(min_value=0),
    tokens_out=st.integers(min_value=0),
    latency_p50_ms=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e7)),
    latency_p95_ms=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e7)),
    latency_p99_ms=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e7)),
    duration_s=st.floats(min_value=0.0, max_value=1e7),
    rows_per_s=st.floats(min_value=0.0, max_value=1e7),
    exit_code=st.sampled_from([0, 1, 2, 3, 4, 5, 74, 75]),
    aborted=st.one_of(st.none(), st.text()),
    output=st.text(),
    reused=st.integers(min_value=0),
    sent=st.integers(min_value=0),
    cost=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e6)),
    cost_saved=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e6)),
    extra=st.dictionaries(st.text(), st.one_of(st.integers(), st.text(), st.none())),
)


@given(summary=summaries)
def test_property_summary_round_trips_through_its_dict(summary: Summary) -> None:
    assert Summary.from_dict(summary.to_dict()) == summary


def test_summary_round_trips_through_finished_json(tmp_path: Path) -> None:
    stats = RunStats(total=3)
    stats.record_outcome(ok=True, error_code=None, attempts=2, latency_s=0.2, tokens_in=4)
    stats.record_outcome(ok=False, error_code="server_error", attempts=3, latency_s=1.0)
    summary = Summary.from_stats(
        stats,
        duration_s=1.5,
        exit_code=1,
        aborted=None,
        output="out.jsonl",
        extra={"in doubt": 0, "hosts": {"a": 1}},
        priced=True,
    )
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()

    state.write_finished(summary)
    finished = state.read_finished()

    assert finished is not None
    assert finished.summary == summary
    assert finished.at is not None
    assert orjson.loads(state.finished_path.read_bytes()) == {
        "finished_at": finished.at,
        **summary.to_dict(),
    }


def test_summary_from_dict_fills_missing_keys_and_ignores_unknown_ones() -> None:
    summary = Summary.from_dict({"rows": 3, "ok": 3, "exit_code": 0, "from_the_future": 1})
    assert (summary.rows, summary.ok, summary.failed, summary.failed_by_code) == (3, 3, 0, {})
    assert (summary.latency_p50_ms, summary.cost, summary.extra, summary.output) == (
        None,
        None,
        {},
        "",
    )


def test_a_damaged_finished_json_is_named(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()
    state.finished_path.write_bytes(b'{"rows": 1, "failed_by_code": 5}')
    with pytest.raises(CorruptStateError, match=r"finished\.json is damaged"):
        state.read_finished()


def test_replay_reports_the_rows_and_nothing_done_now() -> None:
    stats = RunStats(total=2)
    stats.record_outcome(ok=True, error_code=None, attempts=4, latency_s=0.3, tokens_in=9)
    stats.record_outcome(ok=False, error_code="x", attempts=1, latency_s=0.1, cost=1.0)
    done = Summary.from_stats(
        stats, duration_s=2.0, exit_code=1, aborted=None, output="old", priced=True
    )

    again = done.replay(output="out.jsonl", extra={"requests sent": 0})

    assert again == Summary(
        rows=2,
        ok=1,
        failed=1,
        failed_by_code={"x": 1},
        retries=0,
        skipped=2,
        tokens_in=9,  # the output's tokens, as a resumed run counts them
        tokens_out=0,
        latency_p50_ms=None,
        latency_p95_ms=None,
        latency_p99_ms=None,
        duration_s=0.0,
        rows_per_s=0.0,
        exit_code=1,
        aborted=None,
        output="out.jsonl",
        extra={"requests sent": 0},
    )
