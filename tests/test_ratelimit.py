"""Tests of batchrun.ratelimit: rate budgets, pause hints and the pause gate, on fake time."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import anyio.lowlevel
import pytest

from batchrun.ratelimit import PauseGate, RateBudget
from tests.fakes import FakeClock

NOW = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)


async def settle() -> None:
    """Let every runnable task run until it blocks (fake time never moves on its own)."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


def budget(
    time: FakeClock,
    *,
    rpm: float | None = None,
    tpm: float | None = None,
    burst_seconds: float = 1.0,
) -> RateBudget:
    return RateBudget(
        rpm=rpm, tpm=tpm, clock=time.monotonic, sleep=time.sleep, burst_seconds=burst_seconds
    )


async def acquire_in(
    scope: anyio.CancelScope, limit: RateBudget, got: list[str], name: str
) -> None:
    """Acquire inside ``scope`` (which the test may cancel), then record ``name``."""
    with scope:
        await limit.acquire(0)
        got.append(name)


def assert_rate(stamps: list[float], amounts: list[float], burst: float, rate: float) -> None:
    """No window [t_i, t_j] holds more than burst + rate * (t_j - t_i)."""
    for i in range(len(stamps)):
        total = 0.0
        for j in range(i, len(stamps)):
            total += amounts[j]
            assert total <= burst + rate * (stamps[j] - stamps[i]) + 1e-6, (i, j)


# --- RateBudget ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_rpm_spreads_requests_smoothly() -> None:
    time = FakeClock()
    limit = budget(time, rpm=600)  # 10/s, burst of 10
    stamps = []
    for _ in range(100):
        await limit.acquire(0)
        stamps.append(time.now)
    assert stamps[:10] == [0.0] * 10
    assert stamps[-1] == pytest.approx(9.0)
    assert_rate(stamps, [1.0] * 100, burst=10, rate=10)


@pytest.mark.asyncio
async def test_burst_seconds_sets_the_burst() -> None:
    time = FakeClock()
    limit = budget(time, rpm=600, burst_seconds=2.0)
    for _ in range(20):
        await limit.acquire(0)
    assert time.now == 0.0
    await limit.acquire(0)
    assert time.now == pytest.approx(0.1)


@pytest.mark.asyncio
async def test_low_rpm_still_lets_one_request_through() -> None:
    time = FakeClock()
    limit = budget(time, rpm=6)  # one per 10 s, burst below one request
    stamps = []
    for _ in range(3):
        await limit.acquire(0)
        stamps.append(time.now)
    assert stamps == pytest.approx([0.0, 10.0, 20.0])


@pytest.mark.asyncio
async def test_concurrent_waiters_are_fifo_and_within_rate() -> None:
    time = FakeClock()
    limit = budget(time, rpm=600)
    order: list[int] = []
    stamps: list[float] = []

    async def worker(index: int) -> None:
        await limit.acquire(0)
        order.append(index)
        stamps.append(time.now)

    async with anyio.create_task_group() as tg:
        for index in range(50):
            tg.start_soon(worker, index)
            await anyio.lowlevel.checkpoint()  # each queues before the next starts
    assert order == list(range(50))
    assert stamps[-1] == pytest.approx(4.0)
    assert_rate(stamps, [1.0] * 50, burst=10, rate=10)


@pytest.mark.asyncio
async def test_small_request_does_not_overtake_a_big_one_waiting() -> None:
    time = FakeClock(auto=False)
    limit = budget(time, tpm=60_000)  # 1000 tokens/s, burst 1000
    await limit.acquire(1000)  # bucket now empty
    got: list[tuple[str, float]] = []

    async def worker(name: str, tokens: int) -> None:
        await limit.acquire(tokens)
        got.append((name, time.now))

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "big", 1000)
        await settle()
        tg.start_soon(worker, "small", 10)
        await settle()
        time.advance(0.5)  # room for "small", but "big" came first
        await settle()
        assert got == []
        time.advance(0.5)
        await settle()
        assert got == [("big", 1.0)]
        time.advance(0.01)
    assert got == [("big", 1.0), ("small", pytest.approx(1.01))]


@pytest.mark.asyncio
async def test_tpm_limits_tokens() -> None:
    time = FakeClock()
    limit = budget(time, tpm=60_000)  # 1000 tokens/s, burst 1000
    amounts = [300, 500, 200, 400, 700, 100, 1000, 50]
    stamps = []
    for amount in amounts:
        await limit.acquire(amount)
        stamps.append(time.now)
    assert stamps[:3] == [0.0, 0.0, 0.0]
    assert stamps[3] == pytest.approx(0.4)
    assert stamps[-1] == pytest.approx(sum(amounts) / 1000 - 1.0)
    assert_rate(stamps, [float(a) for a in amounts], burst=1000, rate=1000)


@pytest.mark.asyncio
async def test_both_limits_the_stricter_wins() -> None:
    time = FakeClock()
    limit = budget(time, rpm=60, tpm=60_000)  # 1 request/s, 1000 tokens/s
    for _ in range(4):
        await limit.acquire(10)
    assert time.now == pytest.approx(3.0)  # the request bucket held one
    await limit.acquire(1000)
    assert time.now == pytest.approx(4.0)
    await limit.acquire(1000)
    assert time.now == pytest.approx(5.0)


@pytest.mark.asyncio
async def test_settle_debt_delays_next_acquire() -> None:
    time = FakeClock()
    limit = budget(time, tpm=60_000)
    await limit.acquire(100)
    limit.settle(100, 2100)  # 2000 more than reserved: bucket at -1100
    await limit.acquire(100)
    assert time.now == pytest.approx(1.2)


@pytest.mark.asyncio
async def test_settle_refund_is_capped_at_capacity() -> None:
    time = FakeClock()
    limit = budget(time, tpm=60_000)
    await limit.acquire(1000)  # bucket empty
    limit.settle(1000, 200)  # refund 800
    await limit.acquire(800)
    assert time.now == 0.0
    limit.settle(5000, 0)  # a huge refund fills the bucket, no more
    await limit.acquire(1000)
    assert time.now == 0.0
    await limit.acquire(500)
    assert time.now == pytest.approx(0.5)


@pytest.mark.asyncio
async def test_settle_without_tpm_is_a_no_op() -> None:
    time = FakeClock()
    limit = budget(time, rpm=60)
    limit.settle(10, 10_000)
    await limit.acquire(10_000)
    assert time.sleeps == []


@pytest.mark.asyncio
async def test_oversize_request_waits_for_a_full_bucket_not_forever() -> None:
    time = FakeClock()
    limit = budget(time, tpm=60_000)  # capacity 1000
    await limit.acquire(500)
    await limit.acquire(5000)  # waits until full again, then goes into debt
    assert time.now == pytest.approx(0.5)
    await limit.acquire(1)  # the debt of 4000 plus one token
    assert time.now == pytest.approx(0.5 + 4.001)


@pytest.mark.asyncio
async def test_default_burst_is_a_tenth_of_a_second() -> None:
    time = FakeClock()
    limit = RateBudget(rpm=2160, tpm=None, clock=time, sleep=time.sleep)  # 36/s
    stamps = []
    for _ in range(200):
        await limit.acquire(0)
        stamps.append(time.now)
    assert stamps[:3] == [0.0] * 3
    assert stamps[3] > 0.0
    # Any sliding second holds at most 36 + 3.6: under a provider's 40/s.
    assert max(sum(1 for t in stamps if s <= t < s + 1.0) for s in stamps) <= 39
    assert_rate(stamps, [1.0] * 200, burst=3.6, rate=36)


@pytest.mark.asyncio
async def test_hold_banks_nothing_during_a_pause() -> None:
    time = FakeClock()
    limit = budget(time, rpm=600)  # 10/s, burst 10
    for _ in range(10):
        await limit.acquire(0)
    limit.hold(5.0)  # paused until t=5: no refill before, and the bucket restarts empty
    stamps = []
    for _ in range(10):
        await limit.acquire(0)
        stamps.append(time.now)
    assert stamps == pytest.approx([5.0 + 0.1 * (i + 1) for i in range(10)])


@pytest.mark.asyncio
async def test_hold_drops_an_unspent_burst_and_keeps_debt() -> None:
    time = FakeClock()
    limit = budget(time, tpm=60_000)  # 1000 tokens/s, burst 1000
    limit.settle(0, 3000)  # 2000 tokens of debt
    limit.hold(1.0)
    await limit.acquire(1)
    assert time.now == pytest.approx(1.0 + 2.001)  # no refill before 1.0, then the debt


@pytest.mark.asyncio
async def test_hold_wakes_a_sleeping_head_no_earlier() -> None:
    time = FakeClock(auto=False)
    limit = budget(time, rpm=60)  # 1/s, burst 1
    await limit.acquire(0)
    got: list[float] = []

    async def waiter() -> None:
        await limit.acquire(0)
        got.append(time.now)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(waiter)
        await settle()
        limit.hold(3.0)  # a pause begins while the head sleeps towards t=1
        for _ in range(5):
            time.advance(1.0)
            await settle()
    assert got == [4.0]


@pytest.mark.asyncio
async def test_disabled_budget_never_sleeps() -> None:
    time = FakeClock()
    limit = budget(time)
    assert not limit.enabled
    for _ in range(1000):
        await limit.acquire(1_000_000)
    limit.settle(0, 1_000_000)
    assert time.sleeps == []
    assert time.now == 0.0
    assert budget(time, rpm=1).enabled
    assert budget(time, tpm=1).enabled


@pytest.mark.asyncio
async def test_cancelled_head_takes_nothing_and_wakes_the_next() -> None:
    time = FakeClock(auto=False)
    limit = budget(time, rpm=60)  # 1/s, burst 1
    await limit.acquire(0)  # bucket now empty
    got: list[str] = []
    head = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(acquire_in, head, limit, got, "head")
        await settle()
        tg.start_soon(acquire_in, anyio.CancelScope(), limit, got, "second")
        await settle()
        head.cancel()  # the head is asleep on the clock
        await settle()
        time.advance(1.0)
        await settle()
        # Had the cancelled head taken the refilled request, "second" would wait till 2.0.
        assert got == ["second"]
    assert head.cancelled_caught


@pytest.mark.asyncio
async def test_cancelled_queued_waiter_leaves_the_queue() -> None:
    time = FakeClock(auto=False)
    limit = budget(time, rpm=60)
    await limit.acquire(0)
    got: list[str] = []
    middle = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(acquire_in, anyio.CancelScope(), limit, got, "first")
        await settle()
        tg.start_soon(acquire_in, middle, limit, got, "middle")
        await settle()
        tg.start_soon(acquire_in, anyio.CancelScope(), limit, got, "last")
        await settle()
        middle.cancel()  # queued behind the head, not sleeping
        await settle()
        time.advance(1.0)
        await settle()
        assert got == ["first"]
        time.advance(1.0)
    assert got == ["first", "last"]
    assert middle.cancelled_caught


@pytest.mark.parametrize(
    ("rpm", "tpm", "burst_seconds"),
    [
        (0, None, 1.0),
        (-1, None, 1.0),
        (None, float("nan"), 1.0),
        (None, float("inf"), 1.0),
        (60, None, 0.0),
        (60, None, -1.0),
    ],
)
def test_rate_budget_rejects_bad_settings(
    rpm: float | None, tpm: float | None, burst_seconds: float
) -> None:
    with pytest.raises(ValueError, match="must be"):
        budget(FakeClock(), rpm=rpm, tpm=tpm, burst_seconds=burst_seconds)


@pytest.mark.asyncio
async def test_negative_tokens_rejected() -> None:
    time = FakeClock()
    with pytest.raises(ValueError, match="tokens"):
        await budget(time, tpm=60).acquire(-1)


# --- PauseGate ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_gate_not_paused_returns_at_once() -> None:
    time = FakeClock()
    gate = PauseGate(clock=time.monotonic, sleep=time.sleep)
    await gate.wait()
    gate.pause_for(0)
    gate.pause_for(-3)
    gate.pause_for(float("nan"))
    await gate.wait()
    assert time.sleeps == []
    assert gate.pauses == 0
    assert gate.paused_seconds == 0.0


@pytest.mark.asyncio
async def test_gate_pause_extends_never_shortens() -> None:
    time = FakeClock()
    gate = PauseGate(clock=time.monotonic, sleep=time.sleep)
    gate.pause_for(10)
    time.now = 2.0
    gate.pause_for(3)  # ends at 5: shorter, ignored
    await gate.wait()
    assert time.now == pytest.approx(10.0)
    assert gate.pauses == 1


@pytest.mark.asyncio
async def test_gate_all_waiters_wait_until_the_deadline() -> None:
    time = FakeClock()
    gate = PauseGate(clock=time.monotonic, sleep=time.sleep)
    gate.pause_for(5)
    done: list[float] = []

    async def worker() -> None:
        await gate.wait()
        done.append(time.now)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(worker)
    assert done == pytest.approx([5.0] * 5)


@pytest.mark.asyncio
async def test_gate_waiters_follow_an_extension_made_while_asleep() -> None:
    time = FakeClock(auto=False)
    gate = PauseGate(clock=time.monotonic, sleep=time.sleep)
    gate.pause_for(5)
    done: list[float] = []

    async def worker() -> None:
        await gate.wait()
        done.append(time.now)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(worker)
        await settle()
        time.advance(3.0)
        gate.pause_for(10)  # now ends at 13
        time.advance(2.0)
        await settle()
        assert done == []
        time.advance(8.0)
    assert done == pytest.approx([13.0] * 3)
    assert gate.pauses == 1
    assert gate.paused_seconds == pytest.approx(13.0)


def test_gate_paused_seconds_counts_overlap_once() -> None:
    time = FakeClock()
    gate = PauseGate(clock=time.monotonic, sleep=time.sleep)
    gate.pause_for(10)  # [0, 10]
    time.now = 4.0
    assert gate.paused_seconds == pytest.approx(4.0)  # so far
    gate.pause_for(10)  # overlapping: [0, 14]
    time.now = 20.0
    assert gate.paused_seconds == pytest.approx(14.0)
    gate.pause_for(1)  # a new episode: [20, 21]
    time.now = 30.0
    gate.pause_for(2)  # another: [30, 32]
    time.now = 31.0
    assert gate.paused_seconds == pytest.approx(16.0)
    time.now = 100.0
    assert gate.paused_seconds == pytest.approx(17.0)
    assert gate.pauses == 3


@pytest.mark.asyncio
async def test_gate_cancelled_waiter_propagates() -> None:
    time = FakeClock(auto=False)
    gate = PauseGate(clock=time.monotonic, sleep=time.sleep)
    gate.pause_for(5)
    with anyio.move_on_after(0.01) as scope:
        await gate.wait()
    assert scope.cancelled_caught
