"""Tests of batchrun.concurrency: the AIMD controller and the adaptive FIFO limiter."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from batchrun.concurrency import AdaptiveLimiter, AIMDController
from tests.fakes import FakeClock


async def settle() -> None:
    """Let every runnable task run until it blocks."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


def controller(
    time: FakeClock | None = None,
    *,
    initial: int,
    minimum: int = 1,
    maximum: int,
    increase_every: int | None = None,
    decrease_factor: float = 0.5,
    cooldown: float = 1.0,
) -> AIMDController:
    return AIMDController(
        initial=initial,
        minimum=minimum,
        maximum=maximum,
        increase_every=increase_every,
        decrease_factor=decrease_factor,
        clock=(time or FakeClock()).monotonic,
        cooldown=cooldown,
    )


# --- AIMDController ---------------------------------------------------------------


def test_additive_increase_one_per_round_trip_up_to_maximum() -> None:
    aimd = controller(initial=2, maximum=5)
    seen = []
    for _ in range(30):
        aimd.on_success()
        seen.append(aimd.limit)
    # 2 successes at limit 2, then 3 at limit 3, then 4 at limit 4.
    assert seen[:9] == [2, 3, 3, 3, 4, 4, 4, 4, 5]
    assert seen[-1] == 5
    assert (aimd.low, aimd.high, aimd.decreases) == (2, 5, 0)


def test_additive_increase_every_n() -> None:
    aimd = controller(initial=1, maximum=100, increase_every=3)
    for _ in range(30):
        aimd.on_success()
    assert aimd.limit == 11


def test_multiplicative_decrease_floors_at_minimum() -> None:
    time = FakeClock()
    aimd = controller(time, initial=16, minimum=2, maximum=32)
    limits = []
    for _ in range(5):
        aimd.on_congestion()
        limits.append(aimd.limit)
        time.now += 1.0  # past the cooldown each time
    assert limits == [8, 4, 2, 2, 2]
    assert aimd.decreases == 5
    assert (aimd.low, aimd.high) == (2, 16)


def test_decrease_factor_rounds_down() -> None:
    aimd = controller(initial=10, maximum=10, decrease_factor=0.75)
    aimd.on_congestion()
    assert aimd.limit == 7


def test_burst_of_congestion_within_cooldown_is_one_decrease() -> None:
    time = FakeClock()
    aimd = controller(time, initial=32, maximum=64, cooldown=2.0)
    for _ in range(10):
        aimd.on_congestion()
        time.now += 0.1
    assert aimd.limit == 16
    assert aimd.decreases == 1
    time.now = 1.99  # still within 2 s of the decrease at 0
    aimd.on_congestion()
    assert aimd.limit == 16
    time.now = 2.0
    aimd.on_congestion()
    assert aimd.limit == 8
    assert aimd.decreases == 2


def test_zero_cooldown_decreases_every_time() -> None:
    aimd = controller(initial=64, maximum=64, cooldown=0.0)
    for _ in range(3):
        aimd.on_congestion()
    assert aimd.limit == 8


def test_congestion_restarts_the_increase_count() -> None:
    time = FakeClock()
    aimd = controller(time, initial=4, maximum=10)
    for _ in range(3):
        aimd.on_success()
    aimd.on_congestion()  # limit 2; the 3 successes no longer count
    aimd.on_success()
    assert aimd.limit == 2
    aimd.on_success()
    assert aimd.limit == 3
    assert (aimd.low, aimd.high) == (2, 4)


@pytest.mark.parametrize(
    ("initial", "minimum", "maximum", "expected"),
    [(100, 1, 10, 10), (0, 2, 10, 2), (-5, 1, 3, 1), (4, 4, 4, 4)],
)
def test_initial_is_clamped(initial: int, minimum: int, maximum: int, expected: int) -> None:
    aimd = controller(initial=initial, minimum=minimum, maximum=maximum)
    assert aimd.limit == aimd.low == aimd.high == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"minimum": 0},
        {"minimum": 5, "maximum": 4},
        {"increase_every": 0},
        {"decrease_factor": 1.0},
        {"decrease_factor": 0.0},
        {"cooldown": -1.0},
        {"cooldown": float("nan")},
    ],
)
def test_controller_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    settings: dict[str, Any] = {
        "initial": 4,
        "maximum": 8,
        "clock": FakeClock().monotonic,
        **kwargs,
    }
    with pytest.raises(ValueError, match=r"must be|need"):
        AIMDController(**settings)


def test_listeners_hear_each_change() -> None:
    time = FakeClock()
    aimd = controller(time, initial=2, maximum=3, increase_every=1)
    heard: list[int] = []
    aimd.add_listener(heard.append)
    aimd.on_success()
    aimd.on_success()  # already at maximum: no change, no call
    aimd.on_congestion()
    assert heard == [3, 1]


# --- AdaptiveLimiter ----------------------------------------------------------------


async def hold(limiter: AdaptiveLimiter, got: list[str], name: str, until: anyio.Event) -> None:
    """Take a slot, record ``name``, keep the slot until ``until`` is set."""
    async with limiter:
        got.append(name)
        await until.wait()


async def hold_in(
    scope: anyio.CancelScope,
    limiter: AdaptiveLimiter,
    got: list[str],
    name: str,
    until: anyio.Event,
) -> None:
    with scope:
        await hold(limiter, got, name, until)


@pytest.mark.asyncio
async def test_never_more_than_limit_in_flight() -> None:
    limiter = AdaptiveLimiter(controller(initial=7, maximum=7))
    current = 0
    peak = 0

    async def task(index: int) -> None:
        nonlocal current, peak
        async with limiter:
            current += 1
            peak = max(peak, current)
            assert limiter.in_flight <= 7
            for _ in range(index % 5 + 1):
                await anyio.lowlevel.checkpoint()
            current -= 1

    async with anyio.create_task_group() as tg:
        for index in range(300):
            tg.start_soon(task, index)
    assert peak == 7
    assert limiter.in_flight == 0
    assert limiter.waiting == 0


@pytest.mark.asyncio
async def test_grants_are_fifo_and_newcomers_queue_behind() -> None:
    limiter = AdaptiveLimiter(controller(initial=1, maximum=1))
    got: list[str] = []
    release = anyio.Event()
    await limiter.acquire()
    async with anyio.create_task_group() as tg:
        for index in range(10):
            tg.start_soon(hold, limiter, got, f"w{index}", release)
            await settle()  # each queues before the next arrives
        assert limiter.waiting == 10
        release.set()  # each waiter releases as soon as it gets in
        limiter.release()
    assert got == [f"w{index}" for index in range(10)]
    assert limiter.in_flight == 0


@pytest.mark.asyncio
async def test_free_slot_is_not_taken_by_a_newcomer_while_others_queue() -> None:
    aimd = controller(initial=1, maximum=2, increase_every=1)
    limiter = AdaptiveLimiter(aimd)
    got: list[str] = []
    release = anyio.Event()
    await limiter.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, limiter, got, "queued", release)
        await settle()
        aimd.on_success()  # limit 2: the queued waiter gets the new slot at once
        tg.start_soon(hold, limiter, got, "newcomer", release)
        await settle()
        assert got == ["queued"]
        assert limiter.in_flight == 2
        limiter.release()
        await settle()
        assert got == ["queued", "newcomer"]
        release.set()
    assert limiter.in_flight == 0


@pytest.mark.asyncio
async def test_shrunk_limit_grants_nothing_until_in_flight_below_it() -> None:
    aimd = controller(initial=4, maximum=4)
    limiter = AdaptiveLimiter(aimd)
    for _ in range(4):
        await limiter.acquire()
    aimd.on_congestion()
    assert limiter.limit == 2
    got: list[str] = []
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, limiter, got, "waiter", release)
        await settle()
        limiter.release()  # 3 in flight, limit 2
        await settle()
        limiter.release()  # 2 in flight, limit 2
        await settle()
        assert got == []
        assert limiter.in_flight == 2
        limiter.release()  # 1 in flight: room for one
        await settle()
        assert got == ["waiter"]
        assert limiter.in_flight == 2
        release.set()
    limiter.release()
    assert limiter.in_flight == 0


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_the_queue_without_a_slot() -> None:
    limiter = AdaptiveLimiter(controller(initial=1, maximum=1))
    got: list[str] = []
    release = anyio.Event()
    doomed = anyio.CancelScope()
    await limiter.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_in, doomed, limiter, got, "doomed", release)
        await settle()
        tg.start_soon(hold, limiter, got, "later", release)
        await settle()
        doomed.cancel()
        await settle()
        assert limiter.waiting == 1
        assert limiter.in_flight == 1
        release.set()
        limiter.release()
    assert got == ["later"]
    assert doomed.cancelled_caught
    assert limiter.in_flight == 0


@pytest.mark.asyncio
async def test_scope_cancelled_as_the_slot_is_granted_leaks_nothing() -> None:
    limiter = AdaptiveLimiter(controller(initial=1, maximum=1))
    got: list[str] = []
    release = anyio.Event()
    doomed = anyio.CancelScope()
    await limiter.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_in, doomed, limiter, got, "doomed", release)
        await settle()
        tg.start_soon(hold, limiter, got, "later", release)
        await settle()
        limiter.release()  # grants "doomed" ...
        doomed.cancel()  # ... whose scope is cancelled before it resumes
        await settle()
        # anyio may let "doomed" in and cancel it at its next checkpoint; either
        # way its slot comes back and "later" is served.
        assert got[-1:] == ["later"]
        assert limiter.in_flight == 1
        release.set()
    assert limiter.in_flight == 0


@pytest.mark.asyncio
async def test_task_cancelled_after_its_grant_passes_the_slot_on() -> None:
    # A native task.cancel() lands inside the granted waiter's Event.wait: the
    # path where acquire() must hand back a slot it was given but never used.
    limiter = AdaptiveLimiter(controller(initial=1, maximum=1))
    await limiter.acquire()
    doomed = asyncio.ensure_future(limiter.acquire())
    later = asyncio.ensure_future(limiter.acquire())
    await settle()
    assert limiter.waiting == 2
    limiter.release()  # grants "doomed" ...
    doomed.cancel()  # ... before it resumes
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await later  # the slot went on to the next in line
    assert limiter.in_flight == 1
    assert limiter.waiting == 0
    limiter.release()
    assert limiter.in_flight == 0


@pytest.mark.asyncio
async def test_cancelled_before_acquiring_takes_nothing() -> None:
    limiter = AdaptiveLimiter(controller(initial=1, maximum=1))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await limiter.acquire()
    assert scope.cancelled_caught
    assert limiter.in_flight == 0


@pytest.mark.asyncio
async def test_context_manager_releases_on_error() -> None:
    limiter = AdaptiveLimiter(controller(initial=2, maximum=2))

    async def fail_inside() -> None:
        async with limiter:
            assert limiter.in_flight == 1
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await fail_inside()
    assert limiter.in_flight == 0


def test_release_without_acquire_raises() -> None:
    limiter = AdaptiveLimiter(controller(initial=2, maximum=2))
    with pytest.raises(RuntimeError, match="without a held slot"):
        limiter.release()


def test_slow_start_grows_per_success_until_the_first_congestion() -> None:
    now = [0.0]
    controller = AIMDController(
        initial=2, maximum=64, clock=lambda: now[0], slow_start=True, cooldown=1.0
    )
    for _ in range(10):
        controller.on_success()
    assert controller.limit == 12
    controller.on_congestion()
    assert controller.limit == 6
    for _ in range(5):
        controller.on_success()
    assert controller.limit == 6  # additive now: one more per limit's worth of successes
    controller.on_success()
    assert controller.limit == 7


@pytest.mark.asyncio
async def test_fifo_slots_serve_waiters_in_order_and_never_leak_on_cancel() -> None:
    from batchrun.concurrency import FifoSlots

    slots = FifoSlots(1)
    await slots.acquire()  # a free slot: taken at once
    served: list[int] = []

    async def waiter(n: int) -> None:
        await slots.acquire()
        served.append(n)

    async with anyio.create_task_group() as tasks:
        for n in range(3):
            tasks.start_soon(waiter, n)
            await anyio.lowlevel.checkpoint()
        with anyio.CancelScope() as doomed:
            doomed.cancel()
            await slots.acquire()  # cancelled in the queue: leaves it, takes nothing
        for _ in range(3):
            slots.release()
            await anyio.lowlevel.checkpoint()
    assert served == [0, 1, 2]
    slots.release()
    await slots.acquire()  # exactly one slot is free again: nothing leaked


def test_slow_start_with_a_ramp_multiplies_per_round_trip() -> None:
    controller = AIMDController(
        initial=32, maximum=2000, clock=lambda: 0.0, slow_start=True, ramp=7
    )
    for _ in range(32):
        controller.on_success()
    assert controller.limit == 256  # eightfold in one round trip
    for _ in range(256):
        controller.on_success()
    assert controller.limit == 2000  # never above the maximum


def test_ramp_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ramp"):
        AIMDController(initial=1, maximum=2, clock=lambda: 0.0, ramp=0)
