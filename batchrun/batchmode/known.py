"""Rows answered in batches, read back in input order for the row source.

Each collected part's results file is sorted by line; a merge of them is read
forwards as the row source asks for lines in increasing order, so memory stays
one record per file however many rows were answered.

A results file's line is an output record, or, for an answer whose token
counts were read when it was collected, ``<line> <tokens_in> <tokens_out>``
(then `` <cost>`` when the job is priced) and a tab before the record
(``filed_head``): the ordered writer then counts
the row from those numbers instead of parsing its record again. Records
start with ``{``, so both kinds read back (files of older runs have only
records).
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import orjson

from batchrun.stats import Tally

# Every output record starts with its id, ``batch_req_<line>`` (records.output_record).
_PREFIX = b'{"id":"batch_req_'
# Bytes read at a time from each results file (all are open at once), and
# at most this many for all of them together (thousands of small parts).
READ_BUFFER = 1 << 16
READ_BUFFERS = 16 << 20
# Tallies kept for reuse (frozen, so shared), by their token counts.
MAX_TALLIES = 4096


class Known(NamedTuple):
    """A batch answer: its output record, and what it counts for when the
    results file says (None: count it from the record)."""

    data: bytes
    tally: Tally | None


def _known(data: bytes, tally: Tally | None) -> Known:
    # ``Known(data, tally)`` without its Python-level __new__: half the cost,
    # once per row.
    return tuple.__new__(Known, (data, tally))


def filed_head(line: int, tokens_in: int, tokens_out: int, cost: float | None = None) -> bytes:
    """The head of an answer's results-file line: its line, tokens and, when
    priced, cost (see above)."""
    if cost is None:
        return b"%d %d %d\t" % (line, tokens_in, tokens_out)
    return b"%d %d %d %r\t" % (line, tokens_in, tokens_out, cost)


class KnownResults:
    """Looks up batch results by input line; lines must be asked in increasing order."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._stack = contextlib.ExitStack()
        paths = list(paths)
        buffering = max(4096, min(READ_BUFFER, READ_BUFFERS // max(1, len(paths))))
        handles = [
            self._stack.enter_context(path.open("rb", buffering=buffering)) for path in paths
        ]
        # ``map``, not a generator per file: a frame less to resume for each row.
        runs: list[Iterator[tuple[int, bytes]]] = [map(_entry, handle) for handle in handles]
        self._merged: Iterator[tuple[int, bytes]] = merge_runs(runs)
        self._head: tuple[int, bytes] | None = None
        self._tallies: dict[bytes, Tally] = {}  # by token counts: most answers share a few
        self.found = 0
        self.spent = 0.0  # the recorded cost of the rows found

    def get(self, line: int) -> Known | None:
        """The answer of ``line``, if a batch answered it."""
        head = self._head
        while head is None or head[0] < line:
            head = next(self._merged, None)
            if head is None:
                self._head = None
                return None
        self._head = head
        if head[0] != line:
            return None
        self.found += 1
        return self._known(head[1])

    def _known(self, raw: bytes) -> Known:
        """A results-file line as the record and, with a head, its tally: an
        answer (no error), no recorded cost, not reused."""
        if raw.startswith(b"{"):  # no head: an error, or an older run's answer
            self.spent += _recorded_cost(raw)  # an answer off the schema was paid
            return _known(raw, None)
        tab = raw.index(b"\t")
        tokens = raw[raw.index(b" ") + 1 : tab]
        tally = self._tallies.get(tokens)
        if tally is None:
            if len(self._tallies) >= MAX_TALLIES:
                self._tallies.clear()
            tally = self._tallies[tokens] = _tally(tokens)
        self.spent += tally.cost
        return _known(raw[tab + 1 :], tally)

    def close(self) -> None:
        self._stack.close()


def _recorded_cost(record: bytes) -> float:
    """The ``cost`` an output record gives (0.0 when it gives none)."""
    if b'"cost":' not in record:
        return 0.0
    cost = orjson.loads(record).get("cost")
    return float(cost) if type(cost) in (int, float) else 0.0


def _tally(counts: bytes) -> Tally:
    """An answer's tally from its head's ``<tokens_in> <tokens_out> [<cost>]``."""
    tokens_in, tokens_out, *cost = counts.split(b" ")
    return Tally(
        True, None, False, int(tokens_in), int(tokens_out), float(cost[0]) if cost else 0.0
    )


def merge_runs(runs: list[Iterator[tuple[int, bytes]]]) -> Iterator[tuple[int, bytes]]:
    """The items of ``runs`` (each sorted by line) in line order, ties in run
    order, as ``heapq.merge`` gives them; but a stretch of one run that comes
    before every other run's next item passes without heap operations. Parts
    of one model hold consecutive lines, so that is almost every item."""
    heap: list[tuple[int, int, bytes, Iterator[tuple[int, bytes]]]] = []
    for order, run in enumerate(runs):
        for line, raw in run:
            heap.append((line, order, raw, run))
            break
    heapq.heapify(heap)
    while heap:
        line, order, raw, run = heap[0]
        yield line, raw
        # The smallest item after the root's is one of its two children: this
        # run goes on until it passes that item (at one line, the earlier run first).
        other = min(heap[1:3], default=None)
        limit, yields = (other[0], other[1] < order) if other is not None else (math.inf, False)
        for line, raw in run:
            if line > limit or (line == limit and yields):
                heapq.heapreplace(heap, (line, order, raw, run))
                break
            yield line, raw
        else:
            heapq.heappop(heap)


def _entry(raw: bytes) -> tuple[int, bytes]:
    """A results-file line with its input line."""
    return _line_of(raw), raw


def _line_of(raw: bytes) -> int:
    if not raw.startswith(b"{"):
        return int(raw[: raw.index(b" ")])
    if raw.startswith(_PREFIX):
        end = raw.find(b'"', len(_PREFIX))
        digits = raw[len(_PREFIX) : end]
        if digits.isdigit():
            return int(digits)
    return int(orjson.loads(raw)["line"])
