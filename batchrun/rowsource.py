"""The rows still to do, in input order: the first step of a run's data flow.

    RowSource --> Workers --> OrderedWriter

One synchronous generator reads the input from the resume point and yields,
for each row this run owns, either ``Work`` (a request to send) or
``Finished`` (a result known without sending: journaled by an earlier run,
collected from a batch, kept by ``--retry-failed``, stored under the
request's content key, or a bad line's error record).

Row numbers: ``row`` is the 0-based index of a line in the input (the
generator's count); ``line`` is ``row + 1``, as in output records; an output
``place`` is ``shard.seq(row)``. Conversions happen here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

import orjson

from batchrun.config import WHOLE, RunConfig
from batchrun.contentkey import request_key
from batchrun.errors import CorruptStateError
from batchrun.inputs import READ_ERRORS, InputReadError, open_input, unreadable
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
from batchrun.resume import ResumePoint, finished_lines, free_tally
from batchrun.reuse import Answers, relabel
from batchrun.stats import Tally

__all__ = [
    "Finished",
    "KnownAnswer",
    "KnownLookup",
    "RowSource",
    "Work",
    "WriteNow",
    "line_of",
]


def line_of(row: int) -> int:
    """The 1-based input line (as in output records) of 0-based input ``row``."""
    return row + 1


class Finished(NamedTuple):
    """A row ready for the writer: its output record and where its input ended."""

    row: int  # 0-based input row
    input_end: int  # byte offset in the input just after this row
    data: bytes | None  # the output record, newline included; None: in the journal only
    outcome: Outcome | None  # None: finished by an earlier run, or reused
    reused: bool = False  # answered from a result store
    journal_at: int | None = None  # where the journal holds the record, if it does
    kept: int = 0  # bytes the record holds in memory while an earlier row is unfinished
    tally: Tally | None = None  # what a known record counts for, when known without parsing it
    batched: bool = False  # answered in a batch: this run's work, not an earlier run's


def known_row(row: int, offset: int, data: bytes, tally: Tally | None) -> Finished:
    """``Finished(row, offset, data, None, tally=tally, batched=True)``, at half the cost of
    a NamedTuple's Python-level constructor: made for each row a batch answered."""
    return tuple.__new__(Finished, (row, offset, data, None, False, None, 0, tally, True))


def answered_row(
    row: int, offset: int, data: bytes, outcome: Outcome, journal_at: int | None
) -> Finished:
    """``Finished(row, offset, data, outcome, journal_at=journal_at)`` as
    ``known_row`` makes it: made for each row answered online."""
    return tuple.__new__(Finished, (row, offset, data, outcome, False, journal_at, 0, None, False))


class Work(NamedTuple):
    """A row to send."""

    row: int  # 0-based input row
    input_end: int  # byte offset in the input just after this row
    request: Request
    key: bytes  # the request's content key


class KnownAnswer(Protocol):
    """A result found elsewhere: its output record, and what it counts for
    (None: the writer reads that from the record)."""

    @property
    def data(self) -> bytes: ...

    @property
    def tally(self) -> Tally | None: ...


class KnownLookup(Protocol):
    """Results found elsewhere (batch mode's collected answers), asked for by
    input line in increasing order; ``found`` counts the hits, ``spent`` sums
    their recorded costs."""

    found: int
    spent: float

    def get(self, line: int) -> KnownAnswer | None: ...


class WriteNow(Protocol):
    """The ordered writer's door for a known row whose turn it is."""

    def is_next(self, row: int) -> bool:
        """Whether 0-based input ``row`` is the next to write: every earlier row is."""
        ...

    def write_now(self, item: Finished) -> None:
        """Write ``item`` (``is_next``), which took no reorder-window slot."""
        ...

    def room(self) -> tuple[int, int]:
        """Rows and output bytes to write before the next checkpoint is due."""
        ...

    def write_run(self, records: list[bytes], tallies: list[Tally], row: int, end: int) -> None:
        """Write known rows a batch answered, in turn from ``is_next``, as
        ``write_now`` would one by one (see ``OrderedWriter.write_run``)."""
        ...


# Known rows written at once in a row before one goes on through the workers,
# one by one; and in all, with the rows a batch answered gathered and written
# in one call (``_Gathered``): twice as many of those take as long (60-100 us),
# so a worker's turn (``workers.TURN_SECONDS``) runs over by no more. A
# worker lets other tasks run every 256 rows it takes (``workers``), so the
# event loop gets a turn at least every 32 x 256 rows.
WRITE_NOW_RUN = 16
GATHERED_RUN = 32


class _Gathered:
    """Rows a batch answered whose turn it is, gathered to be written in one
    call: until a row that is not one, the next checkpoint, or a yield."""

    def __init__(self, now: WriteNow | None) -> None:
        self._now = now
        self.records: list[bytes] = []
        self.tallies: list[Tally] = []
        self._row = self._end = 0
        self._rows_left = self._bytes_left = 0

    def add(self, item: Finished) -> bool:
        """Gather ``item`` if it can be written with the run; whether it was."""
        tally, data = item.tally, item.data
        if tally is None or data is None or not item.batched:
            return False
        if not self.records:
            now = self._now
            if now is None or not now.is_next(item.row):
                return False
            self._rows_left, self._bytes_left = now.room()
        self.records.append(data)
        self.tallies.append(tally)
        self._row, self._end = item.row, item.input_end
        self._rows_left -= 1
        self._bytes_left -= len(data)
        if self._rows_left <= 0 or self._bytes_left <= 0:
            self.flush()  # a checkpoint is due after this row
        return True

    def flush(self) -> None:
        """Write the rows gathered (none are left gathered, even if it fails)."""
        records, tallies = self.records, self.tallies
        if records and self._now is not None:
            self.records, self.tallies = [], []
            self._now.write_run(records, tallies, self._row, self._end)


class RowSource:
    """Reads the input from ``start`` for the rows this run (shard) owns.

    ``journaled(line)`` gives a result an earlier run journaled but did not
    write; ``written`` is how many output places are already written.
    ``rows_read`` counts the output places handed on; ``eof`` is set at the
    end of the input, ``read_error`` when the input could not be read to it.
    With ``now``, a row whose result is known and whose turn it is (no
    earlier row unwritten) is written at once, not handed on: it needs no
    worker, window slot or reorder (most of a batch run's rows).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        start: ResumePoint,
        provider: Provider,
        answers: Answers,
        journaled: Callable[[int], bytes | None],
        known: KnownLookup | None = None,
        now: WriteNow | None = None,
    ) -> None:
        self.config = config
        self.now = now
        self.start = start
        self.provider = provider
        self.answers = answers
        self.known = known
        self._journaled = journaled
        self.shard = config.shard or WHOLE
        self.rows_read = start.checkpoint.rows
        self.eof = False
        self.read_error: InputReadError | None = None

    def rows(self) -> Generator[Work | Finished, None, None]:
        """The rows still to do, in input order; sets ``eof`` at the end."""
        defaults = self.config.request_defaults()
        checkpoint = self.start.checkpoint
        first, offset, written = checkpoint.input_line, checkpoint.input_offset, checkpoint.rows
        in_a_row = 0  # rows written at once since the last one handed on
        run = _Gathered(self.now)  # written before anything is handed on
        count, index = self.shard.count, self.shard.index  # ``owns`` and ``seq``, without calls
        with open_input(self.config.input) as handle, self._previous(first) as previous:
            handle.seek(offset)
            lines = self._until_unreadable(handle)
            try:
                for row, raw in enumerate(lines, start=first):
                    offset += len(raw)
                    if row % count != index:
                        continue
                    old = next(previous, None) if previous is not None else None
                    place = row // count
                    if place < written:
                        continue  # written by an earlier run
                    self.rows_read = place + 1
                    known = self._known(row, offset, old)
                    if known is not None and in_a_row < GATHERED_RUN and run.add(known):
                        in_a_row += 1
                        continue
                    run.flush()
                    if known is not None and in_a_row < WRITE_NOW_RUN and self._write_now(known):
                        in_a_row += 1
                        continue
                    in_a_row = 0
                    yield known or self._parse(row, offset, raw, defaults)
            finally:
                run.flush()  # at the end, or rows an error cut short: as written one by one
        self.eof = self.read_error is None

    def _until_unreadable(self, handle: Iterable[bytes]) -> Iterator[bytes]:
        """The input's lines until one cannot be read (a truncated ``.gz``):
        then they end, and ``read_error`` says why. The rows already handed on
        finish as in any stop (their answers kept, none in doubt); the run
        then fails."""
        try:
            yield from handle
        except READ_ERRORS as exc:
            self.read_error = unreadable(self.config.input, exc)

    def _write_now(self, item: Finished) -> bool:
        """Write known ``item`` at once if it is its turn; whether it was."""
        now = self.now
        if now is None or not now.is_next(item.row):
            return False
        now.write_now(item)
        return True

    def _known(self, row: int, offset: int, old: bytes | None) -> Finished | None:
        """The row's result if an earlier run has it (journal, batches, or kept output)."""
        line = line_of(row)
        data = self._journaled(line)
        if data is None and self.known is not None:
            answer = self.known.get(line)  # batch mode filed it in the store when collected
            if answer is not None:
                return known_row(row, offset, answer.data, answer.tally)
        if data is None and old is not None:
            return self._kept(row, offset, old)
        return None if data is None else Finished(row, offset, data, None)

    def _kept(self, row: int, offset: int, old: bytes) -> Finished | None:
        """The finished output's record of ``row``, kept by a --retry-failed
        pass (None: the pass resends it). It counts at no cost: a pass has a
        budget of its own, and the pass before paid for this row."""
        kept = _kept_record(old, line_of(row), self.config.out)
        if kept is None:
            return None
        data, fields = kept
        return Finished(row, offset, data, None, tally=free_tally(fields, self.provider.usage))

    def _parse(self, row: int, offset: int, raw: bytes, defaults: Defaults) -> Work | Finished:
        """The row to send, or its known result: a bad line's error record,
        or a result stored under the request's content key."""
        parsed = parse_line(raw.rstrip(b"\r\n"), line_of(row), defaults)
        if isinstance(parsed, LineError):
            outcome = line_error_outcome(parsed)
            return Finished(row, offset, output_line(outcome), outcome)
        key = request_key(self.provider, parsed)
        found = self.answers.find(key)
        if found is not None:
            data = relabel(found.record, parsed.line, parsed.custom_id)
            return Finished(row, offset, data, None, reused=True)
        return tuple.__new__(Work, (row, offset, parsed, key))  # ``Work(...)``, as ``known_row``

    @contextmanager
    def _previous(self, skip: int) -> Iterator[Iterator[bytes] | None]:
        """With --retry-failed: the finished output's lines, from row ``skip``."""
        if not self.config.retry_failed:
            yield None
            return
        with finished_lines(self.config.out, self.shard.rows_before(skip)) as lines:
            yield lines


def _kept_record(old: bytes, line: int, out: object) -> tuple[bytes, dict[str, Any]] | None:
    """A finished output's record for ``line`` and its fields, unless
    --retry-failed resends it."""
    try:
        data = orjson.loads(old)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or data.get("line") != line:
        raise CorruptStateError(f"{out} does not match the input at line {line}")
    error = data.get("error")
    if isinstance(error, dict) and error.get("retryable"):
        return None
    return (old if old.endswith(b"\n") else old + b"\n"), data
