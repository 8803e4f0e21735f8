"""A run's progress display: a tqdm bar on a terminal, periodic log lines elsewhere.

A ``ProgressReporter`` reads the run's ``stats.RunStats`` while the run goes.
Everything here runs on the event loop's thread: no locking.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, TextIO

from batchrun.stats import RunStats, duration_text
from batchrun.timing import Sleep

__all__ = ["ProgressMode", "ProgressReporter"]

ProgressMode = Literal["bar", "log", "off"]

_POSTFIX_INTERVAL_S = 0.5


class ProgressReporter:
    """Shows progress while a run goes.

    ``"bar"``: a tqdm bar on ``stream``; ``"log"``: a line (``line()``) every
    ``log_interval`` seconds, for cron / Airflow logs; ``"off"``: nothing.
    Rates and ETAs use ``clock`` (seconds) from the reporter's creation and
    count only rows processed in this run, not skipped ones.
    """

    def __init__(
        self,
        stats: RunStats,
        *,
        mode: ProgressMode,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_interval: float = 5.0,
        extra: Callable[[], str] | None = None,
    ) -> None:
        if not log_interval > 0:
            raise ValueError(f"log_interval must be > 0 seconds, got {log_interval!r}")
        self.stats = stats
        self.mode: ProgressMode = mode
        self.log_interval = log_interval
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._extra = extra
        self._started = clock()
        self._last_line = self._started
        self._last_postfix = -math.inf
        self._closed = False
        self._shown = stats.done
        self._bar: Any = None  # a tqdm bar in "bar" mode
        if mode == "bar":
            # Rows done before the bar existed (resume) start it, so they don't
            # count towards tqdm's rate.
            from tqdm import tqdm  # only a terminal needs it: saves start-up time elsewhere

            self._bar = tqdm(
                total=stats.total,
                initial=stats.done,
                unit="row",
                dynamic_ncols=True,
                file=self._stream,
            )

    @staticmethod
    def choose_mode(enabled: bool, stream: TextIO) -> ProgressMode:
        """``"off"`` when not enabled, ``"bar"`` on a terminal, else ``"log"``."""
        if not enabled:
            return "off"
        try:
            return "bar" if stream.isatty() else "log"
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            return "log"

    def update(self) -> None:
        """Call after each finished row; cheap enough to run per row."""
        self._refresh(force_postfix=False)

    def tick(self) -> None:
        """Call from a timer: keeps logging and the bar's clock moving on a stalled run."""
        self._refresh(force_postfix=True)

    def close(self) -> None:
        """Finish the display: close the bar, or in log mode write a final line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._advance_bar()
            self._refresh_postfix(force=True)
            self._bar.close()
        elif self.mode == "log":
            self._write(self.line())

    def line(self) -> str:
        """The log line, e.g. ``progress 1200/5000 (24.0%) 81.3 rows/s eta 46 s | ok ...``."""
        s = self.stats
        rate = self._rate()
        if s.total is None:
            head = f"progress {s.done} rows {rate:.1f} rows/s"
        else:
            pct = 100.0 * s.done / s.total if s.total else 100.0
            head = f"progress {s.done}/{s.total} ({pct:.1f}%) {rate:.1f} rows/s eta {self._eta()}"
        counts = f"ok {s.ok} failed {s.failed}" + (f" skipped {s.skipped}" if s.skipped else "")
        parts = [head, counts, f"retries {s.retries}", f"in flight {s.in_flight}"]
        more = self._extra() if self._extra is not None else ""
        if more:
            parts.append(more)
        return " | ".join(parts)

    async def heartbeat(self, sleep: Sleep) -> None:
        """Tick forever, every ``log_interval`` s in log mode, else every 0.5 s.

        Meant to run in a task group and be cancelled when the run ends; any
        exception from ``sleep`` (cancellation included) propagates.
        """
        interval = self.log_interval if self.mode == "log" else _POSTFIX_INTERVAL_S
        while True:
            await sleep(interval)
            self.tick()

    def _refresh(self, *, force_postfix: bool) -> None:
        if self._closed:
            return
        if self._bar is not None:
            self._advance_bar()
            self._refresh_postfix(force=force_postfix)
        elif self.mode == "log":
            self._log_if_due()

    def _rate(self) -> float:
        elapsed = self._clock() - self._started
        processed = self.stats.done - self.stats.skipped - self.stats.reused
        return processed / elapsed if elapsed > 0 else 0.0

    def _eta(self) -> str:
        s = self.stats
        remaining = max(0, (s.total or 0) - s.done)
        if remaining == 0:
            return "0 s"
        rate = self._rate()
        return duration_text(remaining / rate, whole=True) if rate > 0 else "?"

    def _log_if_due(self) -> None:
        now = self._clock()
        if now - self._last_line >= self.log_interval:
            self._last_line = now
            self._write(self.line())

    def _write(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def _advance_bar(self) -> None:
        assert self._bar is not None
        delta = self.stats.done - self._shown
        if delta > 0:
            self._shown = self.stats.done
            self._bar.update(delta)

    def _refresh_postfix(self, *, force: bool) -> None:
        assert self._bar is not None
        now = self._clock()
        if not force and now - self._last_postfix < _POSTFIX_INTERVAL_S:
            return
        self._last_postfix = now
        if self._bar.total is None and self.stats.total is not None:
            # The input is counted while the run goes: done/total and ETA from then on.
            self._bar.total = self.stats.total
        s = self.stats
        text = f"errors {s.failed}, retries {s.retries}, in flight {s.in_flight}"
        more = self._extra() if self._extra is not None else ""
        self._bar.set_postfix_str(f"{text}, {more}" if more else text)
