"""Rows answered in batches, read back in input order for the row source.

Each collected part's results file is sorted by line; a merge of them is read
forwards as the row source asks for lines in increasing order, so memory stays
one record per file however many rows were answered.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import orjson

# Every output record starts with its id, ``batch_req_<line>`` (records.output_record).
_PREFIX = b'{"id":"batch_req_'


class KnownResults:
    """Looks up batch results by input line; lines must be asked in increasing order."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._stack = contextlib.ExitStack()
        handles = [self._stack.enter_context(path.open("rb")) for path in paths]
        self._merged: Iterator[tuple[int, bytes]] = heapq.merge(*map(_records, handles))
        self._head: tuple[int, bytes] | None = None
        self.found = 0

    def get(self, line: int) -> bytes | None:
        """The record of ``line``, if a batch answered it."""
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
        return head[1]

    def close(self) -> None:
        self._stack.close()


def _records(handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    for raw in handle:
        yield _line_of(raw), raw


def _line_of(raw: bytes) -> int:
    if raw.startswith(_PREFIX):
        end = raw.find(b'"', len(_PREFIX))
        digits = raw[len(_PREFIX) : end]
        if digits.isdigit():
            return int(digits)
    return int(orjson.loads(raw)["line"])
