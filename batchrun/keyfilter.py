"""Which content keys a run may have stored: a Bloom filter.

A first run over an empty store looks nothing up (``reuse.Answers``): a
lookup per row would cost a store query for rows that cannot be there. Yet a
row can repeat an earlier row of the same input, and its answer is then in
the store. This filter tells the rows that may repeat one (a key added
before) from those that cannot: ``add`` never says a key it saw before is
new, and says a new key may be old only by chance, which then costs one
store query, never a wrong answer.

Bounded: a fixed ``2 ** BITS_LOG2`` bits (1 MiB) whatever the run's size.
With ``PROBES`` bits per key, about 4.5 % of new keys at 1,000,000 keys added
pass for seen (each costing a lookup), and most of them past ten million:
the filter then saves less, and never errs.
"""

from __future__ import annotations

from typing import Final

__all__ = ["BITS_LOG2", "PROBES", "KeyFilter"]

BITS_LOG2: Final = 23
# Bits set per key: two, cut from the key's ``hash``. Python computes a
# bytes object's hash once and keeps it (the run's dicts hash every key
# anyway), so a probe costs a few integer operations; the hash is salted per
# process, which a filter that lives for one run does not mind.
PROBES: Final = 2


class KeyFilter:
    """Content keys added so far, approximately; see the module docstring."""

    def __init__(self, bits_log2: int = BITS_LOG2) -> None:
        """``bits_log2``: the filter holds ``2 ** bits_log2`` bits (at most ``BITS_LOG2``)."""
        if not 3 <= bits_log2 <= BITS_LOG2:
            raise ValueError(f"bits_log2 must be within 3..{BITS_LOG2}")
        # A probe: the low ``bits_log2 - 3`` bits of its part of the hash pick
        # a byte, the next 3 a bit in it; the second probe starts at ``_second``.
        self._byte_bits = bits_log2 - 3
        self._byte_mask = (1 << self._byte_bits) - 1
        self._second = bits_log2
        self._bits = bytearray(1 << self._byte_bits)

    def add(self, key: bytes) -> bool:
        """Remember ``key``; whether it may have been added before (False:
        it was not). One call does both: a run asks once per row."""
        number, bits, byte_bits, mask = hash(key), self._bits, self._byte_bits, self._byte_mask
        second = number >> self._second
        first_at, first_bit = number & mask, 1 << ((number >> byte_bits) & 7)
        second_at, second_bit = second & mask, 1 << ((second >> byte_bits) & 7)
        held = bits[first_at] & first_bit and bits[second_at] & second_bit
        bits[first_at] |= first_bit
        bits[second_at] |= second_bit
        return bool(held)
