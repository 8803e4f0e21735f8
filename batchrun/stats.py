"""A run's live counters, its latency histogram and its end-of-run summary.

The pipeline mutates one ``RunStats`` while the run goes; the display
(``progress.ProgressReporter``) reads it, and ``Summary.from_stats`` freezes
it into the report printed and saved at the end. Everything here runs on the
event loop's thread: no locking.
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

__all__ = [
    "COUNTS_KEYS",
    "Counted",
    "Counts",
    "LatencyHistogram",
    "RunStats",
    "Summary",
    "Tally",
    "duration_text",
    "money",
]

_MIN_S = 1e-4
_MAX_S = 3600.0
# A bucket spans a factor of _GROWTH; reporting its geometric middle is off by at
# most sqrt(1.019) - 1 < 0.95% for any value inside, leaving room for float
# rounding at the edges under the promised 1%.
_GROWTH = 1.019
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = math.floor(math.log(_MAX_S / _MIN_S) / _LOG_GROWTH) + 1


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
        # Comparisons, not min()/max() calls: this runs once per row.
        if seconds != seconds:  # NaN
            return
        value = _MIN_S if seconds < _MIN_S else _MAX_S if seconds > _MAX_S else seconds
        index = int(math.log(value / _MIN_S) / _LOG_GROWTH)
        self._counts[index if index < _BUCKETS else _BUCKETS - 1] += 1
        self._count += 1
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value

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


@dataclass(frozen=True, slots=True)
class Tally:
    """What one output record counts for (see ``resume.tally``)."""

    ok: bool
    error_code: str | None
    retryable: bool
    tokens_in: int
    tokens_out: int
    cost: float = 0.0  # the record's recorded cost (0 when none)
    reused: bool = False  # answered from a result store, not paid by this output


_OK = operator.attrgetter("ok")
_TOKENS_IN = operator.attrgetter("tokens_in")
_TOKENS_OUT = operator.attrgetter("tokens_out")
_COST = operator.attrgetter("cost")


@dataclass(slots=True)
class Counts:
    """What finished rows count for: ``ok`` ones, failed ones by error code,
    and the tokens and ``cost`` (the job's currency) paid for them.

    Invariant: every row counted is in ``ok`` or in ``failed_by_code``, once.
    ``to_dict`` gives the checkpoint's keys for these fields (a contract:
    state directories of older versions resume with them).
    """

    ok: int = 0
    failed_by_code: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0

    @property
    def failed(self) -> int:
        """Rows counted without success, over all error codes."""
        return sum(self.failed_by_code.values())

    def count(
        self,
        ok: bool,
        error_code: str | None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost: float = 0.0,
    ) -> None:
        """Count one row's verdict; a failure without a code counts under ``"unknown"``."""
        if ok:
            self.ok += 1
        else:
            self.failed_by_code[error_code or "unknown"] += 1
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.cost += cost

    def count_all(self, verdicts: Sequence[Tally]) -> None:
        """``count`` each of ``verdicts`` (none reused) in turn, with the same
        sums in fewer calls: the costs are added one by one, in order."""
        oks = sum(map(_OK, verdicts))
        self.ok += oks
        if oks != len(verdicts):
            for v in verdicts:
                if not v.ok:
                    self.count(False, v.error_code)  # no tokens, and cost + 0.0 is exact
        self.tokens_in += sum(map(_TOKENS_IN, verdicts))
        self.tokens_out += sum(map(_TOKENS_OUT, verdicts))
        # ``reduce``, not ``sum``: sum() compensates float rounding (3.12+),
        # which would give a total a row-by-row count does not.
        self.cost = functools.reduce(operator.add, map(_COST, verdicts), self.cost)

    def count_record(self, verdict: Tally) -> None:
        """Count an output record's verdict. A reused row adds no tokens and
        no cost: they were paid for elsewhere."""
        if verdict.reused:
            self.count(verdict.ok, verdict.error_code)
        else:
            self.count(
                verdict.ok, verdict.error_code, verdict.tokens_in, verdict.tokens_out, verdict.cost
            )

    def copy(self) -> Counts:
        """An independent copy (the failure counter is not shared)."""
        return Counts(
            self.ok,
            collections.Counter(self.failed_by_code),
            self.tokens_in,
            self.tokens_out,
            self.cost,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, JSON-ready (``failed_by_code`` a plain dict)."""
        return {
            "ok": self.ok,
            "failed_by_code": dict(self.failed_by_code),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost": self.cost,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counts:
        """The counts among ``data``'s keys (``to_dict``'s); a missing key counts
        nothing, other keys are ignored."""
        return cls(
            ok=data.get("ok", 0),
            failed_by_code=collections.Counter(data.get("failed_by_code") or {}),
            tokens_in=data.get("tokens_in", 0),
            tokens_out=data.get("tokens_out", 0),
            cost=data.get("cost", 0.0),
        )


COUNTS_KEYS: Final = frozenset(f.name for f in fields(Counts))


class Counted:
    """Read-only views of the ``counts`` an object carries."""

    __slots__ = ()
    counts: Counts

    @property
    def ok(self) -> int:
        return self.counts.ok

    @property
    def failed(self) -> int:
        """Rows finished without success, over all error codes."""
        return self.counts.failed

    @property
    def failed_by_code(self) -> collections.Counter[str]:
        return self.counts.failed_by_code

    @property
    def tokens_in(self) -> int:
        return self.counts.tokens_in

    @property
    def tokens_out(self) -> int:
        return self.counts.tokens_out


@dataclass(slots=True)
class RunStats(Counted):
    """Live counters of one run; the pipeline mutates them, the reporter reads them.

    ``done`` counts rows with a final outcome, ``done == ok + failed``;
    ``skipped`` counts those of them an earlier run finished (on resume), and
    ``reused`` those answered from a result store or by an identical row of
    this run (``twins``), so that rates and ETAs
    measure this run's own work. ``sent`` counts rows this run sent.
    ``counts`` holds the verdicts, tokens and spend of every row done, on
    resume those of earlier runs included (it is what the checkpoint saves).
    Money, in the currency of the job's prices: ``cost`` is this run's
    spend, ``cost_saved`` the recorded cost of the reused rows.
    """

    total: int | None = None
    done: int = 0
    counts: Counts = field(default_factory=Counts)
    retries: int = 0
    in_flight: int = 0
    skipped: int = 0
    reused: int = 0
    sent: int = 0
    cost: float = 0.0
    cost_saved: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @classmethod
    def resumed(cls, rows: int, counts: Counts) -> RunStats:
        """Counters that start after ``rows`` rows finished by earlier runs,
        which count for ``counts`` (copied)."""
        return cls(done=rows, skipped=rows, counts=counts.copy())

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
        self.done += 1
        self.counts.count(ok, error_code, tokens_in, tokens_out, cost)
        self.record_sent(attempts, cost)
        if latency_s is not None:
            self.latency.record(latency_s)

    def record_sent(self, attempts: int, cost: float) -> None:
        """Count a row this run sent ``attempts`` times (0: never sent) and
        the ``cost`` it paid for it, whether or not its record is written yet."""
        if attempts:
            self.sent += 1
            if attempts > 1:
                self.retries += attempts - 1
        self.cost += cost

    def record_earlier(self, verdict: Tally) -> None:
        """Count a row an earlier run finished: in the totals, not in the rate.

        Its tokens and cost count even when its record says ``reused``, as
        they always have here (the resume scan, ``Counts.count_record``,
        leaves them out).
        """
        self.done += 1
        v = verdict
        self.counts.count(v.ok, v.error_code, v.tokens_in, v.tokens_out, v.cost)
        self.skipped += 1

    def record_batched(self, verdict: Tally) -> None:
        """Count a row a batch answered: this run's work, in the totals and
        the rate (its cost is added once the run ends, see ``runner``)."""
        self.done += 1
        v = verdict
        self.counts.count(v.ok, v.error_code, v.tokens_in, v.tokens_out, v.cost)

    def record_batched_run(self, verdicts: Sequence[Tally]) -> None:
        """``record_batched`` for each of ``verdicts`` in turn, with the same
        sums: the cost is added row by row, in order, as floats add."""
        self.done += len(verdicts)
        self.counts.count_all(verdicts)

    def record_reused(self, verdict: Tally) -> None:
        """Count a row answered from a result store: no tokens or cost of this
        output's, its recorded cost saved."""
        self.done += 1
        self.counts.count(verdict.ok, verdict.error_code)
        self.reused += 1
        self.cost_saved += verdict.cost


@dataclass(frozen=True, kw_only=True, slots=True)
class Summary:
    """End-of-run report: printed for humans (``render``), saved as JSON (``to_dict``).

    ``rows`` counts rows with a final outcome, skipped ones included;
    ``rows_per_s`` counts only rows processed in this run. ``reused`` counts
    rows answered from a result store or by an identical row, ``sent`` rows
    this run sent. ``cost``
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        """``to_dict``'s reverse, for a saved summary (``finished.json``).

        Keys it does not know are ignored (``finished_at``, or a newer
        version's); a missing one is empty (0, None, nothing). Raises
        TypeError or ValueError for a value of the wrong shape.
        """
        known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        known["failed_by_code"] = dict(known.get("failed_by_code") or {})
        known["extra"] = dict(known.get("extra") or {})
        return cls(**{**_EMPTY, **known})

    def replay(self, *, output: str, extra: dict[str, object]) -> Summary:
        """What a run that finds this one finished reports: the same rows,
        verdicts, tokens and exit code (as a resumed run counts its earlier
        runs' rows), every row done by an earlier run, nothing sent, spent
        or timed now."""
        return Summary(
            **{
                **_NOTHING_DONE,
                "rows": self.rows,
                "ok": self.ok,
                "failed": self.failed,
                "failed_by_code": dict(self.failed_by_code),
                "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out,
                "skipped": self.rows,
                "exit_code": self.exit_code,
                "output": output,
                "extra": dict(extra),
            }
        )

    def render(self) -> str:
        """A few lines of text for a person, without a trailing newline."""
        head = (
            f"batchrun: {self.rows:,} rows in {duration_text(self.duration_s)} "
            f"({self.rows_per_s:,.1f} rows/s): {self.ok:,} ok, {self.failed:,} failed"
        )
        if self.failed_by_code:
            head += " (" + ", ".join(f"{c}: {n:,}" for c, n in self.failed_by_code.items()) + ")"
        if self.skipped:
            head += f"; {self.skipped:,} of them done by an earlier run"
        if self.reused:
            head += f"; {self.reused:,} reused (not paid again)"
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


# The fields of a summary without a default, for a run that did nothing.
_NOTHING_DONE: Final[dict[str, Any]] = {
    "retries": 0,
    "tokens_in": 0,
    "tokens_out": 0,
    "latency_p50_ms": None,
    "latency_p95_ms": None,
    "latency_p99_ms": None,
    "duration_s": 0.0,
    "rows_per_s": 0.0,
    "aborted": None,
}
_EMPTY: Final[dict[str, Any]] = {
    **_NOTHING_DONE,
    **dict.fromkeys(("rows", "ok", "failed", "skipped", "exit_code"), 0),
    "failed_by_code": {},
    "output": "",
}


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


def duration_text(seconds: float, *, whole: bool = False) -> str:
    """``12.3 s`` (``12 s`` when ``whole``), ``4 min 05 s`` or ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s" if whole else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
