"""Time as a run's parts see it (pipeline, workers, throttle, retries, limits),
injected so that tests never really wait."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

Sleep = Callable[[float], Awaitable[None]]  # waits that many seconds
Monotonic = Callable[[], float]  # reads a monotonic clock, in seconds


@dataclass(frozen=True, kw_only=True, slots=True)
class Clock:
    """``sleep`` waits (seconds); ``monotonic`` reads a monotonic clock (seconds)."""

    sleep: Sleep = anyio.sleep
    monotonic: Monotonic = time.monotonic
