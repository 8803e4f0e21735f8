"""Deadlines of one length on one timer (``batchrun.deadlines``): each task
cut at its own time, outer cancellation kept, the queue bounded."""

from __future__ import annotations

import asyncio
import random

import pytest

from batchrun.deadlines import FifoDeadlines


async def _bounded(deadlines: FifoDeadlines, work: float) -> str:
    """What an attempt does with its deadline: ``timeout`` when it cut the work."""
    deadline = deadlines.start()
    try:
        await asyncio.sleep(work)
        return "done"
    except asyncio.CancelledError:
        if deadlines.timed_out(deadline):
            return "timeout"
        raise
    finally:
        deadlines.finish(deadline)


@pytest.mark.asyncio
async def test_each_task_is_cut_at_its_own_deadline_and_no_sooner() -> None:
    deadlines = FifoDeadlines(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    works = [0.05, 5.0, 0.1, 5.0, 0.0]
    results = await asyncio.gather(*(_bounded(deadlines, w) for w in works))
    assert results == ["done", "timeout", "done", "timeout", "done"]
    assert 0.19 <= loop.time() - started < 1.0
    assert deadlines._timer is None  # nothing pending: no timer left behind


@pytest.mark.asyncio
async def test_later_deadlines_fire_in_their_turn() -> None:
    deadlines = FifoDeadlines(0.15)
    loop = asyncio.get_running_loop()
    ended: dict[int, float] = {}

    async def staggered(number: int) -> None:
        await asyncio.sleep(0.05 * number)
        assert await _bounded(deadlines, 5.0) == "timeout"
        ended[number] = loop.time()

    started = loop.time()
    await asyncio.gather(*(staggered(n) for n in range(4)))
    for number, at in ended.items():
        assert at - started == pytest.approx(0.05 * number + 0.15, abs=0.05)


@pytest.mark.asyncio
async def test_an_outer_cancel_propagates_even_when_the_deadline_fired_too() -> None:
    deadlines = FifoDeadlines(0.05)
    task = asyncio.create_task(_bounded(deadlines, 5.0))
    await asyncio.sleep(0.01)
    task.cancel()  # before the deadline
    with pytest.raises(asyncio.CancelledError):
        await task

    assert deadlines._timer is None


class _CancelledAsItFires(FifoDeadlines):
    """Deadlines whose timer also cancels ``victim``: both cancellations pending."""

    victim: asyncio.Task[str] | None = None

    def _expire(self) -> None:
        super()._expire()
        assert self.victim is not None
        self.victim.cancel()


@pytest.mark.asyncio
async def test_an_outer_cancel_with_the_deadline_is_not_taken_for_a_timeout() -> None:
    deadlines = _CancelledAsItFires(0.05)
    deadlines.victim = asyncio.create_task(_bounded(deadlines, 5.0))
    with pytest.raises(asyncio.CancelledError):
        await deadlines.victim
    assert deadlines._timer is None


@pytest.mark.asyncio
async def test_finished_deadlines_behind_a_slow_head_do_not_pile_up() -> None:
    deadlines = FifoDeadlines(60.0)
    head = deadlines.start()  # a slow row at the head of the queue
    rng = random.Random(5)
    live = []
    for _ in range(20_000):
        live.append(deadlines.start())
        while len(live) > 64 or (live and rng.random() < 0.5):
            deadlines.finish(live.pop(rng.randrange(len(live))))
        assert len(deadlines._queue) <= 2 * (len(live) + 1) + 1024
    for entry in [*live, head]:
        deadlines.finish(entry)
    assert not deadlines._queue
    assert deadlines._timer is None


def test_one_set_of_deadlines_serves_one_event_loop_after_another() -> None:
    """A client outlives a loop in the Python API's repeated runs: once
    idle, its deadlines work on the next loop."""
    deadlines = FifoDeadlines(0.05)
    for _ in range(2):
        assert asyncio.run(_bounded(deadlines, 5.0)) == "timeout"
        assert asyncio.run(_bounded(deadlines, 0.0)) == "done"
