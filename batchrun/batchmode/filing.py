"""Filing a part's answers in the result store, in one commit per part.

Every answer a batch brings is stored under its request's content key, so no
later run, online or batch, pays for that request again. A part's answers go
in together, after its result files are read and before the part is marked
collected: as each record is spilled (``results.Records``), only its key,
where it lies in the spill file and its verdict are noted (about 100 bytes a
row); then the rows are put in key order, each record read back from the
spill. So a part takes one commit whatever its answers weigh, and no copy of
its records waits in memory. Each commit rewrites the key index's pages that
its random keys touch, which at 1,000,000 stored results is most of them:
fewer, larger commits are what makes filing cheap.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator, Mapping

from batchrun.batchmode.results import Records
from batchrun.reuse import Answers
from batchrun.store import StoreRow

_KEY = operator.itemgetter(0)


class PartFiler:
    """Notes a part's answers as they are collected; ``file`` stores them."""

    def __init__(self, answers: Answers, keys: Mapping[int, bytes]) -> None:
        """``keys``: the part's content keys by input line."""
        self.answers = answers
        self.keys = keys
        # (key, offset of the record in the spill, its size without the
        # newline, ok, retryable, cost) per answer.
        self._noted: list[tuple[bytes, int, int, bool, bool, float | None]] = []

    def note(
        self, line: int, at: int, record: bytes, ok: bool, retryable: bool, cost: float | None
    ) -> None:
        """Row ``line``'s record (``output_line``'s, one trailing newline) was
        spilled at offset ``at``; ``ok``: it is an answer, else an error,
        ``retryable`` or not; ``cost``: its price (None: not priced)."""
        self._noted.append((self.keys[line], at, len(record) - 1, ok, retryable, cost))

    def file(self, records: Records) -> None:
        """Store every noted answer, reading its record from ``records``'
        spill, in one commit per store; before the part is settled."""
        if not self._noted:
            return
        self._noted.sort(key=_KEY)  # stable: of two answers under one key, the later wins
        now = time.time()  # wall time: what ``cache prune --older-than`` compares
        with records.view() as view:

            def rows() -> Iterator[StoreRow]:
                for key, at, size, ok, retryable, cost in self._noted:
                    yield key, view[at : at + size], ok, retryable, cost, now

            self.answers.put_sorted(rows)
        self._noted.clear()
