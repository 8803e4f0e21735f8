"""Retry policy pieces: Retry-After parsing, backoff, and the tenacity loop.

Only ``TransientError`` is retried; ``RowError``, ``FatalError`` and
cancellation pass straight through. Time is injected (``sleep``) so tests
never wait for real.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Mapping
from datetime import UTC, datetime

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from batchrun.config import RetryPolicy
from batchrun.errors import TransientError
from batchrun.timing import Sleep


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds a server asks us to wait, from ``Retry-After`` (delta seconds or an
    HTTP date) or ``retry-after-ms``; None when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


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


def retrying(
    policy: RetryPolicy,
    *,
    sleep: Sleep,
) -> AsyncRetrying:
    """A tenacity loop for one row: transient errors only, bounded in attempts
    and in time (no attempt starts after ``policy.budget`` seconds)."""
    return AsyncRetrying(
        stop=stop_after_attempt(policy.max_attempts) | stop_before_delay(policy.budget),
        wait=BackoffWithRetryAfter(policy),
        retry=retry_if_exception_type(TransientError),
        sleep=sleep,
        reraise=True,
    )
