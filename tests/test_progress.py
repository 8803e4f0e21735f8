"""Tests of batchrun.progress and batchrun.stats: histogram, counters, summary, reporter."""

from __future__ import annotations

import io
import math

import anyio
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.progress import ProgressReporter
from batchrun.stats import LatencyHistogram, RunStats, Summary
from tests.fakes import FakeClock


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


class StopHeartbeat(Exception):
    pass


def exact_percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) / 100))
    return ordered[rank - 1]


def make_stats() -> RunStats:
    stats = RunStats(total=5000)
    stats.done, stats.counts.ok, stats.retries, stats.in_flight = 1200, 1190, 17, 32
    stats.failed_by_code.update({"rate_limited": 4, "read_timeout": 6})
    return stats


# --- LatencyHistogram ---------------------------------------------------------

latencies = st.floats(min_value=1e-4, max_value=3600.0, allow_nan=False)


@given(
    values=st.lists(latencies, min_size=1, max_size=300),
    q=st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
)
def test_histogram_percentile_within_one_percent(values: list[float], q: float) -> None:
    hist = LatencyHistogram()
    for v in values:
        hist.record(v)
    exact = exact_percentile(values, q)
    estimate = hist.percentile(q)
    assert estimate is not None
    # 1% relative, plus a hair for float rounding at a bucket's edge.
    assert abs(estimate - exact) <= 0.01 * exact * (1 + 1e-9)


@given(value=latencies)
def test_histogram_single_value_is_exact(value: float) -> None:
    hist = LatencyHistogram()
    hist.record(value)
    assert hist.percentile(0) == pytest.approx(value, rel=0.01)
    assert hist.percentile(100) == pytest.approx(value, rel=0.01)


def test_histogram_empty_returns_none() -> None:
    hist = LatencyHistogram()
    assert hist.count == 0
    assert hist.percentile(50) is None


def test_histogram_clamps_out_of_range_and_ignores_nan() -> None:
    hist = LatencyHistogram()
    for v in (1e-9, -1.0, 5000.0, math.inf, math.nan):
        hist.record(v)
    assert hist.count == 4
    assert hist.percentile(0) == pytest.approx(1e-4, rel=0.01)
    assert hist.percentile(100) == 3600.0


@pytest.mark.parametrize("q", [-0.1, 100.1, math.nan])
def test_histogram_rejects_bad_percentile(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        LatencyHistogram().percentile(q)


def test_histogram_many_values_stay_accurate() -> None:
    hist = LatencyHistogram()
    for i in range(1, 100_001):
        hist.record(i / 1000)  # 1 ms .. 100 s evenly
    assert hist.count == 100_000
    for q, exact in ((50, 50.0), (95, 95.0), (99, 99.0)):
        assert hist.percentile(q) == pytest.approx(exact, rel=0.01)


# --- RunStats -----------------------------------------------------------------


def test_record_outcome_counts() -> None:
    stats = RunStats(total=4)
    stats.record_outcome(ok=True, error_code=None, attempts=1, latency_s=0.1, tokens_in=10)
    stats.record_outcome(ok=True, error_code=None, attempts=3, latency_s=0.2, tokens_out=5)
    stats.record_outcome(ok=False, error_code="rate_limited", attempts=4, latency_s=None)
    stats.record_outcome(ok=False, error_code=None, attempts=0, latency_s=1.0)
    assert (stats.done, stats.ok, stats.failed) == (4, 2, 2)
    assert stats.failed_by_code == {"rate_limited": 1, "unknown": 1}
    assert stats.retries == 2 + 3
    assert stats.latency.count == 3
    assert (stats.tokens_in, stats.tokens_out) == (10, 5)


def test_run_stats_defaults_are_not_shared() -> None:
    a, b = RunStats(), RunStats()
    a.record_outcome(ok=False, error_code="x", attempts=1, latency_s=0.5)
    assert b.failed == 0
    assert b.latency.count == 0


# --- Summary ------------------------------------------------------------------


def finished_stats() -> RunStats:
    stats = RunStats(total=1000)
    stats.done = stats.skipped = 200
    for i in range(798):
        stats.record_outcome(ok=True, error_code=None, attempts=1, latency_s=0.12 + i / 1e5)
    stats.record_outcome(ok=False, error_code="read_timeout", attempts=3, latency_s=None)
    stats.record_outcome(ok=False, error_code="rate_limited", attempts=5, latency_s=0.9)
    stats.counts.tokens_in, stats.counts.tokens_out = 12_345, 6_789
    return stats


def test_summary_from_stats() -> None:
    summary = Summary.from_stats(
        finished_stats(), duration_s=10.0, exit_code=1, aborted=None, output="out.jsonl"
    )
    assert (summary.rows, summary.ok, summary.failed, summary.skipped) == (1000, 798, 2, 200)
    assert summary.failed_by_code == {"rate_limited": 1, "read_timeout": 1}
    assert summary.retries == 2 + 4
    assert summary.rows_per_s == pytest.approx(80.0)  # skipped rows don't count
    assert summary.latency_p50_ms == pytest.approx(124.0, rel=0.01)
    assert summary.extra == {}


def test_summary_zero_duration_and_no_latency() -> None:
    summary = Summary.from_stats(RunStats(), duration_s=0.0, exit_code=0, aborted=None, output="o")
    assert summary.rows_per_s == 0.0
    assert summary.latency_p99_ms is None
    assert "latency" not in summary.render()


def test_summary_to_dict_is_json_ready() -> None:
    summary = Summary.from_stats(
        finished_stats(),
        duration_s=12.3,
        exit_code=3,
        aborted="fatal: invalid_api_key",
        output="out.jsonl",
        extra={"in_doubt": 0, "concurrency": [4, 64]},
    )
    data = orjson.loads(orjson.dumps(summary.to_dict()))
    assert data["rows"] == 1000
    assert data["failed_by_code"] == {"rate_limited": 1, "read_timeout": 1}
    assert data["aborted"] == "fatal: invalid_api_key"
    assert data["extra"] == {"in_doubt": 0, "concurrency": [4, 64]}
    assert data["latency_p95_ms"] == pytest.approx(summary.latency_p95_ms)


def test_summary_render() -> None:
    summary = Summary.from_stats(
        finished_stats(), duration_s=10.0, exit_code=0, aborted=None, output="out.jsonl"
    )
    lines = summary.render().splitlines()
    assert lines[0] == (
        "batchrun: 1,000 rows in 10.0 s (80.0 rows/s): 798 ok, 2 failed "
        "(rate_limited: 1, read_timeout: 1); 200 of them done by an earlier run"
    )
    assert lines[1].startswith(
        "  sent 800 | retries 6 | tokens in 12,345 out 6,789 | latency p50 124 ms"
    )
    assert lines[2] == "  output out.jsonl"
    assert len(lines) == 3


def test_summary_render_aborted_and_long_run() -> None:
    summary = Summary.from_stats(
        RunStats(), duration_s=3725.0, exit_code=130, aborted="interrupted", output="o.jsonl"
    )
    text = summary.render()
    assert "in 1 h 02 min" in text
    assert text.splitlines()[-1] == "  aborted: interrupted"


# --- ProgressReporter ---------------------------------------------------------


def test_choose_mode() -> None:
    assert ProgressReporter.choose_mode(False, TtyStringIO()) == "off"
    assert ProgressReporter.choose_mode(True, TtyStringIO()) == "bar"
    assert ProgressReporter.choose_mode(True, io.StringIO()) == "log"
    closed = io.StringIO()
    closed.close()
    assert ProgressReporter.choose_mode(True, closed) == "log"


def test_line_with_total() -> None:
    clock = FakeClock(100.0)
    reporter = ProgressReporter(
        make_stats(), mode="off", clock=clock, stream=io.StringIO(), extra=lambda: "conc 64"
    )
    clock.now += 12.0
    assert reporter.line() == (
        "progress 1200/5000 (24.0%) 100.0 rows/s eta 38 s | ok 1190 failed 10"
        " | retries 17 | in flight 32 | conc 64"
    )


def test_line_without_total_and_with_skipped() -> None:
    stats = make_stats()
    stats.total = None
    stats.done, stats.skipped = 1400, 200
    clock = FakeClock(100.0)
    reporter = ProgressReporter(stats, mode="off", clock=clock, stream=io.StringIO())
    clock.now += 10.0
    assert reporter.line() == (
        "progress 1400 rows 120.0 rows/s | ok 1190 failed 10 skipped 200"
        " | retries 17 | in flight 32"
    )


def test_line_before_any_row_has_unknown_eta() -> None:
    reporter = ProgressReporter(RunStats(total=10), mode="off", clock=FakeClock(100.0))
    assert reporter.line().startswith("progress 0/10 (0.0%) 0.0 rows/s eta ? |")


def test_log_mode_writes_only_when_interval_elapsed() -> None:
    stats, clock, out = RunStats(total=100), FakeClock(100.0), io.StringIO()
    reporter = ProgressReporter(stats, mode="log", stream=out, clock=clock, log_interval=5.0)
    for step in range(20):  # one row every 0.5 s, for 10 s
        clock.now += 0.5
        stats.record_outcome(ok=True, error_code=None, attempts=1, latency_s=0.5)
        reporter.update()
        assert len(out.getvalue().splitlines()) == (step + 1) // 10
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("progress 10/100 (10.0%) 2.0 rows/s eta 45 s")
    assert lines[1].startswith("progress 20/100 (20.0%)")


def test_log_mode_tick_logs_a_stalled_run() -> None:
    stats, clock, out = RunStats(), FakeClock(100.0), io.StringIO()
    reporter = ProgressReporter(stats, mode="log", stream=out, clock=clock, log_interval=5.0)
    clock.now += 4.9
    reporter.tick()
    assert out.getvalue() == ""
    clock.now += 0.1
    reporter.tick()
    clock.now += 5.0
    reporter.tick()
    assert out.getvalue().splitlines() == [reporter.line()] * 2


def test_log_mode_close_writes_final_line_once() -> None:
    stats, out = RunStats(total=1), io.StringIO()
    reporter = ProgressReporter(stats, mode="log", stream=out, clock=FakeClock(100.0))
    stats.record_outcome(ok=True, error_code=None, attempts=1, latency_s=0.1)
    reporter.update()
    assert out.getvalue() == ""
    reporter.close()
    reporter.close()
    reporter.update()
    assert out.getvalue().splitlines() == [reporter.line()]
    assert "progress 1/1 (100.0%)" in out.getvalue()


def test_off_mode_writes_nothing() -> None:
    stats, clock, out = RunStats(), FakeClock(100.0), io.StringIO()
    reporter = ProgressReporter(stats, mode="off", stream=out, clock=clock)
    clock.now += 60
    reporter.update()
    reporter.tick()
    reporter.close()
    assert out.getvalue() == ""


def test_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="log_interval"):
        ProgressReporter(RunStats(), mode="log", log_interval=0)


def test_bar_mode_on_a_string_stream() -> None:
    stats, clock, out = RunStats(total=50), FakeClock(100.0), io.StringIO()
    reporter = ProgressReporter(stats, mode="bar", stream=out, clock=clock, extra=lambda: "x")
    for _ in range(49):
        clock.now += 0.1
        stats.record_outcome(ok=True, error_code=None, attempts=2, latency_s=0.1)
        reporter.update()
    stats.record_outcome(ok=False, error_code="boom", attempts=1, latency_s=None)
    reporter.tick()
    reporter.close()
    reporter.close()
    text = out.getvalue()
    assert "50/50" in text
    assert "errors 1, retries 49, in flight 0, x" in text


def test_bar_mode_starts_at_rows_done_earlier() -> None:
    stats, out = RunStats(total=10, done=4, skipped=4), io.StringIO()
    reporter = ProgressReporter(stats, mode="bar", stream=out, clock=FakeClock(100.0))
    reporter.close()
    assert "4/10" in out.getvalue()


@pytest.mark.asyncio
async def test_heartbeat_ticks_at_log_interval_and_propagates() -> None:
    stats, clock, out = RunStats(), FakeClock(100.0), io.StringIO()
    reporter = ProgressReporter(stats, mode="log", stream=out, clock=clock, log_interval=2.0)
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        if len(waits) == 3:
            raise StopHeartbeat
        waits.append(seconds)
        clock.now += seconds

    with pytest.raises(StopHeartbeat):
        await reporter.heartbeat(fake_sleep)
    assert waits == [2.0, 2.0, 2.0]
    assert len(out.getvalue().splitlines()) == 3


@pytest.mark.asyncio
async def test_heartbeat_in_bar_mode_every_half_second() -> None:
    reporter = ProgressReporter(
        RunStats(), mode="bar", stream=io.StringIO(), clock=FakeClock(100.0)
    )
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        if len(waits) == 2:
            raise StopHeartbeat
        waits.append(seconds)

    with pytest.raises(StopHeartbeat):
        await reporter.heartbeat(fake_sleep)
    reporter.close()
    assert waits == [0.5, 0.5]


@pytest.mark.asyncio
async def test_heartbeat_stops_on_cancellation() -> None:
    reporter = ProgressReporter(
        RunStats(), mode="log", stream=io.StringIO(), clock=FakeClock(100.0)
    )
    parked = anyio.Event()

    async def fake_sleep(seconds: float) -> None:
        parked.set()
        await anyio.Event().wait()  # never set: only cancellation ends it

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.heartbeat, fake_sleep)
            await parked.wait()
            tg.cancel_scope.cancel()
    assert tg.cancel_scope.cancelled_caught


def test_bar_takes_the_total_once_the_count_is_known() -> None:
    stream = io.StringIO()
    now = [0.0]
    stats = RunStats()
    reporter = ProgressReporter(stats, mode="bar", stream=stream, clock=lambda: now[0])
    stats.done = 5
    reporter.update()
    stats.total = 50  # the background count finished
    now[0] += 1.0
    reporter.tick()
    assert reporter._bar is not None
    assert reporter._bar.total == 50
    reporter.close()
    assert "/50" in stream.getvalue()
