"""Client-side rate budgets and server-requested pauses.

``RateBudget`` keeps a run under its requests-per-minute and tokens-per-minute
limits, spread smoothly instead of in per-minute bursts, with a burst
tolerance of a tenth of a second and nothing banked while paused.
``PauseGate`` makes every worker honour a server's pause (read by
``rateheaders.pause_hint``), not only the one that was told.

Time is injected: ``clock`` returns monotonic seconds and ``sleep`` waits a
number of seconds, so tests run on fake time and never really wait. Everything
here runs on the event loop's thread: no locking.
"""

from __future__ import annotations

import collections
import math
from typing import Protocol

import anyio

from batchrun.timing import Monotonic, Sleep

__all__ = ["Budget", "PauseGate", "RateBudget"]


# Shortfalls under a microsecond count as none: after sleeping exactly the
# computed delay, float rounding can leave a sliver that would otherwise ask
# for a sleep too short to move a (fake) clock at all.
_SLACK_S = 1e-6

# Burst tolerance of a limit, in seconds of its rate. Providers count over a
# sliding second and refuse anything above the rate: a bucket holding a whole
# second would send up to twice the rate in some second, so it holds a tenth.
BURST_SECONDS = 0.1


class Budget(Protocol):
    """What the throttle needs of a rate budget: this process's ``RateBudget``,
    or one shared by many processes (``batchrun.sharedlimits``)."""

    @property
    def enabled(self) -> bool: ...

    async def acquire(self, tokens: int) -> None:
        """Wait until one request and ``tokens`` estimated tokens may go."""

    def settle(self, estimated: int, actual: int) -> None:
        """Correct an estimate once the real usage is known."""

    def hold(self, until: float) -> None:
        """A server asked for a pause until ``until`` (monotonic seconds)."""

    def report(self) -> dict[str, object]:
        """Figures for the summary."""


class _Bucket:
    """A continuously refilling bucket: ``rate`` units per second up to ``capacity``.

    The level may go negative: that is debt (an oversize take, or usage above
    its estimate) which later takes wait out before they fit. ``stamp`` may
    lie in the future (see ``hold``): nothing refills before it.
    """

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float, burst_seconds: float, now: float) -> None:
        self.rate = per_minute / 60.0
        # At least one unit, so a single request always fits a full bucket.
        self.capacity = max(self.rate * burst_seconds, 1.0)
        self.level = self.capacity  # start full: the first burst goes at once
        self.stamp = now

    def refill(self, now: float) -> None:
        if now <= self.stamp:
            return  # held: nothing is banked before the stamp
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until ``amount`` fits (after ``refill``). More
        than the capacity fits once the bucket is full, so nothing waits forever."""
        shortfall = min(amount, self.capacity) - self.level
        if shortfall <= 0:
            return 0.0
        return max(0.0, self.stamp - now) + shortfall / self.rate

    def hold(self, now: float, until: float) -> None:
        """Bank nothing before ``until``: from then on the bucket refills from empty."""
        self.refill(now)
        self.level = min(self.level, 0.0)
        self.stamp = max(self.stamp, until)

    def adjust(self, used: float) -> None:
        """Take ``used`` units (negative gives them back, never above capacity)."""
        self.level = min(self.capacity, self.level - used)


class RateBudget:
    """Client-side requests-per-minute and tokens-per-minute limits.

    Each limit is a continuously refilling bucket holding ``burst_seconds``
    worth of its rate (at least one unit), so the budget is spread smoothly
    over the minute: in any window of ``w`` seconds at most ``rate * (w +
    burst_seconds)`` (plus one oversize request) goes out. Waiters are served
    strictly in arrival order; only the head of the queue sleeps on the clock.
    A disabled budget (``rpm`` and ``tpm`` both None) never waits.
    """

    def __init__(
        self,
        *,
        rpm: float | None,
        tpm: float | None,
        clock: Monotonic,
        sleep: Sleep,
        burst_seconds: float = BURST_SECONDS,
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if not (burst_seconds > 0 and math.isfinite(burst_seconds)):
            raise ValueError(f"burst_seconds must be > 0, got {burst_seconds!r}")
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._requests = None if rpm is None else _Bucket(rpm, burst_seconds, now)
        self._tokens = None if tpm is None else _Bucket(tpm, burst_seconds, now)
        # One event per waiter, in arrival order; the head's is set (or it
        # never needed to wait) and only the head may take from the buckets.
        self._queue: collections.deque[anyio.Event] = collections.deque()

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return self._requests is not None or self._tokens is not None

    async def acquire(self, tokens: int) -> None:
        """Wait until one request and ``tokens`` tokens fit, then take them.

        ``tokens`` is the estimate to reserve (see ``batchrun.tokens``); call
        ``settle`` once the real usage is known. A request bigger than a
        bucket goes once that bucket is full and leaves it in debt.
        Cancellation-safe: a cancelled waiter takes nothing and leaves the
        queue, waking the next in line. Raises ValueError for ``tokens < 0``.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens!r}")
        if not self.enabled:
            return
        turn = anyio.Event()
        self._queue.append(turn)
        try:
            if self._queue[0] is not turn:
                await turn.wait()
            # Re-check after every sleep: settle() may have added debt meanwhile.
            while (delay := self._delay(tokens)) > _SLACK_S:
                await self._sleep(delay)
            # No await between the last check and the take: a cancellation
            # lands either before (nothing taken) or after (all taken).
            self._take(tokens)
        finally:
            self._leave(turn)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once a request's real usage is known.

        ``actual - estimated`` tokens are taken (positive: debt that delays
        later acquires) or given back (negative: a refund, the bucket never
        exceeding its capacity). No-op without a tokens-per-minute limit. A
        refund does not wake a head already sleeping; it just finds more room.
        """
        if self._tokens is None:
            return
        self._tokens.refill(self._clock())
        self._tokens.adjust(actual - estimated)

    def hold(self, until: float) -> None:
        """Bank nothing before ``until`` (monotonic seconds), as during a
        server-requested pause: the buckets then refill from empty, so the
        pause ends at the steady rate, not in a burst that earns the next 429.
        Debt is kept. A sleeping head re-checks on waking and sleeps on."""
        now = self._clock()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.hold(now, until)

    def report(self) -> dict[str, object]:
        """Figures for the summary: none of its own."""
        return {}

    def _delay(self, tokens: int) -> float:
        now = self._clock()
        delay = 0.0
        if self._requests is not None:
            self._requests.refill(now)
            delay = self._requests.delay(1, now)
        if self._tokens is not None:
            self._tokens.refill(now)
            delay = max(delay, self._tokens.delay(tokens, now))
        return delay

    def _take(self, tokens: int) -> None:
        if self._requests is not None:
            self._requests.adjust(1)
        if self._tokens is not None:
            self._tokens.adjust(tokens)

    def _leave(self, turn: anyio.Event) -> None:
        if self._queue[0] is turn:
            self._queue.popleft()
            if self._queue:
                self._queue[0].set()  # the next in line becomes head
        else:
            self._queue.remove(turn)


class PauseGate:
    """One Retry-After pauses every worker, not just the one that got it.

    Workers call ``wait()`` before each request; whoever learns of a pause
    calls ``pause_for``. ``paused_seconds`` and ``pauses`` feed the summary.
    """

    def __init__(self, *, clock: Monotonic, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        # The current (or last) pause episode is [_start, _until]; earlier
        # episodes are folded into _closed_s.
        self._start = -math.inf
        self._until = -math.inf
        self._closed_s = 0.0
        self._pauses = 0

    def pause_for(self, seconds: float) -> None:
        """Pause until ``seconds`` from now, unless already paused for longer:
        a pause is extended, never shortened. Non-positive or NaN: no-op."""
        if not seconds > 0:
            return
        now = self._clock()
        end = now + seconds
        if end <= self._until:
            return
        if now >= self._until:  # not paused: a new episode begins
            if self._pauses:
                self._closed_s += self._until - self._start
            self._start = now
            self._pauses += 1
        self._until = end

    @property
    def until(self) -> float:
        """When the current (or last) pause ends, in monotonic seconds;
        ``-inf`` before any pause."""
        return self._until

    @property
    def paused(self) -> bool:
        """Whether a pause is on now."""
        return self._until - self._clock() > _SLACK_S

    async def wait(self) -> None:
        """Return at once when not paused; else sleep until the deadline,
        following any extension made meanwhile. Cancellation propagates."""
        while (delay := self._until - self._clock()) > _SLACK_S:
            await self._sleep(delay)

    @property
    def paused_seconds(self) -> float:
        """Wall time spent paused so far, in seconds: the union of the pause
        intervals (overlaps count once), the current one up to now."""
        if not self._pauses:
            return 0.0
        current = min(self._clock(), self._until) - self._start
        return self._closed_s + max(0.0, current)

    @property
    def pauses(self) -> int:
        """Pause episodes: pauses begun while not paused (extensions don't count)."""
        return self._pauses
