"""Retry policy pieces: backoff honouring Retry-After, and the tenacity loop.

Only ``TransientError`` is retried; ``RowError``, ``FatalError`` and
cancellation pass straight through. Time is injected (``sleep``) so tests
never wait for real.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from batchrun.config import RetryPolicy
from batchrun.errors import TransientError
from batchrun.timing import Sleep

Remaining = Callable[[], float]  # seconds left of a row's budget


class BackoffWithRetryAfter:
    """Exponential backoff with full jitter, overridden by a longer Retry-After.

    The wait never exceeds the policy's budget, so a hostile Retry-After
    cannot park a row for longer than it may take in all.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self._jitter = wait_random_exponential(
            multiplier=policy.backoff_initial, max=policy.backoff_max
        )
        self._cap = policy.budget
        self._initial = policy.backoff_initial

    def __call__(self, state: RetryCallState) -> float:
        wait = self._jitter(state)
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, TransientError) and error.retry_after is not None:
            # Jitter on top of the server's pause: rows that were told the same
            # Retry-After must not all come back at the same instant.
            spread = random.uniform(0, min(error.retry_after, self._initial))
            wait = max(wait, error.retry_after + spread)
        return min(wait, self._cap)


class stop_past_budget(stop_base):
    """Stop when the next wait would end past the row's budget: the row then
    keeps its last error instead of sleeping into a cut-off."""

    def __init__(self, remaining: Remaining) -> None:
        self._remaining = remaining

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._remaining() <= retry_state.upcoming_sleep


def retrying(
    policy: RetryPolicy,
    *,
    sleep: Sleep,
    remaining: Remaining | None = None,
) -> AsyncRetrying:
    """A tenacity loop for one row: transient errors only, bounded in attempts
    and in time. ``remaining`` gives the seconds left of the row's budget; by
    default the budget runs from the loop's start."""
    in_time = stop_before_delay(policy.budget) if remaining is None else stop_past_budget(remaining)
    return AsyncRetrying(
        stop=stop_after_attempt(policy.max_attempts) | in_time,
        wait=BackoffWithRetryAfter(policy),
        retry=retry_if_exception_type(TransientError),
        sleep=sleep,
        reraise=True,
    )


def budget_note(error: Exception, policy: RetryPolicy, attempts: int, elapsed: float) -> str | None:
    """Why a row stopped with attempts left: the server asked for a longer
    pause (``Retry-After``) than ``--retry-budget`` leaves after ``elapsed``
    seconds. None when that is not why it stopped."""
    if not isinstance(error, TransientError) or error.retry_after is None:
        return None
    left = policy.budget - elapsed
    if attempts >= policy.max_attempts or error.retry_after < left:
        return None
    return (
        f"the provider asked to wait {error.retry_after:,.0f} s (Retry-After) and"
        f" --retry-budget allows {policy.budget:,.0f} s per row ({max(0.0, left):,.0f} s left)"
    )
