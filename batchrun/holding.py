"""Results between the journal and the ordered output, bounded in bytes.

A result is journaled the moment it arrives, and reaches the output only once
every earlier row has. Until then it waits here: in memory while the results
waiting for an earlier row total at most ``limit`` bytes, past that only in
the journal, which already holds it, to be read back when its turn comes. A
slow head row in front of large answers then costs disk reads, not memory.
A result the journal does not hold (a stored answer reused, an identical
row's, a row kept by --retry-failed) waits past the limit in a scratch file
of its own instead: unnamed, gone with the process, and never read by a
resume, which finds such results again where they came from.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from batchrun.errors import disk_writes
from batchrun.journal import Journal


@dataclass(slots=True)
class Spilled:
    """A result kept only in the journal: where it is (compaction moves it)."""

    offset: int
    length: int


class Held:
    """Journaled results not yet in the output, by input line.

    Invariant: ``bytes`` is the total size of the results kept in memory
    because an earlier row is unfinished (``keep`` said True and ``done`` has
    not come yet); past ``limit`` ``keep`` leaves results in the journal.
    """

    def __init__(self, journal: Journal, limit: int, results: dict[int, bytes]) -> None:
        """``results``: those an earlier run journaled (read at resume)."""
        self._journal = journal
        self.limit = limit
        self._results: dict[int, bytes | Spilled] = dict(results)
        self.bytes = 0
        self.peak_bytes = 0
        self.spilled = 0  # results that waited in the journal (or aside), over the run
        self._aside = _Aside(journal.path.parent)  # results not in the journal, past the limit

    def add(self, line: int, data: bytes) -> None:
        """Row ``line``'s result was just journaled."""
        self._results[line] = data

    def get(self, line: int) -> bytes | None:
        """Row ``line``'s result, read back from the journal if it waits there."""
        if self._aside.places:  # asked for each row: no call while nothing is aside
            aside = self._aside.get(line)
            if aside is not None:
                return aside
        entry = self._results.get(line)
        if isinstance(entry, Spilled):
            return self._journal.read_at(entry.offset, entry.length)
        return entry

    def keep(self, line: int, data: bytes, journal_at: int | None) -> bool:
        """Row ``line`` waits for an earlier one: keep ``data`` in memory if it
        fits the limit (True); else leave it in the journal at ``journal_at``
        (False), or, when the journal does not hold it (None), set it aside."""
        size = len(data)
        if self.bytes + size <= self.limit:
            self.bytes += size
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True
        if journal_at is None:
            self._aside.put(line, data)
        else:
            self._results[line] = Spilled(journal_at, size)
        self.spilled += 1
        return False

    def done(self, line: int, kept: int) -> None:
        """Row ``line`` is in the output; ``kept``: the bytes ``keep`` counted
        for it (0 when it never waited in memory)."""
        self._results.pop(line, None)
        self._aside.done(line)
        self.bytes -= kept

    @property
    def aside_bytes(self) -> int:
        """The size of the scratch file of the results set aside."""
        return self._aside.file_bytes

    def close(self) -> None:
        """Remove the scratch file of the results set aside, if any."""
        self._aside.close()

    def compact(self, begun: list[bytes]) -> None:
        """Rewrite the journal to ``begun`` marks and the results held here,
        reading the spilled ones back one at a time; they then point into the
        new journal."""
        entries = list(self._results.values())
        # A generator, not a list: spilled results are read back one at a time.
        offsets = self._journal.rewrite(itertools.chain(begun, self._records(entries)))
        for entry, offset in zip(entries, offsets[len(begun) :], strict=True):
            if isinstance(entry, Spilled):
                entry.offset = offset

    def _records(self, entries: list[bytes | Spilled]) -> Iterator[bytes]:
        for entry in entries:
            if isinstance(entry, Spilled):
                yield self._journal.read_at(entry.offset, entry.length)
            else:
                yield entry

    def report(self) -> dict[str, object]:
        """How many results waited in the journal, past --reorder-bytes (if any did)."""
        if not self.spilled:
            return {}
        return {
            "results waited in the journal (--reorder-bytes)": self.spilled,
            "most result bytes waiting in memory": self.peak_bytes,
        }


class _Aside:
    """Results past the limit that the journal does not hold, by line, in an
    unnamed scratch file in ``directory`` (made on first use). The file is
    rewritten to what still waits once more of it is written out than
    waits: results behind a slow row come and go while others still wait,
    so starting over only when nothing waits could let it grow with the
    whole run."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._file: BinaryIO | None = None
        self.places: dict[int, Spilled] = {}
        self._size = 0  # bytes of the file in use: where the next result goes
        self._waiting = 0  # bytes of the results in ``places``

    @property
    def file_bytes(self) -> int:
        """The size of the scratch file (0 before its first use)."""
        return 0 if self._file is None else os.fstat(self._file.fileno()).st_size

    def put(self, line: int, data: bytes) -> None:
        with disk_writes(self._directory):
            if self._file is None:
                # Closed by ``close`` (the writer's), or with the process.
                self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115
            elif self._size - self._waiting > self._waiting:
                self._compact(self._file)
            self.places[line] = self._append(self._file, data)
        self._waiting += len(data)

    def get(self, line: int) -> bytes | None:
        place = self.places.get(line)
        if place is None or self._file is None:
            return None
        return os.pread(self._file.fileno(), place.length, place.offset)

    def done(self, line: int) -> None:
        place = self.places.pop(line, None)
        if place is None:
            return
        self._waiting -= place.length
        if not self.places:
            self._size = 0  # nothing waits: the next result starts the file over

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _append(self, file: BinaryIO, data: bytes) -> Spilled:
        file.seek(self._size)
        file.write(data)
        file.flush()  # read back by ``pread``
        place = Spilled(self._size, len(data))
        self._size += len(data)
        return place

    def _compact(self, old: BinaryIO) -> None:
        """Copy the results that wait, one at a time, to a new file that
        takes the old one's place (its space goes back to the disk). A
        failed copy (a full disk) leaves the old file as it was."""
        kept_size, self._size = self._size, 0
        new = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115
        try:
            places = {
                line: self._append(new, os.pread(old.fileno(), place.length, place.offset))
                for line, place in self.places.items()
            }
        except BaseException:
            new.close()
            self._size = kept_size
            raise
        old.close()
        self._file, self.places = new, places
