"""Rows that send the same request as a row in flight: paid once.

Two rows of one input with one content key (``batchrun.contentkey``) are one
request; a re-run would answer the second from the result store. Within a
run the store has a result only once it arrives, so a row read while its
twin is still in flight would pay again. The workers ask here first: the
first row of a key leads (it is sent), and a row read while the leader is in
flight is parked behind it, keeping its reorder-window slot but no worker.
When the leader's result comes, its parked twins are handed back, to be
answered with that result (marked reused) or, when the result is not one to
reuse, sent after all.

Bounded: a parked row holds a reorder-window slot, so no more rows than
``--reorder-window`` are ever parked. Pure: no I/O, no awaiting.
"""

from __future__ import annotations

from batchrun.rowsource import Work

__all__ = ["Twins"]


class Twins:
    """The keys in flight, and the rows parked behind each."""

    def __init__(self) -> None:
        self._parked: dict[bytes, list[Work]] = {}
        self.parked = 0  # rows parked now

    def lead(self, work: Work) -> bool:
        """True: no row of ``work``'s key is in flight, and ``work`` now leads
        it (send it, then ``settle``). False: ``work`` is parked behind the
        leader in flight."""
        parked = self._parked.get(work.key)
        if parked is None:
            self._parked[work.key] = []
            return True
        parked.append(work)
        self.parked += 1
        return False

    def settle(self, key: bytes) -> list[Work]:
        """The leader of ``key`` is done; the rows parked behind it, in input
        order. The key is free again: the next row of it leads."""
        parked = self._parked.pop(key, [])
        self.parked -= len(parked)
        return parked
