"""When a request may go, and what each answer teaches about the provider.

Three gates in this order, then the request:

1. the pause gate: when answers show congestion, the server's
   ``Retry-After`` pauses every worker, so the whole run backs off instead of
   a thundering herd (a lone 429 only delays its own row's retry);
2. the rate budget: ``--rpm`` / ``--tpm``, spread smoothly over the minute,
   banking nothing during a pause;
3. the adaptive in-flight limit: starts at ``INITIAL_CONCURRENCY``, grows
   sixteenfold per round trip while answers are good, halves when 429s, 503s
   and timeouts are a share of the recent answers (AIMD; see
   ``congestion``), never above ``--max-async-requests``; slots go first
   come, first served.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import NamedTuple

from batchrun.concurrency import AdaptiveLimiter, AIMDController
from batchrun.config import RunConfig
from batchrun.congestion import RecentAnswers
from batchrun.errors import FatalError, RequestError
from batchrun.ratelimit import Budget, PauseGate, RateBudget
from batchrun.timing import Clock, Sleep

# In-flight requests allowed before the provider has answered anything: a
# bad key or an overloaded server hears from few requests.
INITIAL_CONCURRENCY = 16

# Slots each good answer adds until the first congestion: the limit grows
# sixteenfold per round trip, 16 -> 256 -> 4,096, so a healthy provider
# sees any limit up to 4,096 within two round trips. The start stays low
# because whatever is in flight when a rate limiter's quota runs out is
# rejected at once: 32 would double that first burst against a small quota.
RAMP = 15

# Seconds of silence after which the requests in flight count as accepted.
# A provider refuses at once (a 429 from its limiter, a 401 for a bad key)
# but answers only when the model is done, seconds later: a quarter second
# without any answer while every slot is taken means the requests are being
# worked on. The ramp then takes its step without waiting for the answers,
# so slow answers do not hold a wide job at 16 for a whole round trip.
QUIET_S = 0.25

# Quiet steps at most (16 -> 256 -> 4,096 takes two); the watch ends after them.
_QUIET_STEPS = 4

# Weight of each new answer in the moving average of latency.
_LATENCY_WEIGHT = 0.1

# Seconds between additive increases once the provider has pushed back once.
INCREASE_INTERVAL = 1.0

# Answers that mean "slow down", as opposed to "this row is wrong".
_CONGESTION_STATUSES = frozenset({429, 503})
_CONGESTION_CODES = frozenset({"read_timeout", "connect_timeout", "write_timeout"})


class Ticket(NamedTuple):
    """A request's place, from ``Throttle.acquire``: when it went out
    (monotonic seconds) and its rank among the run's sends."""

    started: float
    rank: int


class Throughput:
    """Answers per second over the last second, and their mean latency.

    By Little's law their product is the concurrency the provider sustained:
    after a 429 the limit drops straight to it, instead of halving blindly
    from an overshoot again and again.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._answers: collections.deque[float] = collections.deque()
        self._latency = 0.0  # seconds, moving average

    def start(self) -> float:
        return self._clock()

    def finish(self, started: float) -> None:
        """Count a good answer to a request sent at ``started``."""
        now = self._clock()
        self._latency += (now - started - self._latency) * _LATENCY_WEIGHT
        answers = self._answers
        answers.append(now)
        while answers[0] < now - 1.0:
            answers.popleft()

    @property
    def latency(self) -> float:
        """Mean latency of good answers, seconds (0 before any)."""
        return self._latency

    def sustained_concurrency(self) -> int | None:
        """Requests in flight that the last second's answers sustained; None
        before any answer."""
        if not self._answers:
            return None
        recent = sum(1 for when in self._answers if when >= self._clock() - 1.0)
        return max(1, math.ceil(recent * self._latency))


class Throttle:
    """The run's pause gate, rate budget and adaptive limit, with their counts."""

    def __init__(self, config: RunConfig, clock: Clock, budget: Budget | None = None) -> None:
        """``budget``: one shared with other processes; default this process's own."""
        limits = config.limits
        self.gate = PauseGate(clock=clock.monotonic, sleep=clock.sleep)
        self.budget: Budget = budget or RateBudget(
            rpm=limits.rpm, tpm=limits.tpm, clock=clock.monotonic, sleep=clock.sleep
        )
        # The most one answer's usage may put the token budget in debt past its
        # estimate: a minute of --tpm (a provider refuses a request larger than
        # its own limit), so a count a broken server inflates delays the run by
        # a minute, not the hours 100,000,000 tokens take at a small --tpm.
        self._max_debt = math.ceil(limits.tpm) if limits.tpm else 0
        initial = (
            min(limits.max_async, INITIAL_CONCURRENCY) if limits.adaptive else limits.max_async
        )
        self.controller = AIMDController(
            initial=initial,
            maximum=limits.max_async,
            clock=clock.monotonic,
            slow_start=True,
            ramp=RAMP,
            increase_interval=INCREASE_INTERVAL,
        )
        self.limiter = AdaptiveLimiter(self.controller)
        self._adaptive = limits.adaptive
        self._pause_cap = config.retry.backoff_max
        self._throughput = Throughput(clock.monotonic)
        self._recent = RecentAnswers()
        self.rate_limited = 0
        self._failures = 0  # failed attempts so far
        self._tripped: FatalError | None = None
        self.reached = False  # the provider answered this run once (any HTTP status)

    @property
    def counts_tokens(self) -> bool:
        """Whether requests need a token estimate (a tokens-per-minute budget is set)."""
        return self.budget.enabled

    async def acquire(self, estimate: int) -> Ticket:
        """Wait for a place for one request costing about ``estimate`` tokens;
        return its ticket, for ``release`` and ``failed``. Cheap when nothing
        limits."""
        gate = self.gate
        if gate.paused:
            await gate.wait()
        if self.budget.enabled:
            await self.budget.acquire(estimate)
        if not self.limiter.try_acquire():
            await self.limiter.acquire()
        try:
            if gate.paused:  # a pause may have begun while this waited
                await gate.wait()
            self._raise_if_tripped()
        except BaseException:
            self.limiter.release()
            raise
        # ``Ticket(...)`` without the NamedTuple's Python-level constructor: one per send.
        return tuple.__new__(Ticket, (self._throughput.start(), self._recent.sent()))

    def release(self, ticket: Ticket, *, answered: bool) -> None:
        """Give the place back; ``answered``: a good answer came."""
        self.limiter.release()
        if answered:
            self._throughput.finish(ticket.started)
            self._recent.good(sent_at=ticket.rank)

    async def widen_while_quiet(self, sleep: Sleep) -> None:
        """From the moment rows first queue for a slot until the first answer,
        every ``QUIET_S`` seconds in which rows queued and nothing failed take
        one step of the ramp (see ``QUIET_S``). Ends at the first answer, at
        congestion, at the limit or after ``_QUIET_STEPS`` steps; does nothing
        under --no-adaptive-concurrency."""
        controller = self.controller
        if not self._adaptive:
            return
        await self.limiter.saturated.wait()  # no clock runs before rows queue
        for _ in range(_QUIET_STEPS):
            failures = self._failures
            await sleep(QUIET_S)
            answered = self._recent.good_seen
            if answered or not controller.slow_start or controller.limit >= controller.maximum:
                return
            if self._failures == failures and self.limiter.waiting:
                controller.widen()

    def _raise_if_tripped(self) -> None:
        """The circuit breaker: after one fatal answer, no request goes out."""
        fatal = self._tripped
        if fatal is not None:
            raise FatalError(fatal.code, fatal.message, status=fatal.status, body=fatal.body)

    def succeeded(self, estimate: int, used: int) -> None:
        """A good answer that used ``used`` tokens in all."""
        self.reached = True
        if self.budget.enabled:
            if self._max_debt:
                used = min(used, estimate + self._max_debt)
            self.budget.settle(estimate, used)
        self.controller.on_success()

    def failed(self, error: RequestError, *, sent: Ticket | None = None) -> float:
        """A failed attempt: stop every request if the answer was fatal; cut
        the limit and pause everyone if the recent answers show congestion.

        Until the provider has answered well once, a ``Retry-After`` is all
        that is known of it, so it pauses everyone; after that a lone
        push-back only delays its own row (its retry waits). ``sent`` is
        the attempt's ticket from ``acquire`` (None: unknown, taken as the
        latest send): a push-back in under the mean latency of good answers is a
        limiter's rejection on arrival. Returns the
        seconds the attempt's place stays taken: for a push-back, the mean
        latency of good answers, so an overrun limiter's instant 429s do not
        free places for yet more requests faster than answers would.
        """
        self._failures += 1
        if error.status is not None:
            self.reached = True
        if isinstance(error, FatalError) and self._tripped is None:
            self._tripped = error
        if error.status == 429:
            self.rate_limited += 1
        congested, hold = False, 0.0
        if error.status in _CONGESTION_STATUSES or error.code in _CONGESTION_CODES:
            now = self._throughput.start()
            if sent is None:  # unknown: the cautious reading, sent just now
                sent = Ticket(now, self._recent.sends + 1)
            instant = now - sent.started < self._throughput.latency
            congested = self._recent.pushed_back(sent.rank if instant else None)
            hold = self._throughput.latency
        if congested and self._adaptive:  # --no-adaptive-concurrency pins the limit at the cap
            self.controller.on_congestion(self._throughput.sustained_concurrency())
        if error.retry_after and (congested or not self._recent.good_seen):
            self.gate.pause_for(min(error.retry_after, self._pause_cap))
            if self.budget.enabled:  # nothing banked while paused: no burst after it
                self.budget.hold(self.gate.until)
        return hold

    def level(self) -> str:
        """The current in-flight limit, for the progress line."""
        return f"concurrency {self.controller.limit}"

    def gauges(self) -> dict[str, float]:
        """Live figures for the metrics file."""
        return {
            "concurrency_limit": self.controller.limit,
            "paused_seconds": self.gate.paused_seconds,
            "rate_limited": self.rate_limited,
        }

    def report(self) -> dict[str, object]:
        """Figures for the summary."""
        return {
            "rate limited (429)": self.rate_limited,
            "paused s": round(self.gate.paused_seconds, 1),
            "pauses": self.gate.pauses,
            "concurrency": f"{self.controller.low}-{self.controller.high}",
            **self.budget.report(),
        }
