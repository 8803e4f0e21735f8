"""Rows waiting their turn for room under ``--max-cost``, in input order.

Every row in flight holds its worst case reserved (``budget.Budget``), and
answers settle for far less: with dozens of rows in flight, a row that does
not fit now will once some of them settle. So a row that finds no room waits
for a settlement instead of stopping the run, and rows wait in input order
(the first waiting row is the next served, then the one after it), so that
the output grows from its start while the cap holds. Only when the row first
in line would pass the cap even with nothing in flight is the cap reached.

Not thread-safe: one event loop. Without a cap, ``reserve`` never waits.
"""

from __future__ import annotations

import bisect

import anyio

from batchrun.budget import Budget

__all__ = ["Reservations"]


class Reservations:
    """``Budget``'s reserve, settle and release, with rows queued for room."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._waiting: list[int] = []  # input rows waiting for room, in order
        self._changed = anyio.Event()  # set (and replaced) when room may have freed

    async def reserve(self, amount: float, row: int) -> bool:
        """Reserve ``amount`` (the worst case of input row ``row``), waiting
        for room behind the earlier rows that wait; False when the cap is
        reached (``budget.refused``)."""
        budget = self.budget
        if not self._waiting and budget.reserve(amount):
            return True  # the usual case: room, and no one waiting before it
        bisect.insort(self._waiting, row)
        try:
            while True:
                if self._waiting[0] == row:
                    if budget.reserve(amount):
                        return True
                    if budget.refused:
                        return False
                await self._changed.wait()
        finally:
            self._waiting.remove(row)
            self._wake()  # the next row in line tries at once

    def settle(self, reserved: float, actual: float) -> None:
        """A row reserved with ``reserved`` finished having cost ``actual``."""
        self.budget.settle(reserved, actual)
        self._wake()

    def release(self, reserved: float) -> None:
        """A row reserved with ``reserved`` was not paid, or not sent."""
        self.budget.release(reserved)
        self._wake()

    def _wake(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = anyio.Event()
