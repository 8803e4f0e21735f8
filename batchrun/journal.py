"""The journal: every received result, durable before the run moves on.

An append-only file of JSON lines in the state directory, of two kinds:

* ``{"b": N}``: row ``N``'s (1-based input line) request is about to be
  written to the socket, its waits at the throttle over. A row begun but
  never finished was in flight at a crash: the provider may have billed it,
  so a resume counts it "in doubt" before sending it again. A row still
  waiting at the throttle has no mark: it reached nobody.
* ``{"x": N}``: row ``N``'s request was answered with an error, fatal (a bad
  key) or transient (a 5xx or a 429, before a retry), or found no
  connection (before a retry): it was not billed and is sent again on
  resume, but not in doubt. A retry marks it begun again.
* an output record (``{"id": ..., "line": N, ...}``): row ``N`` finished; the
  same bytes later go into the ordered output. It is preceded, in the same
  ``write``, by ``{"k": HEX, "l": N}``: the content key of row ``N``'s
  request (``batchrun.contentkey``), so a resume can file the result in the
  result store even when the input changed meanwhile.

A begin mark goes to the operating system before its request is sent,
with every record waiting; results follow by the end of the event loop's
pass (``Journal``), so a killed process loses at most the results of one
pass, whose rows then count in doubt. ``fsync`` adds power-loss safety. A
kill can tear only the last write: reading drops a final piece without its
newline. Anything unreadable before that is corruption and is refused.

The journal is compacted at checkpoints: rows already in the ordered output
are dropped, so resuming reads a bounded file however long the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from batchrun import crashpoint
from batchrun.errors import DISK_ERRNOS, CorruptStateError, DiskError, disk_writes
from batchrun.settings import FsyncPolicy


@dataclass(slots=True)
class JournalContents:
    """What a journal holds for rows after the ordered prefix.

    ``results`` maps line to its output record (newline included); ``begun``
    holds lines sent without a result; ``valid_bytes`` is the length of the
    readable part (a torn tail starts there). ``keyed`` holds every result
    with its content key, of any line (for the result store).
    """

    results: dict[int, bytes] = field(default_factory=dict)
    begun: set[int] = field(default_factory=set)
    valid_bytes: int = 0
    keyed: list[tuple[bytes, bytes]] = field(default_factory=list)
    last_key: tuple[int, bytes] | None = None  # the key record just read

    @property
    def in_doubt(self) -> set[int]:
        """Rows that were in flight when the writing process stopped."""
        return self.begun - self.results.keys()


def begun_marks(lines: Iterable[int]) -> bytes:
    """The begin marks of ``lines``, in order, as ``Journal.begin`` writes them."""
    return b"".join(b'{"b":%d}\n' % line for line in sorted(lines))


def read_journal(path: Path, *, after_line: int, with_keys: bool = True) -> JournalContents:
    """Read the journal, keeping rows with line > ``after_line``; with
    ``with_keys``, also every result with its content key in ``keyed`` (all
    of them in memory: a resume salvages them with ``scan_journal`` instead).

    Raises ``CorruptStateError`` for an unreadable record that is not the
    torn final piece.
    """
    contents = JournalContents()
    for pair in scan_journal(path, contents, after_line=after_line):
        if with_keys:
            contents.keyed.append(pair)
    return contents


def scan_journal(
    path: Path, contents: JournalContents, *, after_line: int, keep_results: bool = True
) -> Iterator[tuple[bytes, bytes]]:
    """Read the journal into ``contents`` (as ``read_journal``), yielding each
    result with its content key as it is read, so no copy of them all waits
    in memory. Without ``keep_results`` a result's line is noted (``in_doubt``
    is right) but its bytes are not kept.

    Raises ``CorruptStateError`` for an unreadable record that is not the
    torn final piece.
    """
    if not path.exists():
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                break  # torn by a kill mid-write: the row is simply not done
            pair = _take(contents, raw, number, path, after_line, keep_results)
            contents.valid_bytes += len(raw)
            if pair is not None:
                yield pair


def _take(
    contents: JournalContents, raw: bytes, number: int, path: Path, after: int, keep: bool
) -> tuple[bytes, bytes] | None:
    try:
        record = orjson.loads(raw)
        kind = "b" if "b" in record else "x" if "x" in record else "k" if "k" in record else "line"
        line = record["l" if kind == "k" else kind]
        key = bytes.fromhex(record["k"]) if kind == "k" else None
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        raise CorruptStateError(
            f"journal {path} is damaged at record {number}; it cannot be resumed safely."
            " Run again with --restart to start over"
        ) from None
    pair = _take_key(contents, kind, line, key, raw)
    if not isinstance(line, int) or line <= after or kind == "k":
        return pair
    if kind == "b":
        contents.begun.add(line)
    elif kind == "x":
        contents.begun.discard(line)
    else:
        contents.results[line] = raw if keep else b""
    return pair


def _take_key(
    contents: JournalContents, kind: str, line: object, key: bytes | None, raw: bytes
) -> tuple[bytes, bytes] | None:
    """Pair a result with the key record written just before it."""
    if kind == "k":
        contents.last_key = (line, key) if isinstance(line, int) and key else None
        return None
    last = contents.last_key
    contents.last_key = None
    if kind == "line" and last is not None and last[0] == line:
        return (last[1], raw)
    return None


# Waiting records up to this many bytes in all are joined and written with
# one ``write``; larger ones go by ``writev`` without a copy.
_JOIN_BYTES = 1 << 14

# Pieces one writev may take (POSIX guarantees at least 16; Linux allows 1024).
_IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))


class Journal:
    """Appends records to the journal file, in as few ``write`` calls as the
    guarantees allow.

    A begin mark is written at once, together with every record waiting: the
    request goes to the socket right after, and a row sent must be in doubt
    if the process dies. Results and fatal marks wait for the next begin
    mark or the end of the event loop's current pass, whichever comes first,
    so a steady run makes about one ``write`` per row. A kill before that
    leaves the row begun without its result: counted in doubt and resent,
    exactly as if it had come a moment later. With ``fsync="always"`` a
    result is written and synced at once.

    Invariant: ``size`` is the journal's length, records still waiting
    included, so the offset ``record`` returns is where that record starts;
    ``read_at`` writes what waits first, so a record can be read back as soon
    as ``record`` returns.
    """

    def __init__(self, path: Path, *, fsync: FsyncPolicy = "off") -> None:
        self.path = path
        self._fsync = fsync
        self._fd: int | None = None
        self._waiting: list[bytes] = []
        self._flush_scheduled = False
        self.writes = 0  # write calls made: the cost the batching saves
        self.failed: DiskError | None = None  # the write that failed: the journal ends there
        self.size = 0

    def open(self, *, valid_bytes: int | None = None) -> None:
        """Open for appending, first cutting a torn tail at ``valid_bytes``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if valid_bytes is not None:
            os.truncate(self._fd, valid_bytes)
        self.size = os.fstat(self._fd).st_size

    def begin(self, line: int) -> None:
        """Row ``line``'s request goes to the socket next: on disk (in the
        operating system) before this returns, with every record waiting."""
        mark = b'{"b":%d}\n' % line
        self._waiting.append(mark)
        self.size += len(mark)
        self.flush()

    def abandon(self, line: int) -> None:
        """Row ``line`` got an error answer: not billed, to be sent again."""
        self._add(b'{"x":%d}\n' % line)

    def record(self, output_line: bytes, *, line: int = 0, key: bytes | None = None) -> int:
        """Row ``line`` finished: its output record, newline included, after
        its request's content ``key`` when it has one (in the same write).
        Returns the output record's offset in the journal (see ``read_at``)."""
        offset = self.size
        if key is not None:
            # Queued as two pieces, written by one writev: no copy of a large record.
            prefix = b'{"k":"%s","l":%d}\n' % (key.hex().encode(), line)
            offset += len(prefix)
            self._waiting.append(prefix)
            self.size += len(prefix)
        self._add(output_line)
        if self._fsync == "always":
            self.sync()
        return offset

    def read_at(self, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset``: a record read back."""
        assert self._fd is not None, "open() first"
        self.flush()  # the record may still wait
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise CorruptStateError(f"journal {self.path} is shorter than its records")
        return data

    def flush(self) -> None:
        """Write every waiting record now, in one ``writev`` (no joined copy).
        Raises ``DiskError`` once a write has failed."""
        if self.failed is not None:
            raise self.failed
        if self._waiting:
            pieces, self._waiting = self._waiting, []
            self._write_pieces(pieces)

    def sync(self) -> None:
        """Make every record so far survive a power loss."""
        self.flush()
        if self._fd is not None:
            os.fsync(self._fd)

    def rewrite(self, records: Iterable[bytes]) -> list[int]:
        """Replace the journal with ``records`` in one atomic step (compaction);
        returns each record's offset in the new journal. ``records`` may read
        the old journal (``read_at``) as it is consumed."""
        self.flush()
        fresh = self.path.with_name(self.path.name + ".new")
        offsets: list[int] = []
        with disk_writes(fresh), fresh.open("wb") as handle:
            written = 0
            for record in records:
                offsets.append(written)
                handle.write(record)
                written += len(record)
            handle.flush()
            os.fsync(handle.fileno())
        self.close()
        os.replace(fresh, self.path)
        self.open()
        return offsets

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = None

    def _add(self, record: bytes) -> None:
        """Queue ``record`` for the next begin mark or the end of this pass
        of the event loop (at once outside one)."""
        self._waiting.append(record)
        self.size += len(record)
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if self._fd is not None:
            # A failure here has no caller to reach: it is kept in ``failed``
            # and raised by the next write, flush, rewrite or close.
            with contextlib.suppress(DiskError):
                self.flush()

    def _write(self, data: bytes) -> None:
        self._write_pieces([data])

    def _write_pieces(self, pieces: list[bytes]) -> None:
        assert self._fd is not None, "open() first"
        if self.failed is not None:
            raise self.failed
        self.writes += 1
        if crashpoint.armed("journal_torn"):
            data = b"".join(pieces)
            os.write(self._fd, data[: len(data) // 2])
            crashpoint.die()
        try:  # as ``disk_writes`` does, without a ``with`` per row
            self._write_all(self._fd, pieces)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            self.failed = DiskError(self.path, exc)  # nothing may follow a cut record
            raise self.failed from exc

    @staticmethod
    def _write_all(fd: int, pieces: list[bytes]) -> None:
        fault = crashpoint.disk_fault("journal")
        if fault is not None:
            data = b"".join(pieces)
            os.write(fd, data[: len(data) // 2])
            raise fault
        if len(pieces) == 1 or sum(map(len, pieces)) <= _JOIN_BYTES:
            # The usual begin mark and a few small records: one joined copy is
            # cheaper than a view per piece. Large records go as views: no copy
            # of them. A short write falls through to the loop below.
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            written = os.write(fd, data)
            if written == len(data):
                return
            pieces = [data[written:]]
        views = [memoryview(piece) for piece in pieces]
        first = 0
        while first < len(views):
            written = os.writev(fd, views[first : first + _IOV_MAX])
            while first < len(views) and written >= len(views[first]):
                written -= len(views[first])
                first += 1
            if written:  # a short write ended inside this piece
                views[first] = views[first][written:]
