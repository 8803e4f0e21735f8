"""Rate limits, adaptive concurrency, the global pause and stale connections,
against the real mock provider (which can enforce a per-second quota)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from batchrun.congestion import STREAK
from batchrun.errors import TransientError
from batchrun.jobfile import build_config
from batchrun.mock.server import MockServer
from batchrun.runner import run_async
from batchrun.throttle import INITIAL_CONCURRENCY, Throttle, Ticket
from batchrun.timing import Clock
from tests.conftest import chat, make_config, read_jsonl
from tests.fakes import FakeClock

pytestmark = pytest.mark.asyncio


@pytest.mark.slow
async def test_a_per_second_quota_is_met_by_adapting_not_hammering(tmp_path: Path) -> None:
    limit, count = 100, 800
    async with MockServer(rate_limit=limit, latency=0.05) as server:
        rows = [chat(f"row {i}") for i in range(count)]
        config = make_config(tmp_path, rows, server, max_async_requests=64, backoff_max=2.0)

        summary = await run_async(config)

    assert summary.exit_code == 0
    assert summary.ok == count
    rejected = summary.extra["rate limited (429)"]
    assert isinstance(rejected, int)
    assert rejected <= count // 10  # it adapts instead of hammering
    assert summary.extra["pauses"]  # the whole run paused on Retry-After
    received = server.stats.received_per_second
    flooded = [second for second, n in received.items() if n > 2 * limit]
    assert len(flooded) <= 1, received  # never far above the quota for long
    assert max(server.stats.accepted_per_second.values()) <= limit


async def test_a_wrong_key_aborts_after_a_handful_of_requests(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "bad-key")
    rows = [chat(f"row {i}") for i in range(2000)]
    config = make_config(tmp_path, rows, server, provider="openai", max_async_requests=128)

    summary = await run_async(config)

    assert summary.exit_code == 3
    assert server.stats.requests <= INITIAL_CONCURRENCY
    assert summary.aborted is not None
    assert "Fix that (the key" in summary.aborted


async def test_a_server_dropping_idle_connections_fails_no_row(
    tmp_path: Path, fake_clock: Clock
) -> None:
    async with MockServer(stale_after=0.0) as server:  # every reused connection loses the race
        rows = [chat(f"row {i}") for i in range(60)]
        config = make_config(tmp_path, rows, server, max_async_requests=4)

        summary = await run_async(config, clock=fake_clock)

    out = read_jsonl(config.out)
    assert all(r["error"] is None for r in out)
    assert all(r["attempts"] == 1 for r in out)  # handled below the retry policy
    stale = summary.extra["stale connections retried"]
    assert isinstance(stale, int)
    assert stale > 0


def throttle_for(tmp_path: Path, time: FakeClock, **settings: object) -> Throttle:
    base = {"input": tmp_path / "in.jsonl", "out": tmp_path / "out.jsonl", **settings}
    return Throttle(build_config(base), Clock(sleep=time.sleep, monotonic=time.monotonic))


async def test_one_retry_after_pauses_every_worker(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, backoff_max=60.0)
    throttle.failed(TransientError("rate_limit_exceeded", "slow", status=429, retry_after=5))
    started: list[float] = []

    async def worker() -> None:
        begun = await throttle.acquire(0)
        started.append(time.now)
        throttle.release(begun, answered=True)

    async with anyio.create_task_group() as tasks:
        for _ in range(3):
            tasks.start_soon(worker)

    assert started == [5.0, 5.0, 5.0]
    assert throttle.report()["rate limited (429)"] == 1
    assert throttle.report()["paused s"] == 5.0


async def test_a_pause_ends_at_the_steady_rate_not_in_a_burst(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, rpm=600, adaptive_concurrency=False)  # 10/s
    throttle.failed(TransientError("rate_limit_exceeded", "slow", status=429, retry_after=5))
    started: list[float] = []
    for _ in range(5):
        throttle.release(await throttle.acquire(0), answered=True)
        started.append(time.now)
    assert started == pytest.approx([5.1, 5.2, 5.3, 5.4, 5.5])


async def test_a_huge_retry_after_pauses_the_run_no_longer_than_backoff_max(
    tmp_path: Path,
) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, backoff_max=30.0)
    throttle.failed(TransientError("rate_limit_exceeded", "daily", status=429, retry_after=86400))

    throttle.release(await throttle.acquire(0), answered=False)

    assert time.now == 30.0


async def test_congestion_halves_the_limit_once_per_burst(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, max_async_requests=64)
    for _ in range(100):
        throttle.succeeded(0, 0)
    assert throttle.controller.limit == 64
    for _ in range(20):  # a burst of simultaneous 429s is one decrease
        throttle.failed(TransientError("rate_limit_exceeded", "slow", status=429))
    assert throttle.controller.limit == 32
    throttle.failed(TransientError("http_400", "bad", status=400))
    assert throttle.controller.limit == 32  # a row's own error is no congestion
    assert throttle.report()["concurrency"] == f"{INITIAL_CONCURRENCY}-64"


async def test_after_a_burst_of_429s_the_limit_drops_to_what_the_provider_sustained(
    tmp_path: Path,
) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, max_async_requests=64)
    for _ in range(60):  # slow start: 60 answers, each 50 ms after its request
        throttle._throughput.finish(started=time.now - 0.05)
        throttle.succeeded(0, 0)
        time.now += 0.01
    assert throttle.controller.limit == 64

    for _ in range(STREAK):  # 429s in a row: a limiter, not a stray one (see below)
        throttle.failed(TransientError("rate_limit_exceeded", "slow", status=429))

    # ~60 answers/s at ~0.05 s each sustain about 3 in flight (Little's law), not 32.
    assert throttle.controller.limit == 3


async def test_no_adaptive_starts_at_the_cap(tmp_path: Path) -> None:
    throttle = throttle_for(
        tmp_path, FakeClock(), max_async_requests=48, adaptive_concurrency=False
    )
    assert throttle.controller.limit == 48


async def test_no_adaptive_keeps_the_limit_pinned_through_congestion(tmp_path: Path) -> None:
    throttle = throttle_for(
        tmp_path, FakeClock(), max_async_requests=48, adaptive_concurrency=False
    )
    for _ in range(5):
        throttle.failed(TransientError("rate_limit_exceeded", "slow", status=429))
        throttle.failed(TransientError("server_error", "busy", status=503))
    assert throttle.controller.limit == 48
    assert throttle.report()["concurrency"] == "48-48"


async def test_tokens_per_minute_budget_is_corrected_by_usage(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, tpm=6000)  # 100 tokens/s, 10 of burst
    assert throttle.counts_tokens
    throttle.release(await throttle.acquire(100), answered=True)
    throttle.succeeded(100, 400)  # the answer used 300 more than estimated
    throttle.release(await throttle.acquire(100), answered=True)
    assert time.now == pytest.approx(4.0)  # 300 of debt and 100 more, at 100/s


async def test_one_answers_usage_puts_the_token_budget_in_debt_a_minute_at_most(
    tmp_path: Path,
) -> None:
    # 99,999,999 tokens is within the bound on counts, yet at --tpm 6000 it was
    # 1,000,000 s (11 days) of debt: the next row waited that long.
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, tpm=6000)  # 100 tokens/s, 10 of burst
    throttle.release(await throttle.acquire(100), answered=True)
    throttle.succeeded(100, 99_999_999)
    with anyio.fail_after(1):  # fake time: only a wait that never ends fails
        throttle.release(await throttle.acquire(100), answered=True)
    assert time.now <= 61.0 + 1e-6  # a minute of --tpm, then the 100 tokens


async def healthy(throttle: Throttle, time: FakeClock, answers: int) -> None:
    """``answers`` good answers, 10 ms apart, each 50 ms after its request."""
    for _ in range(answers):
        ticket = await throttle.acquire(0)
        throttle.release(Ticket(time.now - 0.05, ticket.rank), answered=True)
        throttle.succeeded(0, 0)
        time.now += 0.01


async def test_a_lone_429_delays_only_its_own_row(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, max_async_requests=64, backoff_max=60.0)
    await healthy(throttle, time, 100)

    throttle.failed(TransientError("rate_limit_exceeded", "slow", status=429, retry_after=5))

    assert not throttle.gate.paused
    assert throttle.controller.limit == 64
    throttle.release(await throttle.acquire(0), answered=True)
    assert time.now == pytest.approx(1.0)  # nobody waited for the 429's Retry-After
    assert throttle.report()["pauses"] == 0


@pytest.mark.parametrize(
    "error",
    [
        TransientError("http_500", "oops", status=500),
        TransientError("connection_reset", "reset"),
    ],
)
async def test_500s_and_resets_are_never_congestion(tmp_path: Path, error: TransientError) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, max_async_requests=64)
    await healthy(throttle, time, 10)
    for _ in range(100):
        throttle.failed(error)
    assert throttle.controller.limit == 64
    assert throttle.controller.decreases == 0


async def test_stray_503s_among_good_answers_keep_the_limit(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, max_async_requests=64)
    for _ in range(50):  # one answer in ten is a 503: 10 %, far from congestion
        await healthy(throttle, time, 9)
        throttle.failed(TransientError("overloaded", "busy", status=503))
    assert throttle.controller.limit == 64
    assert throttle.controller.decreases == 0


async def test_503s_that_are_a_share_of_the_answers_cut_the_limit(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, max_async_requests=64)
    await healthy(throttle, time, 64)
    for _ in range(20):  # every third answer a 503: the provider is overloaded
        await healthy(throttle, time, 2)
        throttle.failed(TransientError("overloaded", "busy", status=503))
    assert throttle.controller.limit < 64
    assert throttle.controller.decreases == 1


async def test_a_healthy_provider_sees_the_whole_limit_within_two_round_trips(
    tmp_path: Path,
) -> None:
    throttle = throttle_for(tmp_path, FakeClock(), max_async_requests=2000)
    assert throttle.controller.limit == INITIAL_CONCURRENCY
    limit = throttle.controller.limit
    for _ in range(2):  # each round trip answers everything that was in flight
        for _ in range(limit):
            throttle.succeeded(0, 0)
        limit = throttle.controller.limit
    assert limit == 2000


async def test_rows_waiting_for_a_retry_do_not_hold_up_the_others(tmp_path: Path) -> None:
    seen_at_retry: list[int] = []

    async def sleep(seconds: float) -> None:
        if seconds >= 1.0:  # a retry told Retry-After: 1; shortened, but really waiting
            await anyio.sleep(0.3)
            seen_at_retry.append(server.stats.requests)
        else:
            await anyio.sleep(seconds)

    async with MockServer() as server:
        healthy_rows = [chat(f"row {i}") for i in range(36)]
        failing = [chat(f"late {i} mock:fail=429x1 mock:retry_after=1") for i in range(3)]
        rows = healthy_rows[:3] + failing + healthy_rows[3:]
        config = make_config(tmp_path, rows, server, max_async_requests=3)

        summary = await run_async(config, clock=Clock(sleep=sleep))

    assert summary.exit_code == 0
    assert summary.extra["pauses"] == 0  # three lone 429s among good answers
    # While the three rows waited, spare workers sent every other row: by the
    # first retry, all 39 first attempts were out. (The later two may already
    # see that first retry: the three waits end a few milliseconds apart.)
    assert len(seen_at_retry) == 3
    assert seen_at_retry[0] == 39


async def _quiet_ramp(
    tmp_path: Path, fail_at: float | None = None, answer_at: float | None = None
) -> list[tuple[float, int]]:
    """The (fake time, limit) changes while 300 rows wait and nothing is answered, except a
    failure at ``fail_at`` or a good answer at ``answer_at`` (fake seconds)."""
    time = FakeClock(auto=False)
    throttle = throttle_for(tmp_path, time, max_async_requests=1000)
    seen: list[tuple[float, int]] = []
    throttle.controller.add_listener(lambda limit: seen.append((round(time.now, 2), limit)))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(throttle.widen_while_quiet, time.sleep)
        for _ in range(300):  # 16 go out, the rest queue
            tasks.start_soon(throttle.acquire, 0)
        for step in range(1, 41):  # two fake seconds, in steps of 50 ms
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            if fail_at is not None and step * 0.05 > fail_at:
                fail_at = None
                throttle.failed(TransientError("server_error", "boom", status=500))
            if answer_at is not None and step * 0.05 > answer_at:
                answer_at = None
                throttle.release(Ticket(time.now - 1.0, 0), answered=True)
                throttle.succeeded(0, 0)
            time.advance(0.05)
        tasks.cancel_scope.cancel()
    return seen


async def test_slow_answers_do_not_hold_the_ramp_back(tmp_path: Path) -> None:
    seen = await _quiet_ramp(tmp_path)

    # A step per quiet quarter second, to the cap (times within the 50 ms steps).
    assert seen == [(0.25, 256), (pytest.approx(0.5, abs=0.06), 1000)]


async def test_a_failure_holds_the_quiet_ramp_for_a_step(tmp_path: Path) -> None:
    seen = await _quiet_ramp(tmp_path, fail_at=0.1)

    # The first quarter second had a failure: each step comes one later.
    assert seen == [(pytest.approx(0.5, abs=0.06), 256), (pytest.approx(0.75, abs=0.06), 1000)]


async def test_the_first_answer_ends_the_quiet_ramp(tmp_path: Path) -> None:
    seen = await _quiet_ramp(tmp_path, answer_at=0.1)

    assert [limit for _, limit in seen] == [31]  # the answer's own step (+15), no quiet one


async def test_no_clock_runs_for_the_quiet_ramp_while_no_row_queues(tmp_path: Path) -> None:
    time = FakeClock()
    throttle = throttle_for(tmp_path, time, max_async_requests=64)
    with anyio.move_on_after(0.2):  # real seconds: it just waits
        await throttle.widen_while_quiet(time.sleep)
    assert time.now == 0.0
    assert throttle.controller.limit == 16
