"""One row to its outcome: throttled attempts, retried while transient."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from batchrun.client import Client, OutOfTime
from batchrun.config import RetryPolicy
from batchrun.errors import NEVER_SENT, FatalError, RequestError, TransientError
from batchrun.providers import Provider
from batchrun.records import NOT_PARSED, Outcome, Request, Response, failed_outcome
from batchrun.retry import budget_note, retrying
from batchrun.schema import AnswerCheck
from batchrun.stats import RunStats
from batchrun.throttle import Throttle, Ticket
from batchrun.timing import Clock
from batchrun.tokens import estimate_tokens


class RowSender:
    """Sends rows through the throttle and the client, with the retry policy."""

    def __init__(
        self,
        client: Client,
        provider: Provider,
        throttle: Throttle,
        retry: RetryPolicy,
        *,
        clock: Clock,
        stats: RunStats,
        answers: AnswerCheck | None = None,
    ) -> None:
        """``answers``: the response-schema check each good answer must pass."""
        self.client = client
        self.answers = answers
        self.provider = provider
        self.throttle = throttle
        self.retry = retry
        self.clock = clock
        self.stats = stats
        # Told +1 when a row starts waiting for a retry and -1 when it is done.
        self.on_backoff: Callable[[int], None] = _ignore
        # Told a row's line just before an attempt's first byte is written
        # (the first attempt's, and any after ``on_unpaid``): a row stopped
        # while it waited or connected reached nobody.
        self.on_send: Callable[[int], None] = _ignore
        # Told a row's line when an attempt got an error answer (an HTTP
        # status of 400 or more) or no connection at all, and will be
        # retried, or when a fatal answer stops the run: the provider did
        # not bill it, so the row is not in doubt while it waits. Never after
        # an attempt that may have been billed (``_RowAttempts.maybe_billed``).
        self.on_unpaid: Callable[[int], None] = _ignore

    async def send(self, request: Request) -> Outcome:
        """The row's outcome: its answer, or its last error once retries are
        spent or the error is not transient. ``FatalError`` propagates: it
        aborts the run; so does the last failure of a row whose attempts all
        found no connection while no request of the run has ever had an answer.

        The retry budget runs from the first attempt's start (after its
        throttle wait) and bounds everything after it: a wait that would end
        past it is not begun, and an attempt still in flight when it runs out
        is cancelled; the row then fails with ``retry_budget_exhausted``.
        """
        started = self.clock.monotonic()
        row = _RowAttempts(self, request, RowBudget(self.retry.budget, self.clock))
        try:
            try:  # the first attempt goes straight: no coroutine layer of its own
                response = await row.attempt()
            except TransientError as exc:
                response = await self._retried(exc, row.attempt, row.budget.remaining)
        except FatalError:
            if not row.maybe_billed:  # the run stops; a row no attempt paid for is not in doubt
                self.on_unpaid(request.line)
            raise
        except RequestError as exc:
            return self._failed(row, exc, self.clock.monotonic() - started)
        self.throttle.succeeded(row.estimate, row.paid_in + row.paid_out)
        return Outcome(
            line=request.line,
            custom_id=request.custom_id,
            response=response,
            attempts=row.count,
            latency_s=self.clock.monotonic() - started,
            tokens_in=row.paid_in,
            tokens_out=row.paid_out,
            parsed=row.parsed,
        )

    def _failed(self, row: _RowAttempts, exc: RequestError, elapsed: float) -> Outcome:
        """The outcome of a row whose last attempt failed with ``exc``, after
        ``elapsed`` seconds, with the tokens of every answer it was billed
        for (answers off the response schema are paid too)."""
        if exc.code in NEVER_SENT and not self.throttle.reached:
            # Retries spent and nothing of this run ever reached the provider:
            # a wrong --base-url or a host that is down, not a row's fault. Every
            # other row would fail the same way: stop, resumably.
            raise FatalError(exc.code, exc.message) from None
        note = budget_note(exc, self.retry, row.count, elapsed)
        if note is not None:
            exc.message = f"{exc.message}; {note}"
        request = row.request
        outcome = failed_outcome(request.line, request.custom_id, exc, row.count, elapsed)
        outcome.tokens_in, outcome.tokens_out = row.paid_in, row.paid_out
        return outcome

    async def release(self, ticket: Ticket, *, answered: bool, hold: float) -> None:
        """Give the throttle's place back, ``hold`` seconds from now (a
        push-back answered at once keeps its place as long as an answer
        would have: rejected requests never go out faster than good ones)."""
        try:
            if hold > 0:
                await self.clock.sleep(hold)
        finally:
            self.throttle.release(ticket, answered=answered)

    async def _retried(
        self,
        failure: TransientError,
        attempt: Callable[[], Awaitable[Response]],
        remaining: Callable[[], float],
    ) -> Response:
        """After the first attempt's transient ``failure``: the tenacity loop,
        which sees that failure as its own first attempt (so its wait,
        Retry-After and bounds apply as if it had made it)."""
        first: TransientError | None = failure

        async def replay_then_attempt() -> Response:
            nonlocal first
            if first is not None:
                failure, first = first, None
                raise failure
            return await attempt()

        loop = retrying(self.retry, sleep=self._backoff, remaining=remaining)
        return await loop(replay_then_attempt)

    async def _backoff(self, seconds: float) -> None:
        """Wait before a retry, telling ``on_backoff`` while the row waits."""
        self.on_backoff(1)
        try:
            await self.clock.sleep(seconds)
        finally:
            self.on_backoff(-1)


class RowBudget:
    """A row's retry budget (seconds), started by its first attempt.

    Time is read from the injected clock; an attempt in flight is cut on the
    event loop's clock (a cancel scope deadline), the one real I/O runs on.
    """

    def __init__(self, seconds: float, clock: Clock) -> None:
        self.seconds = seconds
        self._clock = clock
        self._deadline: float | None = None

    @property
    def started(self) -> bool:
        """Whether the first attempt has started the budget."""
        return self._deadline is not None

    def start(self) -> None:
        """Start the budget now, unless an earlier attempt did."""
        if self._deadline is None:
            self._deadline = self._clock.monotonic() + self.seconds

    def remaining(self) -> float:
        """Seconds left; infinite before the first attempt starts."""
        if self._deadline is None:
            return math.inf
        return self._deadline - self._clock.monotonic()

    def exhausted(self) -> TransientError:
        return TransientError(
            "retry_budget_exhausted",
            f"the row used up --retry-budget ({self.seconds:g} s) with an attempt in flight",
        )


class _RowAttempts:
    """One row's attempts: each throttled, counted and cut at the budget."""

    def __init__(self, sender: RowSender, request: Request, budget: RowBudget) -> None:
        self.sender = sender
        self.request = request
        self.budget = budget
        self.count = 0
        self.marked = False  # told ``on_send`` since the last error answer
        # An earlier attempt may have been billed (an answer, one off the
        # schema included, a reset, a read timeout, a cut-short answer): the
        # row stays in doubt whatever a later one gets, a fatal answer too.
        self.maybe_billed = False
        self.wrote = False  # the attempt in progress wrote a byte of its request
        self.parsed: Any = NOT_PARSED  # the last answer's JSON, once it passed the schema
        # Tokens of every answer billed so far (one off the schema is billed too).
        self.paid_in = self.paid_out = 0
        throttle = sender.throttle
        self.estimate = estimate_tokens(request.body) if throttle.counts_tokens else 0

    async def attempt(self) -> Response:
        """One attempt; ``retry_budget_exhausted`` if the budget runs out first
        (in the throttle's queue or in flight). The first attempt's wait in
        the queue is before the budget starts: it needs no deadline of its own."""
        try:
            if self.budget.started:
                with anyio.move_on_after(self.budget.remaining()):
                    return await self._throttled()
                raise OutOfTime
            return await self._throttled()
        except OutOfTime:
            raise self.budget.exhausted() from None

    def _sending(self) -> None:
        """The request's first byte goes out next (its waits and its
        connection are over): from now on the provider may bill it."""
        self.wrote = True
        if not self.marked:
            self.sender.on_send(self.request.line)
            self.marked = True

    async def _throttled(self) -> Response:
        """A throttled attempt whose answer passed the response schema, if any.
        Raises ``OutOfTime`` when the budget ends with the attempt in flight."""
        sender, throttle = self.sender, self.sender.throttle
        ticket = await throttle.acquire(self.estimate)
        self.budget.start()
        self.count += 1
        sender.stats.in_flight += 1
        answered, hold = False, 0.0
        self.wrote = False
        try:
            response = await sender.client.send(
                self.request, within=self.budget.remaining(), sending=self._sending
            )
            answered = self.maybe_billed = True  # billed even if it fails the schema
        except RequestError as exc:
            hold = throttle.failed(exc, sent=ticket)
            if self.wrote and not _unpaid(exc):
                # A reset, a timeout, a cut-short answer: once a byte went out
                # (a timeout or a close while connecting sent nothing).
                self.maybe_billed = True
            elif isinstance(exc, TransientError) and not self.maybe_billed:
                sender.on_unpaid(self.request.line)  # not billed: a retry follows
                self.marked = False
            raise
        finally:
            sender.stats.in_flight -= 1
            if hold > 0:
                await sender.release(ticket, answered=answered, hold=hold)
            else:  # no coroutine to build for the usual case
                throttle.release(ticket, answered=answered)
        tokens_in, tokens_out = sender.provider.usage(response.body)
        self.paid_in += tokens_in
        self.paid_out += tokens_out
        answers = sender.answers
        if answers is not None:  # raises for an answer that fails the schema
            self.parsed = answers.classify(response)
        return response


def _unpaid(exc: RequestError) -> bool:
    """Whether the provider cannot have billed the attempt that failed so:
    an error answer (HTTP 400 or more), or no connection at all."""
    return (exc.status is not None and exc.status >= 400) or exc.code in NEVER_SENT


def _ignore(_value: int) -> None:
    """The default ``on_backoff``, ``on_send`` and ``on_unpaid``: nobody listens."""
