"""Time as the runner sees it, injected so that tests never really wait."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, kw_only=True, slots=True)
class Clock:
    """``sleep`` waits (seconds); ``monotonic`` reads a monotonic clock (seconds)."""

    sleep: Sleep = anyio.sleep
    monotonic: Callable[[], float] = time.monotonic
