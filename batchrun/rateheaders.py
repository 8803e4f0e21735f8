"""What a server's headers say about waiting: ``Retry-After``, ``retry-after-ms``
and OpenAI's ``x-ratelimit-reset-*``.

Pure functions, no I/O. Header names match case-insensitively (any mapping;
names are lower-cased here). Unreadable values are ignored, never raised.
All results are seconds, never negative.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime

__all__ = ["parse_duration", "parse_retry_after", "pause_hint"]

# One Go-style duration component, e.g. "6m", "0.5s", "20ms"; "ms" before "m".
_COMPONENT = r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)"
_DURATION = re.compile(f"(?:{_COMPONENT})+")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds a server asks us to wait before retrying this request: from
    ``retry-after-ms`` when readable (it is the more precise), else from
    ``Retry-After`` (delta seconds or an HTTP date, relative to ``now``,
    default the current time); None when absent or unreadable."""
    lower = _lower(headers)
    millis = _millis(lower.get("retry-after-ms"))
    return millis if millis is not None else _delay(lower.get("retry-after"), now)


def pause_hint(
    headers: Mapping[str, str], *, status: int, now: datetime | None = None
) -> float | None:
    """The longest pause, in seconds, the server asks every request to take;
    None when it asks none.

    Takes the longest of ``Retry-After`` and ``retry-after-ms`` and, only when
    ``status`` is 429, ``x-ratelimit-reset-requests`` / ``-tokens``: on other
    answers those say when a bucket refills, not that we must stop.
    """
    lower = _lower(headers)
    hints = [_delay(lower.get("retry-after"), now), _millis(lower.get("retry-after-ms"))]
    if status == 429:
        hints.extend(parse_duration(lower[name]) for name in _RESET_HEADERS if name in lower)
    found = [hint for hint in hints if hint is not None]
    return max(found) if found else None


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI ``x-ratelimit-reset-*`` value: a Go duration such
    as ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"2h3m4.5s"``, or a bare number of
    seconds (``"0.5"``). None for anything else, negatives included."""
    value = text.strip().lower()
    if _DURATION.fullmatch(value):
        return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in re.findall(_COMPONENT, value))
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _millis(value: str | None) -> float | None:
    """A ``retry-after-ms`` value in seconds."""
    if value is None:
        return None
    try:
        return max(0.0, float(value) / 1000.0)
    except ValueError:
        return None


def _delay(value: str | None, now: datetime | None) -> float | None:
    """A ``Retry-After`` value (delta seconds or an HTTP date) in seconds."""
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
