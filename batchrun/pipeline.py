"""One run's reader, workers and ordered writer, in one task group.

    reader --(window slot, request)--> workers x max_async --(result)--> writer

* The reader takes a slot of the reorder window before each row and the
  writer gives it back once the row is written, so at most ``reorder_window``
  rows are between reading and writing whatever the completion order.
* Workers are exactly ``max_async`` tasks: that is the in-flight cap. Each
  marks a row begun in the journal before sending it and journals its result
  as soon as it has one, before anything else happens to it.
* The writer emits rows in input order into ``output.partial`` and compacts
  the journal at checkpoints.

Stopping (a signal, a fatal answer) stops the reader and lets no worker start
a new row; in-flight rows get a grace period, then are cancelled. Whatever
finished is journaled, so the run resumes where it stopped.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import orjson
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchrun import crashpoint
from batchrun.client import Client
from batchrun.config import WHOLE, RunConfig
from batchrun.errors import FatalError
from batchrun.inputs import count_lines, open_input
from batchrun.journal import CorruptStateError, Journal
from batchrun.metrics import MetricsWriter
from batchrun.progress import ProgressReporter, RunStats
from batchrun.providers import Provider
from batchrun.records import (
    Defaults,
    LineError,
    Outcome,
    Request,
    line_error_outcome,
    output_line,
    parse_line,
)
from batchrun.resume import ResumePoint, Tally, tally
from batchrun.sender import RowSender
from batchrun.state import Checkpoint, StateDir
from batchrun.throttle import Throttle
from batchrun.timing import Clock
from batchrun.writer import OutputFile, ReorderBuffer

# Rows between journal compactions: bounds the journal and the resume scan.
CHECKPOINT_EVERY = 50_000


@dataclass(frozen=True, slots=True)
class Finished:
    """A row ready for the writer: its output record and where its input ended."""

    index: int  # 0-based input row
    input_end: int  # byte offset in the input just after this row
    data: bytes  # the output record, newline included
    outcome: Outcome | None  # None: finished by an earlier run


Work = tuple[int, int, Request]


class Pipeline:
    """Runs the rows of one job from a resume point; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        *,
        client: Client,
        provider: Provider,
        clock: Clock,
        reporter: ProgressReporter,
        state: StateDir,
        start: ResumePoint,
        throttle: Throttle,
        handle_signals: bool = False,
    ) -> None:
        self.config = config
        self.throttle = throttle
        self.client = client
        self.provider = provider
        self.clock = clock
        self.reporter = reporter
        self.stats: RunStats = reporter.stats
        self.state = state
        self.start = start
        self.handle_signals = handle_signals
        self.journal = Journal(state.journal_path, fsync=config.fsync)
        self.output = OutputFile(config.out)
        self.window = anyio.Semaphore(config.reorder_window)
        self.progress = start.checkpoint  # mutated as rows are written
        self.pending: dict[int, bytes] = dict(start.journal.results)  # journaled, unwritten
        self.in_flight: set[int] = set()  # begun, not finished: in doubt if we stop now
        self.in_doubt = len(start.journal.in_doubt)
        self.progress.in_doubt += self.in_doubt
        self.shard = config.shard or WHOLE
        self.rows_read = start.checkpoint.rows  # output rows the reader has handed on
        self.eof = False
        self.stop_reason: str | None = None
        self.aborted: FatalError | None = None
        self._producers = anyio.CancelScope()
        self.metrics = _metrics_writer(config, self.stats, throttle, clock)
        self.sender = RowSender(
            client, provider, throttle, config.retry, clock=clock, stats=self.stats
        )
        self._last_checkpoint = start.checkpoint.rows

    @property
    def complete(self) -> bool:
        """Every input row has its output line."""
        return self.eof and self.progress.rows == self.rows_read

    async def run(self) -> None:
        """Run until every row is written, or a stop; the state stays resumable."""
        self.output.open(keep_bytes=self.progress.output_bytes)
        self.journal.open()
        try:
            self.checkpoint()  # drops torn tails and settled records before anything new
            await self._run_tasks()
        finally:
            self._close()  # synchronous: nothing here can be cancelled

    def _close(self) -> None:
        if self.complete:
            self.stats.total = self.stats.done  # known now, even if the count was slower
        else:
            self.checkpoint()
        if self.metrics is not None:
            self.metrics.write()
        self.output.close()
        self.journal.close()
        self.reporter.close()

    def request_stop(self, reason: str) -> None:
        """Stop taking rows; a second request cancels in-flight rows at once."""
        if self.stop_reason is not None or self.aborted is not None:
            self._producers.cancel()
            return
        self.stop_reason = reason
        self._tasks.start_soon(self._cancel_after_grace)

    async def _cancel_after_grace(self) -> None:
        await self.clock.sleep(self.config.grace)
        self._producers.cancel()

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None or self.aborted is not None

    async def _run_tasks(self) -> None:
        limits = self.config.limits
        work_tx, work_rx = anyio.create_memory_object_stream[Work](limits.max_async)
        done_tx, done_rx = anyio.create_memory_object_stream[Finished](limits.max_async)
        async with done_rx, anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._count_total)
            if self.reporter.mode != "off":
                tasks.start_soon(self.reporter.heartbeat, self.clock.sleep)
            if self.handle_signals:
                tasks.start_soon(self._watch_signals)
            if self.metrics is not None:
                self.metrics.write()
                tasks.start_soon(self._keep_metrics_fresh, self.metrics)
            tasks.start_soon(self._produce, work_tx, work_rx, done_tx)
            await self._write(done_rx)
            # Every row that will be written is written; the helpers are left.
            tasks.cancel_scope.cancel()

    async def _produce(
        self,
        work_tx: MemoryObjectSendStream[Work],
        work_rx: MemoryObjectReceiveStream[Work],
        done_tx: MemoryObjectSendStream[Finished],
    ) -> None:
        with self._producers:
            async with anyio.create_task_group() as producers, work_tx, work_rx, done_tx:
                producers.start_soon(self._read, work_tx.clone(), done_tx.clone())
                for _ in range(self.config.limits.max_async):
                    producers.start_soon(self._work, work_rx.clone(), done_tx.clone())

    async def _keep_metrics_fresh(self, metrics: MetricsWriter) -> None:
        """Rewrite the metrics file on a timer, so a stalled run shows as one."""
        while True:
            await self.clock.sleep(metrics.interval)
            metrics.write()

    async def _count_total(self) -> None:
        lines = await anyio.to_thread.run_sync(
            count_lines, self.config.input, abandon_on_cancel=True
        )
        self.stats.total = self.shard.rows_before(lines)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.request_stop(f"interrupted by {signal.Signals(signum).name}")

    # -- reader ---------------------------------------------------------------

    async def _read(self, work: ObjectSendStream[Work], done: ObjectSendStream[Finished]) -> None:
        defaults = Defaults(model=self.config.model, params=self.config.params)
        first, offset = self.start.checkpoint.input_line, self.start.checkpoint.input_offset
        async with work, done:
            with open_input(self.config.input) as handle, self._previous(first) as previous:
                handle.seek(offset)
                shard = self.shard
                for index, raw in enumerate(handle, start=first):
                    offset += len(raw)
                    if not shard.owns(index):
                        continue
                    old = next(previous, None) if previous is not None else None
                    if shard.seq(index) < self.progress.rows:
                        continue  # written by an earlier run
                    await self.window.acquire()
                    if self.stopping:
                        return
                    self.rows_read = shard.seq(index) + 1
                    item = self._known(index, offset, old) or self._parse(
                        index, offset, raw, defaults
                    )
                    if isinstance(item, Finished):
                        await done.send(item)
                    elif not await _send_unless_stopped(work, item, self):
                        return
            self.eof = True

    def _known(self, index: int, offset: int, old: bytes | None) -> Finished | None:
        """The row's result if an earlier run has it (journal, or kept output)."""
        line = index + 1
        data = self.pending.get(line)
        if data is None and old is not None:
            data = _kept_record(old, line, self.config.out)
        return None if data is None else Finished(index, offset, data, None)

    def _parse(self, index: int, offset: int, raw: bytes, defaults: Defaults) -> Work | Finished:
        parsed = parse_line(raw.rstrip(b"\r\n"), index + 1, defaults)
        if isinstance(parsed, LineError):
            outcome = line_error_outcome(parsed)
            return Finished(index, offset, output_line(outcome), outcome)
        return (index, offset, parsed)

    @contextmanager
    def _previous(self, skip: int) -> Iterator[Iterator[bytes] | None]:
        """With --retry-failed: the finished output's lines, from row ``skip``."""
        if not self.config.retry_failed:
            yield None
            return
        with self.config.out.open("rb") as handle:
            for _ in range(self.shard.rows_before(skip)):
                handle.readline()
            yield iter(handle)

    # -- workers --------------------------------------------------------------

    async def _work(
        self, work: ObjectReceiveStream[Work], done: ObjectSendStream[Finished]
    ) -> None:
        async with work, done:
            async for index, offset, request in work:
                if self.stopping:
                    return
                finished = await self._journaled(index, offset, request)
                if finished is None:
                    return
                await done.send(finished)

    async def _journaled(self, index: int, offset: int, request: Request) -> Finished | None:
        """Send one row with its journal marks; None when the answer was fatal."""
        line = request.line
        self.journal.begin(line)
        self.in_flight.add(line)  # stays there if cancelled: that row is in doubt
        try:
            outcome = await self.sender.send(request)
        except FatalError as exc:
            self.journal.abandon(line)
            self.in_flight.discard(line)
            self._abort(exc)
            return None
        crashpoint.hit("after_response")
        data = output_line(outcome)
        self.journal.record(data)
        self.pending[line] = data
        self.in_flight.discard(line)
        return Finished(index, offset, data, outcome)

    def _abort(self, exc: FatalError) -> None:
        if self.aborted is None:
            self.aborted = exc
        self._producers.cancel()

    # -- writer ---------------------------------------------------------------

    async def _write(self, done: MemoryObjectReceiveStream[Finished]) -> None:
        # The stream stays open if this task is cancelled, so that a worker
        # finishing at that instant blocks (and is cancelled) instead of
        # failing on a closed stream.
        reorder: ReorderBuffer[Finished] = ReorderBuffer(self.progress.rows)
        async for item in done:
            for ready in reorder.push(self.shard.seq(item.index), item):
                self._emit(ready)
            if done.statistics().current_buffer_used == 0:
                self._flush()

    def _emit(self, item: Finished) -> None:
        self.output.write(item.data)
        self.pending.pop(item.index + 1, None)
        self.window.release()
        progress = self.progress
        progress.rows += 1
        progress.output_bytes += len(item.data)
        progress.input_line, progress.input_offset = item.index + 1, item.input_end
        self._count(item)
        if progress.rows - self._last_checkpoint >= CHECKPOINT_EVERY:
            self.checkpoint()
        self.reporter.update()

    def _count(self, item: Finished) -> None:
        outcome = item.outcome
        if outcome is None:
            verdict = tally(orjson.loads(item.data), self.provider.usage)
            self.stats.record_earlier(
                ok=verdict.ok,
                error_code=verdict.error_code,
                tokens_in=verdict.tokens_in,
                tokens_out=verdict.tokens_out,
            )
            return
        self.stats.record_outcome(
            ok=outcome.ok,
            error_code=outcome.error_code,
            attempts=outcome.attempts,
            latency_s=outcome.latency_s,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
        )

    def _flush(self) -> None:
        batch = self.config.fsync == "batch"
        self.output.flush(fsync=batch)
        if batch:
            self.journal.sync()

    def checkpoint(self) -> None:
        """Make the ordered output durable, compact the journal to what it does
        not hold yet, and record how far it has come. Crash-safe in any order
        of interruption: each step leaves a state the next resume reads right."""
        self.output.flush(fsync=True)
        begun = [b'{"b":%d}\n' % line for line in sorted(self.in_flight)]
        self.journal.rewrite([*begun, *self.pending.values()])
        self.state.write_checkpoint(self._checkpoint_record())
        self._last_checkpoint = self.progress.rows

    def _checkpoint_record(self) -> Checkpoint:
        stats, progress = self.stats, self.progress
        progress.ok = stats.ok
        progress.failed_by_code = dict(stats.failed_by_code)
        progress.tokens_in, progress.tokens_out = stats.tokens_in, stats.tokens_out
        return progress


async def _send_unless_stopped(work: ObjectSendStream[Work], item: Work, run: Pipeline) -> bool:
    """Hand a row to the workers; False when they have all stopped."""
    try:
        await work.send(item)
    except anyio.BrokenResourceError:
        if not run.stopping:
            raise
        return False
    return True


def _kept_record(old: bytes, line: int, out: object) -> bytes | None:
    """A finished output's record for ``line``, unless --retry-failed resends it."""
    try:
        data = orjson.loads(old)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or data.get("line") != line:
        raise CorruptStateError(f"{out} does not match the input at line {line}")
    error = data.get("error")
    if isinstance(error, dict) and error.get("retryable"):
        return None
    return old if old.endswith(b"\n") else old + b"\n"


def _metrics_writer(
    config: RunConfig, stats: RunStats, throttle: Throttle, clock: Clock
) -> MetricsWriter | None:
    if config.metrics_file is None:
        return None
    shard = str(config.shard) if config.shard else None
    return MetricsWriter(
        config.metrics_file,
        stats,
        job=config.out.name,
        shard=shard,
        extra=throttle.gauges,
        clock=clock.monotonic,
    )


__all__ = ["CHECKPOINT_EVERY", "Finished", "Pipeline", "Tally"]
