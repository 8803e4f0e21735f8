"""One row to its outcome: throttled attempts, retried while transient."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from batchrun.client import Client
from batchrun.config import RetryPolicy
from batchrun.errors import FatalError, RequestError, TransientError
from batchrun.progress import RunStats
from batchrun.providers import Provider
from batchrun.records import NOT_PARSED, Outcome, Request, Response
from batchrun.retry import budget_note, retrying
from batchrun.schema import AnswerCheck
from batchrun.throttle import Throttle
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

    async def send(self, request: Request) -> Outcome:
        """The row's outcome: its answer, or its last error once retries are
        spent or the error is not transient. ``FatalError`` propagates: it
        aborts the run."""
        attempts = 0
        started = self.clock.monotonic()
        throttle = self.throttle
        estimate = estimate_tokens(request.body) if throttle.counts_tokens else 0
        parsed: Any = NOT_PARSED

        async def attempt() -> Response:
            nonlocal attempts, parsed
            begun = await throttle.acquire(estimate)
            attempts += 1
            self.stats.in_flight += 1
            answered = False
            try:
                response = await self.client.send(request)
                answered = True
            except RequestError as exc:
                throttle.failed(exc)
                raise
            finally:
                self.stats.in_flight -= 1
                throttle.release(begun, answered=answered)
            if self.answers is not None:  # raises for an answer that fails the schema
                parsed = self.answers.classify(response)
            return response

        try:
            response = await self._with_retries(attempt)
        except FatalError:
            raise
        except RequestError as exc:
            elapsed = self.clock.monotonic() - started
            note = budget_note(exc, self.retry, attempts, elapsed)
            if note is not None:
                exc.message = f"{exc.message}; {note}"
            return failed_outcome(request, exc, attempts, elapsed)
        tokens_in, tokens_out = self.provider.usage(response.body)
        throttle.succeeded(estimate, tokens_in + tokens_out)
        return Outcome(
            line=request.line,
            custom_id=request.custom_id,
            response=response,
            attempts=attempts,
            latency_s=self.clock.monotonic() - started,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            parsed=parsed,
        )

    async def _with_retries(self, attempt: Callable[[], Awaitable[Response]]) -> Response:
        """The first attempt goes straight; only a transient failure builds the
        tenacity loop, which sees that failure as its own first attempt (so its
        wait, Retry-After and bounds apply as if it had made it)."""
        try:
            return await attempt()
        except TransientError as exc:
            first: TransientError | None = exc

        async def replay_then_attempt() -> Response:
            nonlocal first
            if first is not None:
                failure, first = first, None
                raise failure
            return await attempt()

        return await retrying(self.retry, sleep=self.clock.sleep)(replay_then_attempt)


def failed_outcome(request: Request, exc: RequestError, attempts: int, latency: float) -> Outcome:
    """The outcome of a row whose last attempt failed with ``exc``; an HTTP
    answer's status and body are kept."""
    response = None
    if exc.status is not None:
        response = Response(status_code=exc.status, request_id=exc.request_id, body=exc.body)
    return Outcome(
        line=request.line,
        custom_id=request.custom_id,
        response=response,
        error_code=exc.code,
        error_message=exc.message,
        retryable=isinstance(exc, TransientError),
        attempts=attempts,
        latency_s=latency,
    )
