"""A Prometheus textfile of a run's counters, for node_exporter's textfile collector.

``render_metrics`` turns a ``RunStats`` into text exposition format 0.0.4;
``write_metrics`` replaces the file atomically; ``MetricsWriter`` rewrites it
at most every ``interval`` seconds while the run goes. The collector reads
only ``*.prom`` files, so the temporary ``.<name>.<random>.tmp`` beside the
target is never read half-written.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from batchrun.paths import replace_file
from batchrun.stats import RunStats

log = logging.getLogger("batchrun")

__all__ = ["MetricsWriter", "render_metrics", "write_metrics"]

PREFIX = "batchrun_"

# (extra labels, value) of one series; the job/shard labels are added to all.
_Series = list[tuple[dict[str, str], float]]

_UNSAFE_NAME = re.compile(r"[^a-zA-Z0-9_]")
_QUANTILES = (("0.5", 50.0), ("0.95", 95.0), ("0.99", 99.0))


def render_metrics(
    stats: RunStats,
    *,
    job: str,
    shard: str | None,
    extra: Mapping[str, float],
    output: str | None = None,
) -> str:
    """``stats`` as exposition text (ends with a newline).

    Every series carries ``job`` (label ``batch_job``) and, when given,
    ``output`` (the output's absolute path) and ``shard`` ("I/N"). Each
    ``extra`` item becomes a gauge ``batchrun_<name>``, characters outside
    ``[a-zA-Z0-9_]`` in the name replaced by ``_``. A family with no series
    (no failures yet, no latency yet, unknown total) is left out. Raises
    ValueError when an extra's name clashes with another metric's.
    """
    # Not "job": Prometheus sets that label itself at scrape time. The path
    # tells apart two jobs whose outputs share a name: node_exporter refuses
    # series that two textfiles both hold.
    labels = {"batch_job": job, "output": output, "shard": shard}
    common = {name: value for name, value in labels.items() if value is not None}
    lines: list[str] = []
    for name, series in _series(stats).items():
        kind, help_text = _METRICS[name]
        lines += _family(PREFIX + name, kind, help_text, series, common)
    seen = set(_METRICS)
    for given, value in extra.items():
        name = _UNSAFE_NAME.sub("_", given)
        if name in seen:
            raise ValueError(f"extra {given!r} would be a second metric {PREFIX}{name}")
        seen.add(name)
        lines += _family(PREFIX + name, "gauge", f"Run value {given}.", [({}, value)], common)
    return "".join(line + "\n" for line in lines)


def write_metrics(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole (``paths.replace_file``); raises
    OSError when it cannot."""
    replace_file(path, text.encode())


class MetricsWriter:
    """Keeps a metrics textfile current during a run.

    ``write`` is called at the start and the end of the run, and every
    ``interval`` seconds in between (the pipeline's metrics timer). ``extra``
    is called at each write for the extra gauges.
    Metrics are best effort: a failed write (OSError: the directory removed,
    the disk full) is logged once as a warning and never stops the run, which
    tries again at the next write.
    """

    def __init__(
        self,
        path: Path,
        stats: RunStats,
        *,
        job: str,
        shard: str | None,
        extra: Callable[[], Mapping[str, float]] | None = None,
        interval: float = 10.0,
        output: str | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.path = path
        self.stats = stats
        self.job = job
        self.shard = shard
        self.output = output
        self.interval = interval
        self._extra = extra
        self._warned = False  # one warning per run, however many writes fail

    def write(self) -> None:
        """Write the file now."""
        extra = self._extra() if self._extra is not None else {}
        text = render_metrics(
            self.stats, job=self.job, shard=self.shard, extra=extra, output=self.output
        )
        try:
            write_metrics(self.path, text)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "could not write the metrics file %s (%s); the run goes on without it",
                    self.path,
                    exc.strerror or exc,
                )


# Built-in metrics, name without the prefix -> (type, help). The rows_* values
# are gauges: a resumed run starts them at the earlier runs' counts.
_METRICS = {
    "rows_total": ("gauge", "Input rows this run covers (this shard's when sharded)."),
    "rows_done": ("gauge", "Rows with a final outcome, those of earlier runs of the job included."),
    "rows_ok": ("gauge", "Rows that succeeded."),
    "rows_failed": ("gauge", "Rows that failed for good, by error code."),
    "retries_total": ("counter", "Attempts beyond each row's first."),
    "in_flight": ("gauge", "Requests being sent now."),
    "tokens_total": ("counter", "Tokens the provider reported, by direction."),
    "latency_seconds": ("gauge", "Per-row latency quantiles, in seconds."),
}


def _series(stats: RunStats) -> dict[str, _Series]:
    """The series of each built-in metric (keys as ``_METRICS``), empty when unknown."""
    latency = ((label, stats.latency.percentile(q)) for label, q in _QUANTILES)
    return {
        "rows_total": [] if stats.total is None else [({}, stats.total)],
        "rows_done": [({}, stats.done)],
        "rows_ok": [({}, stats.ok)],
        "rows_failed": [({"code": c}, n) for c, n in sorted(stats.failed_by_code.items())],
        "retries_total": [({}, stats.retries)],
        "in_flight": [({}, stats.in_flight)],
        "tokens_total": [
            ({"direction": "in"}, stats.tokens_in),
            ({"direction": "out"}, stats.tokens_out),
        ],
        "latency_seconds": [({"quantile": q}, v) for q, v in latency if v is not None],
    }


def _family(
    name: str, kind: str, help_text: str, series: _Series, common: Mapping[str, str]
) -> list[str]:
    """The HELP, TYPE and sample lines of one metric; none without series."""
    if not series:
        return []
    lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]
    for labels, value in series:
        pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in {**common, **labels}.items())
        lines.append(f"{name}{{{pairs}}} {_number(value)}")
    return lines


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value as the format spells it (Python's nan and inf are not)."""
    if isinstance(value, int):  # bool included: True is 1
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
