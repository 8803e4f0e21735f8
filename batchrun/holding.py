"""Results between the journal and the ordered output, bounded in bytes.

A result is journaled the moment it arrives, and reaches the output only once
every earlier row has. Until then it waits here: in memory while the results
waiting for an earlier row total at most ``limit`` bytes, past that only in
the journal, which already holds it, to be read back when its turn comes. A
slow head row in front of large answers then costs disk reads, not memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

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
        self.spilled = 0  # results that waited in the journal, over the run

    def add(self, line: int, data: bytes) -> None:
        """Row ``line``'s result was just journaled."""
        self._results[line] = data

    def get(self, line: int) -> bytes | None:
        """Row ``line``'s result, read back from the journal if it waits there."""
        entry = self._results.get(line)
        if isinstance(entry, Spilled):
            return self._journal.read_at(entry.offset, entry.length)
        return entry

    def keep(self, line: int, data: bytes, journal_at: int | None) -> bool:
        """Row ``line`` waits for an earlier one: keep ``data`` in memory if it
        fits the limit (True); else leave it in the journal at ``journal_at``
        (False). A result not in the journal (None) stays in memory."""
        size = len(data)
        if journal_at is None or self.bytes + size <= self.limit:
            self.bytes += size
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True
        self._results[line] = Spilled(journal_at, size)
        self.spilled += 1
        return False

    def done(self, line: int, kept: int) -> None:
        """Row ``line`` is in the output; ``kept``: the bytes ``keep`` counted
        for it (0 when it never waited in memory)."""
        self._results.pop(line, None)
        self.bytes -= kept

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
