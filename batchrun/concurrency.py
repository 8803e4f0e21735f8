"""Adaptive concurrency: how many requests may be in flight at once.

``AIMDController`` decides the limit the way TCP sizes its window: one more
slot per round trip's worth of successes, half the slots on congestion (429,
503, timeouts). ``AdaptiveLimiter`` enforces whatever the limit currently is,
handing out slots in arrival order. Everything here runs on the event loop's
thread: no locking.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from types import TracebackType

import anyio
import anyio.lowlevel

__all__ = ["AIMDController", "AdaptiveLimiter", "FifoSlots"]


class AIMDController:
    """Additive-increase / multiplicative-decrease of the in-flight limit.

    The limit starts at ``initial`` clamped to [``minimum``, ``maximum``].
    Every ``increase_every`` successes (default: the current limit, i.e. one
    more slot per round trip's worth) it grows by one, up to ``maximum``.
    Congestion sets it to ``max(minimum, floor(limit * decrease_factor))``;
    further signals within ``cooldown`` seconds (by ``clock``, monotonic) of
    that decrease are the same congestion event and change nothing, because
    the requests already in flight when the server pushed back report it too.

    With ``slow_start`` the limit first grows by ``ramp`` per success (so it
    multiplies by ``ramp + 1`` each round trip; ``ramp=1`` doubles it, as
    TCP's slow start does) until the first congestion.
    ``increase_interval`` (seconds) spaces additive increases out in time:
    providers count quotas per second or minute, not per round trip, so with
    fast answers one increase per round trip would overrun a quota again
    within a fraction of a second.

    ``low`` and ``high`` are the range the limit has taken (for the summary);
    ``decreases`` counts congestion events acted on, including ones that
    found the limit already at ``minimum``.
    """

    def __init__(
        self,
        *,
        initial: int,
        minimum: int = 1,
        maximum: int,
        increase_every: int | None = None,
        decrease_factor: float = 0.5,
        clock: Callable[[], float],
        cooldown: float = 1.0,
        slow_start: bool = False,
        ramp: int = 1,
        increase_interval: float = 0.0,
    ) -> None:
        if minimum < 1 or maximum < minimum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum!r}, {maximum!r}")
        if increase_every is not None and increase_every < 1:
            raise ValueError(f"increase_every must be >= 1 or None, got {increase_every!r}")
        if not 0 < decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {decrease_factor!r}")
        if ramp < 1:
            raise ValueError(f"ramp must be >= 1, got {ramp!r}")
        if not cooldown >= 0:
            raise ValueError(f"cooldown must be >= 0 seconds, got {cooldown!r}")
        self.minimum = minimum
        self.maximum = maximum
        self.increase_every = increase_every
        self.decrease_factor = decrease_factor
        self.cooldown = cooldown
        self._clock = clock
        self._limit = min(max(initial, minimum), maximum)
        self.low = self._limit
        self.high = self._limit
        self.decreases = 0
        self._successes = 0
        self._slow_start = slow_start
        self.ramp = ramp
        self.increase_interval = increase_interval
        self._last_increase = -math.inf
        self._last_decrease = -math.inf
        self._listeners: list[Callable[[int], None]] = []

    @property
    def limit(self) -> int:
        """The current in-flight limit."""
        return self._limit

    def add_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(new_limit)`` whenever the limit changes."""
        self._listeners.append(callback)

    def on_success(self) -> None:
        """Count one success; grow the limit by one when enough have come.

        In slow start (until the first congestion) every success adds
        ``ramp``, so the limit multiplies per round trip instead of growing by one.
        """
        if self._slow_start:
            if self._limit < self.maximum:
                self._set(min(self.maximum, self._limit + self.ramp))
            return
        self._successes += 1
        if self._successes < (self.increase_every or self._limit):
            return
        now = self._clock()
        if now - self._last_increase < self.increase_interval:
            return
        self._successes = 0
        self._last_increase = now
        if self._limit < self.maximum:
            self._set(self._limit + 1)

    @property
    def slow_start(self) -> bool:
        """Whether the limit is still ramping (no congestion seen yet)."""
        return self._slow_start

    def widen(self) -> None:
        """In slow start, take the step a round trip of successes would take:
        the limit multiplies by ``ramp + 1``, up to ``maximum``."""
        if self._slow_start:
            self._set(min(self.maximum, self._limit * (self.ramp + 1)))

    def on_congestion(self, ceiling: int | None = None) -> None:
        """The server pushed back (429, 503, a timeout): shrink the limit,
        unless this is the same congestion event as a decrease under
        ``cooldown`` seconds ago. ``ceiling``, when known, is the concurrency
        the provider was seen to sustain: the limit drops to it if lower."""
        now = self._clock()
        if now - self._last_decrease < self.cooldown:
            return
        self._last_decrease = now
        self._slow_start = False
        self.decreases += 1
        # Successes counted towards the next increase were earned at the old limit.
        self._successes = 0
        target = math.floor(self._limit * self.decrease_factor)
        if ceiling is not None:
            target = min(target, ceiling)
        self._set(max(self.minimum, target))

    def _set(self, limit: int) -> None:
        if limit == self._limit:
            return
        self._limit = limit
        self.low = min(self.low, limit)
        self.high = max(self.high, limit)
        for callback in self._listeners:
            callback(limit)


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


async def _wait_for_grant(
    waiters: collections.deque[_Waiter], give_back: Callable[[], None]
) -> None:
    """Queue up and wait until a releaser grants this waiter a slot.

    A waiter cancelled in the queue leaves it; one cancelled just as it was
    granted gives the slot back (``give_back``), so no slot ever leaks.
    """
    waiter = _Waiter()
    waiters.append(waiter)
    try:
        await waiter.event.wait()
    except BaseException:
        if waiter.granted:
            give_back()
        else:
            waiters.remove(waiter)
        raise


class AdaptiveLimiter:
    """An async slot limiter whose capacity follows a controller's limit.

    FIFO: waiters are served in arrival order, and a newcomer never overtakes
    a queued waiter, so the ordered output never starves behind newer rows.
    When the limit shrinks, slots already held stay held (``in_flight`` may
    exceed the limit for a while) and no new slot is granted until
    ``in_flight`` is below the limit again. Use ``async with limiter:`` or
    pair ``acquire`` with ``release``.
    """

    def __init__(self, controller: AIMDController) -> None:
        self._controller = controller
        self._in_flight = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        # Set the first time a task has to queue: more rows than the limit.
        self.saturated = anyio.Event()
        # A grown limit must wake waiters even if no slot is released soon.
        controller.add_listener(lambda _limit: self._grant())

    @property
    def in_flight(self) -> int:
        """Slots held now (granted waiters included)."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Tasks queued for a slot."""
        return len(self._waiters)

    @property
    def limit(self) -> int:
        """The controller's current limit."""
        return self._controller.limit

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody queues for it; never waits."""
        if not self._waiters and self._in_flight < self._controller.limit:
            self._in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot and take it.

        Cancellation-safe: a cancelled waiter leaves the queue, and a slot
        granted to it at the moment it was cancelled is passed on, not leaked.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self._in_flight < self._controller.limit:
            self._in_flight += 1
            # Yield to other tasks without letting a cancellation strand the slot.
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        self.saturated.set()
        await _wait_for_grant(self._waiters, self.release)

    def release(self) -> None:
        """Give a slot back and grant slots to the next waiters the limit allows.

        Raises RuntimeError when no slot is held.
        """
        if self._in_flight <= 0:
            raise RuntimeError("AdaptiveLimiter.release() without a held slot")
        self._in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        # Slots are counted as taken when granted, not when the waiter
        # resumes, so two releases can never hand the same slot out twice.
        while self._waiters and self._in_flight < self._controller.limit:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self._in_flight += 1
            waiter.event.set()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class FifoSlots:
    """A fixed number of slots, handed out first come, first served.

    Taking a free slot does not yield to the event loop: cheap enough to
    pay once per row. A released slot goes straight to the longest waiter.
    """

    # Kept over anyio.Semaphore(fast_acquire=True) (anyio >= 4.5), measured on
    # 2 shared cores. Its semantics match (FIFO hand-off, no overtaking, no
    # leak on cancel) but for a cancellation check on the free path, and built
    # outside an event loop it drops fast_acquire. A free slot, the reorder
    # window's usual case (10,000 slots, max_async workers), costs 0.6-0.8 us
    # here against 2.5-4.4 us (acquire + release, asyncio and uvloop); only a
    # full window, held up behind a slow row anyway, hands off faster there
    # (11-18 us against 24-36 us, 64 tasks on 16 slots). Benchmark
    # (-m benchmarks.run --scenarios ab --clients batchrun,bare --reps 3, run
    # twice each): batchrun vs bare rows/s a 0.66/0.50 before, 0.48/0.47 after;
    # b 0.59/0.73 before, 0.64/0.54 after: no gain beyond the noise.

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[_Waiter] = collections.deque()

    async def acquire(self) -> None:
        """Take a slot, waiting for one if none is free. Cancellation-safe."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        await _wait_for_grant(self._waiters, self.release)

    def release(self) -> None:
        """Give a slot back, to the longest waiter if there is one."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            self._free += 1
