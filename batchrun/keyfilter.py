"""Which content keys a run may have stored: a Bloom filter.

A first run over an empty store looks nothing up (``reuse.Answers``): a
lookup per row would cost a store query for rows that cannot be there. Yet a
row can repeat an earlier row of the same input, and its answer is then in
the store. This filter tells the rows that may repeat one (a key added
before) from those that cannot: ``might_hold`` is never False for a key
``add`` saw, and is True for other keys only by chance, which then costs one
store query, never a wrong answer.

Bounded: a fixed ``2 ** BITS_LOG2`` bits (1 MiB) whatever the run's size.
With ``PROBES`` bits per key, about 4.5 % of new keys at 1,000,000 keys added
pass for seen (each costing a lookup), and most of them past ten million:
the filter then saves less, and never errs.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["BITS_LOG2", "PROBES", "KeyFilter"]

BITS_LOG2: Final = 23
# Bits set per key: two, taken from the key's first bytes (a content key is
# a SHA-256 digest, uniform already: no further hashing needed).
PROBES: Final = 2
_POSITION_BYTES: Final = (BITS_LOG2 * PROBES + 7) // 8


class KeyFilter:
    """Content keys added so far, approximately; see the module docstring."""

    def __init__(self, bits_log2: int = BITS_LOG2) -> None:
        """``bits_log2``: the filter holds ``2 ** bits_log2`` bits (at most ``BITS_LOG2``)."""
        if not 3 <= bits_log2 <= BITS_LOG2:
            raise ValueError(f"bits_log2 must be within 3..{BITS_LOG2}")
        self._width = bits_log2
        self._mask = (1 << bits_log2) - 1
        self._bits = bytearray(1 << (bits_log2 - 3))

    def add(self, key: bytes) -> None:
        """Remember ``key``."""
        first, second = self._positions(key)
        bits = self._bits
        bits[first >> 3] |= 1 << (first & 7)
        bits[second >> 3] |= 1 << (second & 7)

    def might_hold(self, key: bytes) -> bool:
        """False: ``key`` was never added. True: it may have been."""
        first, second = self._positions(key)
        bits = self._bits
        return bool(bits[first >> 3] >> (first & 7) & bits[second >> 3] >> (second & 7) & 1)

    def _positions(self, key: bytes) -> tuple[int, int]:
        if len(key) < _POSITION_BYTES:  # not a digest (tests): spread it first
            key = hashlib.sha256(key).digest()
        number = int.from_bytes(key[:_POSITION_BYTES], "little")
        return number & self._mask, (number >> self._width) & self._mask
