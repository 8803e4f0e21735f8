"""A run's live counters, its progress display and its end-of-run summary.

The runner mutates one ``RunStats``; a ``ProgressReporter`` reads it while the
run goes (a tqdm bar on a terminal, periodic log lines elsewhere), and
``Summary.from_stats`` freezes it into the report printed and saved at the end.
Everything here runs on the event loop's thread: no locking.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TextIO

from batchrun.timing import Sleep

__all__ = ["LatencyHistogram", "ProgressReporter", "RunStats", "Summary"]

_MIN_S = 1e-4
_MAX_S = 3600.0
# A bucket spans a factor of _GROWTH; reporting its geometric middle is off by at
# most sqrt(1.019) - 1 < 0.95% for any value inside, leaving room for float
# rounding at the edges under the promised 1%.
_GROWTH = 1.019
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = math.floor(math.log(_MAX_S / _MIN_S) / _LOG_GROWTH) + 1

ProgressMode = Literal["bar", "log", "off"]

_POSTFIX_INTERVAL_S = 0.5


class LatencyHistogram:
    """Bounded-memory latency recorder.

    Values are in seconds. Log-spaced buckets give every percentile within 1%
    relative error of the exact nearest-rank percentile, over 0.1 ms .. 1 hour;
    values outside that range are clamped to it, NaN is ignored. Memory is a
    fixed ~900 counters, whatever the count.
    """

    __slots__ = ("_count", "_counts", "_max", "_min")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self._count = 0
        self._min = math.inf
        self._max = -math.inf

    def record(self, seconds: float) -> None:
        """Add one latency of ``seconds``."""
        if math.isnan(seconds):
            return
        value = min(max(seconds, _MIN_S), _MAX_S)
        index = min(int(math.log(value / _MIN_S) / _LOG_GROWTH), _BUCKETS - 1)
        self._counts[index] += 1
        self._count += 1
        self._min = min(self._min, value)
        self._max = max(self._max, value)

    @property
    def count(self) -> int:
        """Number of values recorded."""
        return self._count

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (``q`` in [0, 100]) in seconds; None when empty.

        Nearest rank: the smallest recorded value with at least ``q``% of the
        values at or below it, to within 1%. Raises ValueError for ``q`` out of range.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {q!r}")
        if self._count == 0:
            return None
        rank = max(1, math.ceil(q * self._count / 100))
        index = bisect.bisect_left(tuple(itertools.accumulate(self._counts)), rank)
        middle = _MIN_S * math.pow(_GROWTH, index + 0.5)
        # The exact answer lies within [min, max], so clamping only brings the
        # estimate closer (and makes a one-value histogram exact).
        return min(max(middle, self._min), self._max)


@dataclass(slots=True)
class RunStats:
    """Live counters of one run; the runner mutates them, the reporter reads them.

    ``done`` counts rows with a final outcome, ``done == ok + failed``;
    ``skipped`` counts those of them an earlier run finished (on resume), and
    ``reused`` those answered from a result store, so that rates and ETAs
    measure this run's own work. ``sent`` counts rows this run sent.
    Money, in the currency of the job's prices: ``cost`` is this run's
    spend, ``cost_saved`` the recorded cost of the reused rows, and
    ``cost_before`` what earlier runs on this output spent.
    """

    total: int | None = None
    done: int = 0
    ok: int = 0
    failed_by_code: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: int = 0
    in_flight: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    skipped: int = 0
    reused: int = 0
    sent: int = 0
    cost: float = 0.0
    cost_saved: float = 0.0
    cost_before: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def failed(self) -> int:
        """Rows finished in this run without success, over all error codes."""
        return sum(self.failed_by_code.values())

    def record_outcome(
        self,
        *,
        ok: bool,
        error_code: str | None,
        attempts: int,
        latency_s: float | None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost: float = 0.0,
    ) -> None:
        """Count one row's final outcome.

        ``attempts`` includes the first (0: never sent, a bad line);
        ``latency_s`` (seconds) is recorded when known. A failure without a
        code counts under ``"unknown"``.
        """
        self._verdict(ok, error_code, tokens_in, tokens_out)
        self.retries += max(0, attempts - 1)
        if attempts:
            self.sent += 1
        if latency_s is not None:
            self.latency.record(latency_s)
        self.cost += cost

    def record_earlier(
        self,
        *,
        ok: bool,
        error_code: str | None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost: float = 0.0,
    ) -> None:
        """Count a row an earlier run finished: in the totals, not in the rate."""
        self._verdict(ok, error_code, tokens_in, tokens_out)
        self.skipped += 1
        self.cost_before += cost

    def record_reused(self, *, ok: bool, error_code: str | None, cost: float = 0.0) -> None:
        """Count a row answered from a result store (its recorded ``cost`` saved)."""
        self._verdict(ok, error_code, 0, 0)
        self.reused += 1
        self.cost_saved += cost

    def _verdict(self, ok: bool, error_code: str | None, tokens_in: int, tokens_out: int) -> None:
        self.done += 1
        if ok:
            self.ok += 1
        else:
            self.failed_by_code[error_code or "unknown"] += 1
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out


@dataclass(frozen=True, kw_only=True, slots=True)
class Summary:
    """End-of-run report: printed for humans (``render``), saved as JSON (``to_dict``).

    ``rows`` counts rows with a final outcome, skipped ones included;
    ``rows_per_s`` counts only rows processed in this run. ``reused`` counts
    rows answered from a result store, ``sent`` rows this run sent. ``cost``
    (this run's spend) and ``cost_saved`` (the recorded cost of the reused
    rows) are None when the job has no prices. ``aborted`` is the reason the
    run was stopped early (fatal provider answer, interrupt, budget), else
    None. ``extra`` must hold JSON-ready values.
    """

    rows: int
    ok: int
    failed: int
    failed_by_code: dict[str, int]
    retries: int
    skipped: int
    tokens_in: int
    tokens_out: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    duration_s: float
    rows_per_s: float
    exit_code: int
    aborted: str | None
    output: str
    reused: int = 0
    sent: int = 0
    cost: float | None = None
    cost_saved: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_stats(
        cls,
        stats: RunStats,
        *,
        duration_s: float,
        exit_code: int,
        aborted: str | None,
        output: str,
        extra: dict[str, object] | None = None,
        priced: bool = False,
    ) -> Summary:
        """Freeze ``stats`` after a run of ``duration_s`` seconds; ``priced``:
        the job has prices, so the costs are known."""
        processed = stats.done - stats.skipped - stats.reused
        return cls(
            rows=stats.done,
            ok=stats.ok,
            failed=stats.failed,
            # Most frequent first: the order the summary lines show them in.
            failed_by_code=dict(
                sorted(stats.failed_by_code.items(), key=lambda kv: (-kv[1], kv[0]))
            ),
            retries=stats.retries,
            skipped=stats.skipped,
            tokens_in=stats.tokens_in,
            tokens_out=stats.tokens_out,
            latency_p50_ms=_ms(stats.latency.percentile(50)),
            latency_p95_ms=_ms(stats.latency.percentile(95)),
            latency_p99_ms=_ms(stats.latency.percentile(99)),
            duration_s=duration_s,
            rows_per_s=processed / duration_s if duration_s > 0 else 0.0,
            exit_code=exit_code,
            aborted=aborted,
            output=output,
            reused=stats.reused,
            sent=stats.sent,
            cost=round(stats.cost, 9) if priced else None,
            cost_saved=round(stats.cost_saved, 9) if priced else None,
            extra=dict(extra or {}),
        )

    def to_dict(self) -> dict[str, object]:
        """All fields by name, as a fresh JSON-ready dict."""
        result: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        result["failed_by_code"] = dict(self.failed_by_code)
        result["extra"] = dict(self.extra)
        return result

    def render(self) -> str:
        """A few lines of text for a person, without a trailing newline."""
        head = (
            f"batchrun: {self.rows:,} rows in {_duration(self.duration_s)} "
            f"({self.rows_per_s:,.1f} rows/s): {self.ok:,} ok, {self.failed:,} failed"
        )
        if self.failed_by_code:
            head += " (" + ", ".join(f"{c}: {n:,}" for c, n in self.failed_by_code.items()) + ")"
        if self.skipped:
            head += f"; {self.skipped:,} of them done by an earlier run"
        if self.reused:
            head += f"; {self.reused:,} reused from a store"
        lines = [head, "  " + " | ".join(self._detail_parts()), f"  output {self.output}"]
        if self.extra:
            lines.append("  " + " | ".join(f"{k} {v}" for k, v in self.extra.items()))
        if self.aborted is not None:
            lines.append(f"  aborted: {self.aborted}")
        return "\n".join(lines)

    def _detail_parts(self) -> list[str]:
        parts = [
            f"sent {self.sent:,}",
            f"retries {self.retries:,}",
            f"tokens in {self.tokens_in:,} out {self.tokens_out:,}",
        ]
        if self.cost is not None:
            parts.append(f"cost {money(self.cost)} (saved {money(self.cost_saved or 0.0)})")
        marks = (
            ("p50", self.latency_p50_ms),
            ("p95", self.latency_p95_ms),
            ("p99", self.latency_p99_ms),
        )
        shown = [f"{name} {_latency(ms)}" for name, ms in marks if ms is not None]
        if shown:
            parts.append("latency " + " ".join(shown))
        return parts


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
        return _duration(remaining / rate, whole=True) if rate > 0 else "?"

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


def money(amount: float) -> str:
    """An amount in the job's currency, to about 4 significant digits."""
    return f"{amount:,.2f}" if amount >= 100 else f"{amount:.4g}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _latency(ms: float) -> str:
    """Milliseconds to about 2-3 significant digits, e.g. ``0.45 ms``, ``120 ms``, ``2.3 s``."""
    if ms >= 10_000:
        return f"{ms / 1000:,.1f} s"
    if ms >= 10:
        return f"{ms:,.0f} ms"
    return f"{ms:.2g} ms"


def _duration(seconds: float, *, whole: bool = False) -> str:
    """``12.3 s`` (``12 s`` when ``whole``), ``4 min 05 s`` or ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s" if whole else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
