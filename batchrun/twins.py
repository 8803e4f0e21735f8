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


# A key in flight with no row parked behind it (most keys): one shared empty
# tuple, so that a row costs no list of its own.
_NONE: tuple[Work, ...] = ()


class Twins:
    """The keys in flight, and the rows parked behind each."""

    def __init__(self) -> None:
        self._parked: dict[bytes, list[Work] | tuple[Work, ...]] = {}
        self.parked = 0  # rows parked now

    def lead(self, work: Work) -> bool:
        """True: no row of ``work``'s key is in flight, and ``work`` now leads
        it (send it, then ``settle``). False: ``work`` is parked behind the
        leader in flight."""
        key = work.key
        parked = self._parked.get(key)
        if parked is None:
            self._parked[key] = _NONE
            return True
        if isinstance(parked, list):
            parked.append(work)
        else:  # the first row parked behind this leader
            self._parked[key] = [work]
        self.parked += 1
        return False

    def settle(self, key: bytes) -> list[Work] | tuple[Work, ...]:
        """The leader of ``key`` is done; the rows parked behind it, in input
        order (empty: none). The key is free again: the next row of it leads."""
        parked = self._parked.pop(key, _NONE)
        if parked:
            self.parked -= len(parked)
        return parked
