"""One run's data flow, in one task group:

    RowSource.rows() --> Workers (max_async + spares) --> OrderedWriter

* ``rowsource.RowSource`` reads the input from the resume point and yields
  each row to send, or its result when one is known without sending.
* ``workers.Workers`` send rows through the ``sender.RowSender`` (throttle,
  client, retries) and hand each result to the writer.
* ``ordered.OrderedWriter`` journals results, writes them in input order,
  gives back reorder-window slots and compacts the journal at checkpoints.
  At most ``reorder_window`` rows are between reading and writing.

``Pipeline`` starts them with the helpers around them (the total count, the
progress heartbeat, signals, metrics, the output flush timer) and returns a
``RunEnding``. Stopping (a signal, a fatal answer, the spending cap) lets no
worker take a new row; in-flight rows get a grace period, then are cancelled.
Whatever finished is journaled, so the run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager, closing, nullcontext
from typing import NamedTuple

import anyio

from batchrun.budget import Budget
from batchrun.config import WHOLE, RunConfig
from batchrun.errors import DiskError, FatalError, find_disk_error, sole_usage_error
from batchrun.inputs import READ_ERRORS, count_lines
from batchrun.metrics import MetricsWriter
from batchrun.ordered import CHECKPOINT_EVERY, OrderedWriter
from batchrun.progress import ProgressReporter
from batchrun.resume import ResumePoint
from batchrun.reuse import Answers
from batchrun.rowsource import Finished, KnownLookup, RowSource
from batchrun.sender import RowSender
from batchrun.signals import SignalStop
from batchrun.state import StateDir
from batchrun.stats import RunStats
from batchrun.throttle import Throttle
from batchrun.timing import Clock
from batchrun.workers import Workers

__all__ = ["CHECKPOINT_EVERY", "Finished", "Pipeline", "RunEnding"]

# Seconds between flushes of the ordered output to the operating system.
FLUSH_INTERVAL = 0.05
# Flushes of the output between commits of the buffered results to the result
# stores (also committed every ``reuse.FLUSH_EVERY`` results and at each
# checkpoint). A commit rewrites every index page its rows touch: a second's
# rows at once touch far fewer pages per row than a twentieth's.
STORE_EVERY = 20


class RunEnding(NamedTuple):
    """How a run ended. ``complete``: every input row has its output line;
    else ``aborted`` (a fatal answer), ``budget_reached``, or ``stop_reason``.
    ``in_doubt``: rows resent this run that an earlier run may have had
    answered; ``in_doubt_all``: the same over every run on this output."""

    complete: bool
    aborted: FatalError | None
    budget_reached: bool
    stop_reason: str | None
    in_doubt: int
    in_doubt_all: int
    held: dict[str, object]  # results that waited in the journal, for the summary
    disk_error: DiskError | None = None  # a write failed: the run stopped there (exit 74)


class Pipeline:
    """Runs the rows of one job from a resume point; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        *,
        sender: RowSender,
        answers: Answers,
        clock: Clock,
        reporter: ProgressReporter,
        state: StateDir,
        start: ResumePoint,
        budget: Budget,
        signals: SignalStop | None = None,
        known: KnownLookup | None = None,
        stop: anyio.Event | None = None,
    ) -> None:
        """``signals``: the run's SIGINT and SIGTERM, which stop it (the
        first gracefully, see ``request_stop``). ``stop``, once set, stops
        the run as SIGINT would (from another thread: set it through the
        loop, e.g. a blocking portal)."""
        self.config = config
        self.stop = stop
        self.clock = clock
        self.reporter = reporter
        self.stats: RunStats = reporter.stats
        self.signals = signals
        provider = sender.provider
        self.writer = OrderedWriter(
            config, state=state, start=start, provider=provider, answers=answers, reporter=reporter
        )
        self.source = RowSource(
            config,
            start=start,
            provider=provider,
            answers=answers,
            journaled=self.writer.journaled,
            known=known,
            now=self.writer,
        )
        self.workers = Workers(
            config, sender=sender, writer=self.writer, budget=budget, answers=answers
        )
        self.in_doubt = len(start.journal.in_doubt)
        self.writer.progress.in_doubt += self.in_doubt
        self.throttle = sender.throttle
        self.metrics = _metrics_writer(config, self.stats, sender.throttle)

    @property
    def complete(self) -> bool:
        """Every input row has its output line."""
        return self.source.eof and self.writer.progress.rows == self.source.rows_read

    async def run(self) -> RunEnding:
        """Run until every row is written, or a stop; the state stays resumable."""
        self.writer.open()
        disk_error: DiskError | None = None
        try:
            await self._run_tasks()
        except DiskError as exc:
            disk_error = exc
        except BaseExceptionGroup as group:
            disk_error = find_disk_error(group)
            usage = sole_usage_error(group)
            if disk_error is None and usage is None:
                raise
            if disk_error is None and usage is not None:
                raise usage from None
        finally:
            disk_error = self._close(disk_error)  # synchronous: nothing here can be cancelled
        if self.source.read_error is not None and disk_error is None:
            raise self.source.read_error  # the rows read are kept: fix the input, run again
        workers, cut_off = self.workers, self.writer.in_flight
        return RunEnding(
            complete=self.complete,
            aborted=workers.aborted,
            budget_reached=workers.budget.refused,
            stop_reason=workers.stop_reason,
            # resent after an earlier stop, and cut off in flight by this one
            in_doubt=self.in_doubt + len(cut_off),
            # the checkpoint's count leaves the rows cut off to the next run's
            in_doubt_all=self.writer.progress.in_doubt + len(cut_off),
            held=self.writer.held.report(),
            disk_error=disk_error,
        )

    def _close(self, disk_error: DiskError | None) -> DiskError | None:
        """Close the files; after a failed write the state is left as a kill
        at that moment would leave it (no checkpoint), which resume reads."""
        complete = self.complete
        if complete:
            self.stats.total = self.stats.done  # known now, even if the count was slower
        else:
            _count_waiting(self.writer.reorder.waiting(), self.stats)
        disk_error = self.writer.close(complete=complete, disk_error=disk_error)
        if self.metrics is not None:
            self.metrics.write()
        self.reporter.close()
        return disk_error

    def request_stop(self, reason: str) -> None:
        """Stop taking rows; a second request cancels in-flight rows at once."""
        if self.workers.stopping:
            self.workers.cancel()
            return
        self.workers.stop(reason)
        self._tasks.start_soon(self._cancel_after_grace)

    async def _cancel_after_grace(self) -> None:
        await self.clock.sleep(self.config.grace)
        self.workers.cancel()

    async def _run_tasks(self) -> None:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._count_total)
            if self.reporter.mode != "off":
                tasks.start_soon(self.reporter.heartbeat, self.clock.sleep)
            if self.stop is not None:
                tasks.start_soon(self._watch_stop, self.stop)
            if self.metrics is not None:
                self.metrics.write()
                tasks.start_soon(self._keep_metrics_fresh, self.metrics)
            tasks.start_soon(self._flush_often)
            tasks.start_soon(self.throttle.widen_while_quiet, self.clock.sleep)
            # Signals are taken before the first row: one that came earlier stops it here.
            with self._signals_handled(), closing(self.source.rows()) as rows:
                await self.workers.run(rows)
            # Every row that will be written is written; the helpers are left.
            tasks.cancel_scope.cancel()

    async def _keep_metrics_fresh(self, metrics: MetricsWriter) -> None:
        """Rewrite the metrics file on a timer, so a stalled run shows as one."""
        while True:
            await self.clock.sleep(metrics.interval)
            metrics.write()

    async def _flush_often(self) -> None:
        """Hand written lines to the OS every FLUSH_INTERVAL seconds of wall
        time, so readers of output.partial see progress without a write per
        row, and commit the buffered results to the result stores every
        STORE_EVERY flushes. Durability does not rest on this: the journal has
        every result."""
        for tick in itertools.count(1):
            await anyio.sleep(FLUSH_INTERVAL)
            self.writer.flush(store=tick % STORE_EVERY == 0)

    async def _count_total(self) -> None:
        try:
            lines = await anyio.to_thread.run_sync(
                count_lines, self.config.input, abandon_on_cancel=True
            )
        except READ_ERRORS:
            return  # the total stays unknown; the row source reports the damage
        self.stats.total = (self.config.shard or WHOLE).rows_before(lines)

    def _signals_handled(self) -> AbstractContextManager[None]:
        """While the rows run, a signal is a ``request_stop``."""
        if self.signals is None:
            return nullcontext()
        return self.signals.handled_by(self.request_stop)

    async def _watch_stop(self, stop: anyio.Event) -> None:
        await stop.wait()
        self.request_stop("interrupted")


def _metrics_writer(config: RunConfig, stats: RunStats, throttle: Throttle) -> MetricsWriter | None:
    if config.metrics_file is None:
        return None
    shard = str(config.shard) if config.shard else None
    return MetricsWriter(
        config.metrics_file,
        stats,
        job=config.out.name,
        shard=shard,
        extra=throttle.gauges,
        output=os.path.abspath(config.out),
    )


def _count_waiting(waiting: Iterable[Finished], stats: RunStats) -> None:
    """At a stop: count the answers left ``waiting`` for an earlier row as
    sent and paid by this run. They are journaled, and the next run writes
    them as done by an earlier run (``record_earlier``), which adds no spend
    of its own: without this, no run's summary would show it."""
    for item in waiting:
        if item.outcome is not None:
            stats.record_sent(item.outcome.attempts, item.outcome.cost or 0.0)
