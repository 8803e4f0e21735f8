"""One run's reader, workers and ordered writer, in one task group.

    rows (one generator) --> workers x max_async (+ spares) --> ordered writer

* Workers are ``max_async`` tasks, plus one spare for each row waiting out a
  retry's backoff: a lone failure waits only for its own row and takes no
  worker from the healthy ones. The in-flight cap is the throttle's limiter,
  never above ``max_async``; a spare leaves once its row's worker is back. Each
  takes a slot of the reorder window, then the next row from the shared
  input generator (synchronous, so rows come out in order), sends it
  (marking it begun in the journal once its throttle waits are over, just
  before it goes to the socket), journals its result as soon as it has one,
  and hands it to the writer. Nothing passes through queues: a row costs no task
  switches beyond its own request.
* The writer (synchronous) emits rows in input order into ``output.partial``,
  gives back their window slots, and compacts the journal at checkpoints. At
  most ``reorder_window`` rows are between reading and writing, whatever the
  completion order.

Stopping (a signal, a fatal answer) lets no worker take a new row; in-flight
rows get a grace period, then are cancelled. Whatever finished is journaled,
so the run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import anyio
import orjson

from batchrun import crashpoint
from batchrun.budget import Budget, worst_case_cost
from batchrun.client import Client
from batchrun.concurrency import FifoSlots
from batchrun.config import WHOLE, RunConfig
from batchrun.contentkey import request_key
from batchrun.errors import CorruptStateError, FatalError, sole_usage_error
from batchrun.holding import Held
from batchrun.inputs import READ_ERRORS, count_lines, open_input, read_lines
from batchrun.journal import Journal
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
from batchrun.resume import ResumePoint, tally
from batchrun.reuse import Answers, relabel
from batchrun.schema import AnswerCheck
from batchrun.sender import RowSender
from batchrun.state import Checkpoint, StateDir
from batchrun.throttle import Throttle
from batchrun.timing import Clock
from batchrun.writer import OutputFile, ReorderBuffer

# Rows between journal compactions: bounds the journal and the resume scan.
CHECKPOINT_EVERY = 50_000

# Seconds between flushes of the ordered output to the operating system.
FLUSH_INTERVAL = 0.05

# Known results a worker writes before it lets other tasks run.
_YIELD_EVERY = 256


class Finished(NamedTuple):
    """A row ready for the writer: its output record and where its input ended."""

    row: int  # 0-based input row
    input_end: int  # byte offset in the input just after this row
    data: bytes | None  # the output record, newline included; None: in the journal only
    outcome: Outcome | None  # None: finished by an earlier run, or reused
    reused: bool = False  # answered from a result store
    journal_at: int | None = None  # where the journal holds the record, if it does
    kept: int = 0  # bytes the record holds in memory while an earlier row is unfinished


Work = tuple[int, int, Request, bytes]  # row, input end, request, content key


class KnownLookup(Protocol):
    """Results found elsewhere (batch mode's collected answers), asked for by
    input line in increasing order; ``found`` counts the hits."""

    found: int

    def get(self, line: int) -> bytes | None: ...


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
        answers: Answers,
        handle_signals: bool = False,
        known: KnownLookup | None = None,
        stop: anyio.Event | None = None,
    ) -> None:
        """``stop``, once set, stops the run as SIGINT would (from another
        thread: set it through the loop, e.g. a blocking portal)."""
        self.config = config
        self.stop = stop
        self.known = known
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
        self.window = FifoSlots(config.reorder_window)
        self.reorder: ReorderBuffer[Finished] = ReorderBuffer(start.checkpoint.rows)
        self.progress = start.checkpoint  # mutated as rows are written
        # Journaled, unwritten; in memory up to --reorder-bytes, then in the journal only.
        self.held = Held(self.journal, config.reorder_bytes, start.journal.results)
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
        schema = config.response_schema
        self.sender = RowSender(
            client,
            provider,
            throttle,
            config.retry,
            clock=clock,
            stats=self.stats,
            answers=AnswerCheck(schema) if schema is not None else None,
        )
        self.sender.on_backoff = self._backing_off
        self.sender.on_send = self._begin
        self._workers = 0  # worker tasks alive
        self._backing_off_rows = 0  # rows waiting for a retry, each holding a worker
        self._last_checkpoint = start.checkpoint.rows
        self.answers = answers
        self.budget = Budget(config.costs.max_cost, spent=_spent_before(start, provider))
        self.stats.cost_before = start.checkpoint.cost

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
        except BaseExceptionGroup as group:
            usage = sole_usage_error(group)
            if usage is None:
                raise
            raise usage from None
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
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._count_total)
            if self.reporter.mode != "off":
                tasks.start_soon(self.reporter.heartbeat, self.clock.sleep)
            if self.handle_signals:
                tasks.start_soon(self._watch_signals)
            if self.stop is not None:
                tasks.start_soon(self._watch_stop, self.stop)
            if self.metrics is not None:
                self.metrics.write()
                tasks.start_soon(self._keep_metrics_fresh, self.metrics)
            tasks.start_soon(self._flush_often)
            await self._produce()
            # Every row that will be written is written; the helpers are left.
            tasks.cancel_scope.cancel()

    async def _produce(self) -> None:
        with self._producers, contextlib.closing(self._rows()) as rows:
            async with anyio.create_task_group() as workers:
                self._worker_group, self._rows_iter = workers, rows
                for _ in range(self.config.limits.max_async):
                    self._start_worker()

    def _start_worker(self) -> None:
        self._workers += 1
        self._worker_group.start_soon(self._work, self._rows_iter)

    def _backing_off(self, rows: int) -> None:
        """``rows`` (+1 or -1) more rows wait for a retry: keep max_async
        workers free for new rows by starting a spare when one is short."""
        self._backing_off_rows += rows
        if rows > 0 and not self.stopping and self._surplus() < 0:
            self._start_worker()

    def _surplus(self) -> int:
        """Workers beyond max_async and one per row waiting for a retry."""
        return self._workers - self.config.limits.max_async - self._backing_off_rows

    async def _keep_metrics_fresh(self, metrics: MetricsWriter) -> None:
        """Rewrite the metrics file on a timer, so a stalled run shows as one."""
        while True:
            await self.clock.sleep(metrics.interval)
            metrics.write()

    async def _count_total(self) -> None:
        try:
            lines = await anyio.to_thread.run_sync(
                count_lines, self.config.input, abandon_on_cancel=True
            )
        except READ_ERRORS:
            return  # the total stays unknown; the reader reports the damage
        self.stats.total = self.shard.rows_before(lines)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.request_stop(f"interrupted by {signal.Signals(signum).name}")

    async def _watch_stop(self, stop: anyio.Event) -> None:
        await stop.wait()
        self.request_stop("interrupted")

    # -- reader ---------------------------------------------------------------

    def _rows(self) -> Generator[Work | Finished, None, None]:
        """The rows still to do, in input order: each a request to send, or a
        result already known (journaled, kept by --retry-failed, or a bad
        line's error record). Sets ``eof`` at the end of the input."""
        defaults = self.config.request_defaults()
        first, offset = self.start.checkpoint.input_line, self.start.checkpoint.input_offset
        written, shard = self.progress.rows, self.shard
        with open_input(self.config.input) as handle, self._previous(first) as previous:
            handle.seek(offset)
            for index, raw in enumerate(read_lines(handle, self.config.input), start=first):
                offset += len(raw)
                if not shard.owns(index):
                    continue
                old = next(previous, None) if previous is not None else None
                place = shard.seq(index)
                if place < written:
                    continue  # written by an earlier run
                self.rows_read = place + 1
                yield self._known(index, offset, old) or self._parse(index, offset, raw, defaults)
        self.eof = True

    def _known(self, index: int, offset: int, old: bytes | None) -> Finished | None:
        """The row's result if an earlier run has it (journal, batches, or kept output)."""
        line = index + 1
        data = self.held.get(line)
        if data is None and self.known is not None:
            data = self.known.get(line)  # batch mode filed it in the store when collected
        if data is None and old is not None:
            data = _kept_record(old, line, self.config.out)
        return None if data is None else Finished(index, offset, data, None)

    def _parse(self, index: int, offset: int, raw: bytes, defaults: Defaults) -> Work | Finished:
        """The row to send, or its known result: a bad line's error record,
        or a result stored under the request's content key."""
        parsed = parse_line(raw.rstrip(b"\r\n"), index + 1, defaults)
        if isinstance(parsed, LineError):
            outcome = line_error_outcome(parsed)
            return Finished(index, offset, output_line(outcome), outcome)
        key = request_key(self.provider, parsed)
        found = self.answers.find(key)
        if found is not None:
            data = relabel(found.record, parsed.line, parsed.custom_id)
            return Finished(index, offset, data, None, reused=True)
        return (index, offset, parsed, key)

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

    async def _work(self, rows: Iterator[Work | Finished]) -> None:
        try:
            await self._work_rows(rows)
        finally:
            self._workers -= 1

    async def _work_rows(self, rows: Iterator[Work | Finished]) -> None:
        known_in_a_row = 0
        while not self.stopping and self._surplus() <= 0:
            await self.window.acquire()
            item = next(rows, None) if not self.stopping else None
            if item is None:
                self.window.release()
                return
            if isinstance(item, Finished):
                self._deliver(item)
                known_in_a_row += 1
                if known_in_a_row % _YIELD_EVERY == 0:
                    await anyio.lowlevel.checkpoint()  # let others run through a long resume
                continue
            finished = await self._journaled(*item)
            if finished is None:
                return
            self._deliver(finished)

    async def _journaled(
        self, index: int, offset: int, request: Request, key: bytes
    ) -> Finished | None:
        """Send one row with its journal marks; None when the answer was
        fatal or the budget refused the row (then it stays unsent)."""
        line, costs = request.line, self.config.costs
        reserved = worst_case_cost(costs, request) if costs.max_cost is not None else 0.0
        if not self.budget.reserve(reserved):
            self._stop_for_budget()
            return None
        try:
            outcome = await self.sender.send(request)  # marks it begun (_begin) when sent
        except FatalError as exc:
            if line in self.in_flight:
                self.journal.abandon(line)
                self.in_flight.discard(line)
            self.budget.release(reserved)
            self._abort(exc)
            return None
        crashpoint.hit("after_response")
        if costs.priced:
            outcome.cost = costs.price(outcome.tokens_in, outcome.tokens_out)
        self.budget.settle(reserved, outcome.cost or 0.0)
        data = output_line(outcome)
        journal_at = self.journal.record(data, line=line, key=key)
        self.answers.add_outcome(key, data, outcome)
        self.held.add(line, data)
        self.in_flight.discard(line)
        if self.budget.refused and not self.in_flight:
            self._producers.cancel()  # the last row in flight at a budget stop
        return Finished(index, offset, data, outcome, journal_at=journal_at)

    def _begin(self, line: int) -> None:
        """Row ``line``'s request goes to the socket next: from now on it is
        in doubt until its result is journaled (it stays in ``in_flight`` if
        cancelled). A row cancelled while it waited at the throttle never
        gets here: it reached nobody."""
        self.journal.begin(line)
        self.in_flight.add(line)

    def _stop_for_budget(self) -> None:
        """Take no more rows; end once the rows in flight are answered."""
        if self.stop_reason is None:
            self.stop_reason = "budget reached"
        if not self.in_flight:
            self._producers.cancel()

    def _abort(self, exc: FatalError) -> None:
        if self.aborted is None:
            self.aborted = exc
        self._producers.cancel()

    # -- writer ---------------------------------------------------------------

    def _deliver(self, item: Finished) -> None:
        place = self.shard.seq(item.row)
        if place != self.reorder.next_index:
            item = self._wait(item)
        for ready in self.reorder.push(place, item):
            self._emit(ready)

    def _wait(self, item: Finished) -> Finished:
        """A row that must wait for an earlier one keeps only what its turn
        needs: the answer's parsed body goes (its record has it), and past
        --reorder-bytes the record itself stays in the journal only."""
        outcome = item.outcome
        if outcome is not None and outcome.response is not None:
            outcome = dataclasses.replace(outcome, response=None)
        assert item.data is not None, "a row waits once"
        if self.held.keep(item.row + 1, item.data, item.journal_at):
            return item._replace(outcome=outcome, kept=len(item.data))
        return item._replace(data=None, outcome=outcome)

    async def _flush_often(self) -> None:
        """Hand written lines to the OS every FLUSH_INTERVAL seconds of wall
        time, so readers of output.partial see progress without a write per
        row. Durability does not rest on this: the journal has every result."""
        while True:
            await anyio.sleep(FLUSH_INTERVAL)
            self._flush()

    def _emit(self, item: Finished) -> None:
        line = item.row + 1
        data = item.data
        if data is None:
            data = self.held.get(line)
            assert data is not None, "a row waiting in the journal is held"
        self.output.write(data)
        self.held.done(line, item.kept)
        self.window.release()
        progress = self.progress
        progress.rows += 1
        progress.output_bytes += len(data)
        progress.input_line, progress.input_offset = line, item.input_end
        self._count(item, data)
        if progress.rows - self._last_checkpoint >= CHECKPOINT_EVERY:
            self.checkpoint()
        self.reporter.update()

    def _count(self, item: Finished, data: bytes) -> None:
        outcome = item.outcome
        if outcome is None:
            verdict = tally(orjson.loads(data), self.provider.usage)
            if item.reused:
                self.stats.record_reused(
                    ok=verdict.ok, error_code=verdict.error_code, cost=verdict.cost
                )
                return
            self.stats.record_earlier(
                ok=verdict.ok,
                error_code=verdict.error_code,
                tokens_in=verdict.tokens_in,
                tokens_out=verdict.tokens_out,
                cost=verdict.cost,
            )
            return
        self.stats.record_outcome(
            ok=outcome.ok,
            error_code=outcome.error_code,
            attempts=outcome.attempts,
            latency_s=outcome.latency_s,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
            cost=outcome.cost or 0.0,
        )

    def _flush(self) -> None:
        batch = self.config.fsync == "batch"
        self.output.flush(fsync=batch)
        if batch:
            self.journal.sync()
        self.answers.flush()

    def checkpoint(self) -> None:
        """Make the ordered output durable, compact the journal to what it does
        not hold yet, and record how far it has come. Crash-safe in any order
        of interruption: each step leaves a state the next resume reads right."""
        self.output.flush(fsync=True)
        self.answers.flush()  # before the journal forgets: every result is in one of them
        begun = [b'{"b":%d}\n' % line for line in sorted(self.in_flight)]
        self.held.compact(begun)
        self.state.write_checkpoint(self._checkpoint_record())
        self._last_checkpoint = self.progress.rows

    def _checkpoint_record(self) -> Checkpoint:
        stats, progress = self.stats, self.progress
        progress.ok = stats.ok
        progress.failed_by_code = dict(stats.failed_by_code)
        progress.tokens_in, progress.tokens_out = stats.tokens_in, stats.tokens_out
        progress.cost = stats.cost_before + stats.cost
        return progress


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


def _spent_before(start: ResumePoint, provider: Provider) -> float:
    """What earlier runs on this output spent: the ordered output's rows and
    the journaled ones after them."""
    journaled = (tally(orjson.loads(raw), provider.usage) for raw in start.journal.results.values())
    return start.checkpoint.cost + sum(verdict.cost for verdict in journaled)


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


__all__ = ["CHECKPOINT_EVERY", "Finished", "Pipeline"]
