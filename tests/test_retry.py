"""Tests of batchrun.retry: Retry-After parsing, backoff, and the retry loop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from tenacity import AsyncRetrying, Future, RetryCallState

from batchrun.config import RetryPolicy
from batchrun.errors import FatalError, RequestError, RowError, TransientError
from batchrun.retry import BackoffWithRetryAfter, retrying
from tests.fakes import FakeClock

NOW = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)


# --- BackoffWithRetryAfter -------------------------------------------------------


def failed_state(error: BaseException, attempt: int = 1) -> RetryCallState:
    state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.outcome = Future.construct(attempt, error, True)
    return state


def transient(retry_after: float | None = None, code: str = "rate_limited") -> TransientError:
    return TransientError(code, "try again", status=429, retry_after=retry_after)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 10])
def test_backoff_jitter_bounds(attempt: int) -> None:
    policy = RetryPolicy(backoff_initial=0.5, backoff_max=3.0)
    backoff = BackoffWithRetryAfter(policy)
    ceiling = min(3.0, 0.5 * 2 ** (attempt - 1))
    waits = [backoff(failed_state(transient(), attempt)) for _ in range(200)]
    assert all(0 <= wait <= ceiling for wait in waits)
    assert max(waits) > ceiling / 2  # full jitter spreads over the range


def test_backoff_retry_after_wins_when_longer_with_a_spread_on_top() -> None:
    backoff = BackoffWithRetryAfter(RetryPolicy(backoff_initial=1, backoff_max=2, budget=100))
    waits = [backoff(failed_state(transient(retry_after=42.0))) for _ in range(100)]
    assert all(42.0 <= wait <= 43.0 for wait in waits)
    assert len(set(waits)) > 1  # rows told the same Retry-After come back spread out


def test_backoff_retry_after_capped_at_budget() -> None:
    backoff = BackoffWithRetryAfter(RetryPolicy(backoff_initial=1, backoff_max=2, budget=30))
    assert backoff(failed_state(transient(retry_after=10_000.0))) == 30


def test_backoff_short_retry_after_does_not_shorten_jitter() -> None:
    policy = RetryPolicy(backoff_initial=100, backoff_max=100, budget=1000)
    backoff = BackoffWithRetryAfter(policy)
    waits = [backoff(failed_state(transient(retry_after=0.0), attempt=1)) for _ in range(50)]
    assert all(0 <= wait <= 100 for wait in waits)
    assert max(waits) > 1


def test_backoff_ignores_retry_after_of_other_errors() -> None:
    backoff = BackoffWithRetryAfter(RetryPolicy(backoff_initial=1, backoff_max=1))
    error = RowError("bad", "no", retry_after=500.0)
    assert 0 <= backoff(failed_state(error)) <= 1


# --- the retry loop --------------------------------------------------------------


class Flaky:
    """Raises ``errors[i]`` on call i while there are errors left, then returns "ok"."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.calls = 0
        self.raised: list[BaseException] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= len(self.errors):
            error = self.errors[self.calls - 1]
            self.raised.append(error)
            raise error
        return "ok"


def transients(count: int, retry_after: float | None = None) -> list[BaseException]:
    return [transient(retry_after, code=f"fail_{i}") for i in range(count)]


@pytest.mark.asyncio
@pytest.mark.parametrize("failures", [0, 1, 3, 5])
async def test_retrying_until_success(failures: int) -> None:
    policy = RetryPolicy(max_attempts=6, budget=900, backoff_initial=0.5, backoff_max=4)
    clock = FakeClock()
    fn = Flaky(transients(failures))
    loop = retrying(policy, sleep=clock.sleep)
    assert await loop(fn) == "ok"
    assert fn.calls == failures + 1
    assert loop.statistics["attempt_number"] == failures + 1
    assert len(clock.sleeps) == failures
    for attempt, wait in enumerate(clock.sleeps, start=1):
        assert 0 <= wait <= min(4, 0.5 * 2 ** (attempt - 1))


@pytest.mark.asyncio
async def test_retrying_waits_at_least_retry_after() -> None:
    policy = RetryPolicy(max_attempts=6, budget=900, backoff_initial=0.1, backoff_max=1)
    clock = FakeClock()
    fn = Flaky(transients(3, retry_after=7.5))
    assert await retrying(policy, sleep=clock.sleep)(fn) == "ok"
    assert fn.calls == 4
    assert len(clock.sleeps) == 3
    assert all(7.5 <= wait <= 7.6 for wait in clock.sleeps)  # plus a spread of at most 0.1


@pytest.mark.asyncio
async def test_retrying_retry_after_beyond_budget_gives_up_without_sleeping() -> None:
    # The wait is capped at the budget, and no attempt may start once the budget
    # has passed, so the loop stops at once instead of parking the row.
    policy = RetryPolicy(max_attempts=6, budget=30, backoff_initial=0.1, backoff_max=1)
    clock = FakeClock()
    fn = Flaky(transients(2, retry_after=10_000))
    with pytest.raises(TransientError) as info:
        await retrying(policy, sleep=clock.sleep)(fn)
    assert info.value is fn.raised[0]
    assert fn.calls == 1
    assert clock.sleeps == []


@pytest.mark.asyncio
async def test_retrying_within_budget_retry_after() -> None:
    policy = RetryPolicy(max_attempts=6, budget=30, backoff_initial=0.1, backoff_max=1)
    clock = FakeClock()
    fn = Flaky(transients(1, retry_after=20))
    assert await retrying(policy, sleep=clock.sleep)(fn) == "ok"
    assert len(clock.sleeps) == 1
    assert 20 <= clock.sleeps[0] <= 20.1


@pytest.mark.asyncio
@pytest.mark.parametrize("max_attempts", [1, 2, 4])
async def test_retrying_reraises_last_transient_after_max_attempts(max_attempts: int) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, backoff_initial=0.1, backoff_max=0.2)
    clock = FakeClock()
    fn = Flaky(transients(10))
    with pytest.raises(TransientError) as info:
        await retrying(policy, sleep=clock.sleep)(fn)
    assert fn.calls == max_attempts
    assert info.value is fn.raised[-1]
    assert info.value.code == f"fail_{max_attempts - 1}"
    assert len(clock.sleeps) == max_attempts - 1
    assert all(0 <= wait <= 0.2 for wait in clock.sleeps)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error",
    [
        RowError("invalid_request_error", "bad body", status=400),
        FatalError("invalid_api_key", "bad key", status=401),
        FatalError("insufficient_quota", "no quota", status=429, retry_after=1.0),
        RequestError("plain", "base class"),
        ValueError("not a batchrun error"),
        KeyError("boom"),
    ],
    ids=["row", "fatal", "fatal-with-retry-after", "request-error", "value-error", "key-error"],
)
async def test_retrying_does_not_retry_other_errors(error: BaseException) -> None:
    clock = FakeClock()
    fn = Flaky([error])
    with pytest.raises(type(error)) as info:
        await retrying(RetryPolicy(), sleep=clock.sleep)(fn)
    assert info.value is error
    assert type(info.value) is type(error)
    assert fn.calls == 1
    assert clock.sleeps == []


@pytest.mark.asyncio
async def test_retrying_transient_then_row_error_stops() -> None:
    row = RowError("content_filter", "blocked", status=400)
    fn = Flaky([*transients(2), row])
    clock = FakeClock()
    with pytest.raises(RowError) as info:
        await retrying(RetryPolicy(backoff_max=1), sleep=clock.sleep)(fn)
    assert info.value is row
    assert fn.calls == 3
    assert len(clock.sleeps) == 2


@pytest.mark.asyncio
async def test_retrying_cancellation_propagates() -> None:
    fn = Flaky([asyncio.CancelledError()])
    clock = FakeClock()
    with pytest.raises(asyncio.CancelledError):
        await retrying(RetryPolicy(), sleep=clock.sleep)(fn)
    assert fn.calls == 1
    assert clock.sleeps == []


@pytest.mark.asyncio
async def test_retrying_cancellation_after_transients() -> None:
    fn = Flaky([*transients(2), asyncio.CancelledError()])
    clock = FakeClock()
    with pytest.raises(asyncio.CancelledError):
        await retrying(RetryPolicy(backoff_max=1), sleep=clock.sleep)(fn)
    assert fn.calls == 3
    assert len(clock.sleeps) == 2


@pytest.mark.asyncio
async def test_retrying_for_each_row_is_independent() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_max=1)
    first = Flaky(transients(2))
    second = Flaky(transients(2))
    assert await retrying(policy, sleep=FakeClock().sleep)(first) == "ok"
    assert await retrying(policy, sleep=FakeClock().sleep)(second) == "ok"
    assert (first.calls, second.calls) == (3, 3)
