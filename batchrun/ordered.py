"""The last step of a run's data flow: results into the output, in input order.

    RowSource --> Workers --> OrderedWriter

``OrderedWriter`` owns everything between a row's answer and its output
line: the journal (a row's begun mark, its result the moment it arrives),
the results journaled but not written yet, the reorder buffer, the reorder
window's slots (a worker takes one before it takes a row; the writer gives it
back when the row is written), the output file, the counts, and the
checkpoints that compact the journal. Synchronous: nothing here awaits.

Invariant: every result is in exactly one of the ordered output, the journal
(``pending``), or a result store flushed before the journal forgot it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from batchrun import crashpoint
from batchrun.concurrency import FifoSlots
from batchrun.config import WHOLE, RunConfig
from batchrun.errors import DiskError
from batchrun.holding import Held
from batchrun.journal import Journal
from batchrun.progress import ProgressReporter
from batchrun.providers import Provider
from batchrun.resume import ResumePoint, tally
from batchrun.reuse import Answers
from batchrun.rowsource import Finished, line_of
from batchrun.state import Checkpoint, StateDir
from batchrun.stats import RunStats, Tally
from batchrun.writer import OutputFile, ReorderBuffer

__all__ = ["CHECKPOINT_BYTES", "CHECKPOINT_EVERY", "OrderedWriter"]

# Rows between journal compactions: bounds the journal and the resume scan.
CHECKPOINT_EVERY = 50_000
# ... and output bytes between them: the journal keeps every written row's
# result until the next compaction, so 50,000 large answers would otherwise
# be kept twice on disk (journal and output) and all be parsed again by a
# resume.
CHECKPOINT_BYTES = 256 << 20


class OrderedWriter:
    """Journals results and writes them in input order; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        *,
        state: StateDir,
        start: ResumePoint,
        provider: Provider,
        answers: Answers,
        reporter: ProgressReporter,
    ) -> None:
        self.config = config
        self.state = state
        self.provider = provider
        self.answers = answers
        self.reporter = reporter
        self.stats = reporter.stats
        self.shard = config.shard or WHOLE
        self.journal = Journal(state.journal_path, fsync=config.fsync)
        answers.before_commit = self._journal_first
        self.output = OutputFile(config.out)
        self.window = FifoSlots(config.reorder_window)
        self.reorder: ReorderBuffer[Finished] = ReorderBuffer(start.checkpoint.rows)
        self.progress = start.checkpoint  # mutated as rows are written
        # One Counts for the run and its checkpoint: a row is counted once, as
        # it is written (``_count``), so a checkpoint saves the counts of
        # exactly the rows it holds.
        self.progress.counts = self.stats.counts
        # Journaled, unwritten, by line; in memory up to --reorder-bytes, then in the journal only.
        self.held = Held(self.journal, config.reorder_bytes, start.journal.results)
        # The result journaled for a line and not written yet, if any: the
        # held results' own lookup, asked for each row the row source reads.
        self.journaled: Callable[[int], bytes | None] = self.held.get
        self.in_flight: set[int] = set()  # lines begun, not answered: in doubt if we stop now
        self._cadence = _Cadence(start.checkpoint.rows, start.checkpoint.output_bytes)

    # -- the journal ----------------------------------------------------------

    def _journal_first(self) -> None:
        """Before a result store commits: the journal writes out the records it
        still holds, so a result reaches a store only once the journal has it.
        A journal that can't be written reports it at its own next write; the
        store still takes the results (they are paid for)."""
        with contextlib.suppress(DiskError):
            self.journal.flush()

    def begin(self, line: int) -> None:
        """``line``'s request goes to the socket next: from now on it is in
        doubt until its result is journaled (it stays in ``in_flight`` if
        cancelled). A row cancelled while it waited at the throttle or for
        its connection never gets here: it reached nobody."""
        self.journal.begin(line)
        self.in_flight.add(line)  # stays there if cancelled: that row is in doubt

    def abandon(self, line: int) -> None:
        """``line``'s request was not paid for: a fatal answer, or an error
        answer before a retry (which marks the row begun again)."""
        if line in self.in_flight:  # else it never went out: nothing to undo
            self.journal.abandon(line)
            self.in_flight.discard(line)

    def record(self, line: int, data: bytes, key: bytes) -> int | None:
        """``line``'s result ``data`` (its request's content ``key``) arrived;
        returns where the journal holds it, if it tells."""
        journal_at = self.journal.record(data, line=line, key=key)
        self.held.add(line, data)
        self.in_flight.discard(line)
        return journal_at

    # -- the output -----------------------------------------------------------

    def open(self) -> None:
        """Open the output and the journal where the resume point left them."""
        self.output.open(keep_bytes=self.progress.output_bytes)
        self.journal.open()
        self.checkpoint()  # drops torn tails and settled records before anything new

    def close(self, *, complete: bool, disk_error: DiskError | None = None) -> DiskError | None:
        """Checkpoint (unless complete, or a write failed: then the state stays
        as a kill would leave it) and close; returns the write failure, if any."""
        steps = [self.output.close, self.journal.close, self.held.close]
        if not complete and disk_error is None:
            steps.insert(0, self.checkpoint)
        for step in steps:
            try:
                step()
            except DiskError as exc:
                disk_error = disk_error or exc
        return disk_error

    def deliver(self, item: Finished) -> None:
        """Take a finished row; write it and every row it unblocks, in order."""
        place = self.shard.seq(item.row)
        if place != self.reorder.next_index:
            item = self._wait(item)
        for ready in self.reorder.push(place, item):
            self._emit(ready)

    def _wait(self, item: Finished) -> Finished:
        """A row that must wait for an earlier one keeps only what its turn
        needs: the answer's parsed body goes (its record has it), and past
        --reorder-bytes the record itself stays in the journal only (or in
        a scratch file, when the journal does not hold it)."""
        outcome = item.outcome
        if outcome is not None and outcome.response is not None:
            outcome = dataclasses.replace(outcome, response=None)
        assert item.data is not None, "a row waits once"
        if self.held.keep(line_of(item.row), item.data, item.journal_at):
            return item._replace(outcome=outcome, kept=len(item.data))
        return item._replace(data=None, outcome=outcome)

    def is_next(self, row: int) -> bool:
        """Whether 0-based input ``row`` is the next to write: every earlier
        row is written (and, as rows are read in order, none later waits)."""
        return self.shard.seq(row) == self.reorder.next_index

    def write_now(self, item: Finished) -> None:
        """Write ``item``, a known row that ``is_next`` and took no window
        slot: as ``deliver`` would, with the same counts and checkpoints."""
        self.reorder.pass_next()
        self._write(item)

    def room(self) -> tuple[int, int]:
        """Rows and output bytes still to write before a checkpoint is due
        (each at least 1: the row that reaches either one is followed by it)."""
        return self._cadence.room(self.progress)

    def write_run(self, records: list[bytes], tallies: list[Tally], row: int, end: int) -> None:
        """Write rows a batch answered (``records``, counted as ``tallies``,
        not journaled) as ``write_now`` would one at a time: the first
        ``is_next``, each the next place, the last 0-based input ``row``, its
        line ending at input offset ``end``, and none past ``room``'s (so a
        checkpoint follows the same row as one by one)."""
        self.reorder.pass_next(len(records))
        size = _write_all(self.output, records)
        progress = self.progress
        progress.rows += len(records)
        progress.output_bytes += size
        progress.input_line, progress.input_offset = line_of(row), end
        self.stats.record_batched_run(tallies)
        if self._cadence.due(progress):
            self.checkpoint()
        self.reporter.update()

    def _emit(self, item: Finished) -> None:
        self._write(item)
        self.window.release()

    def _write(self, item: Finished) -> None:
        line = line_of(item.row)
        data = item.data
        if data is None:
            data = self.held.get(line)
            assert data is not None, "a row waiting outside memory is held"
        self.output.write(data)
        self.held.done(line, item.kept)
        progress = self.progress
        progress.rows += 1
        progress.output_bytes += len(data)
        progress.input_line, progress.input_offset = line, item.input_end
        _count(self.stats, self.provider, item, data)
        if self._cadence.due(progress):
            self.checkpoint()
        self.reporter.update()

    def flush(self, *, store: bool = True) -> None:
        """Hand written lines to the OS (with --fsync batch, to the disk with the
        journal); with ``store``, commit the buffered results to the stores too."""
        batch = self.config.fsync == "batch"
        self.output.flush(fsync=batch)
        if batch:
            self.journal.sync()
        if store:
            self.answers.flush()

    def checkpoint(self) -> None:
        """Make the ordered output durable, compact the journal to what it does
        not hold yet, and record how far it has come. Crash-safe in any order
        of interruption: each step leaves a state the next resume reads right."""
        self.output.flush(fsync=True)
        self.answers.flush()  # before the journal forgets: every result is in one of them
        # The checkpoint before the compaction: it carries the in-doubt count
        # of the begun marks the compaction drops. A kill between the two then
        # counts those rows in doubt twice (safe), never zero times. A journal
        # older than its checkpoint is read right: records of written rows
        # are skipped.
        self.state.write_checkpoint(self.progress)
        crashpoint.hit("between_checkpoint_and_compaction")
        begun = [b'{"b":%d}\n' % line for line in sorted(self.in_flight)]
        self.held.compact(begun)
        self._cadence.mark(self.progress)


@dataclass(slots=True)
class _Cadence:
    """When the next checkpoint is due: once ``CHECKPOINT_EVERY`` rows or
    ``CHECKPOINT_BYTES`` output bytes are written after the last one, which
    held ``rows`` rows and ``bytes`` bytes."""

    rows: int
    bytes: int

    def room(self, progress: Checkpoint) -> tuple[int, int]:
        """Rows and output bytes still to write before a checkpoint is due."""
        return (
            CHECKPOINT_EVERY - (progress.rows - self.rows),
            CHECKPOINT_BYTES - (progress.output_bytes - self.bytes),
        )

    def due(self, progress: Checkpoint) -> bool:
        rows, size = self.room(progress)
        return rows <= 0 or size <= 0

    def mark(self, progress: Checkpoint) -> None:
        """A checkpoint of ``progress`` was just written."""
        self.rows, self.bytes = progress.rows, progress.output_bytes


def _write_all(output: OutputFile, records: list[bytes]) -> int:
    """Write ``records`` in one call; the bytes written."""
    if crashpoint.ARMED:  # ``output_torn`` counts rows: each its own write
        for record in records:
            output.write(record)
        return sum(map(len, records))
    data = b"".join(records)
    output.write(data)
    return len(data)


def _count(stats: RunStats, provider: Provider, item: Finished, data: bytes) -> None:
    """Count written row ``item`` (its record ``data``) in ``stats``."""
    outcome = item.outcome
    if outcome is not None:
        stats.record_outcome(
            ok=outcome.ok,
            error_code=outcome.error_code,
            attempts=outcome.attempts,
            latency_s=outcome.latency_s,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
            cost=outcome.cost or 0.0,
        )
        return
    verdict = item.tally or tally(orjson.loads(data), provider.usage)
    if item.reused:
        stats.record_reused(verdict)
    elif item.batched:
        stats.record_batched(verdict)
    else:
        stats.record_earlier(verdict)
