"""The exact key set of batch planning: a key is new once, then never again,
whatever the table's growth and probing do."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.keyset import KeySet


@given(
    keys=st.lists(st.binary(min_size=8, max_size=32), max_size=400),
    slots_log2=st.integers(min_value=1, max_value=8),
)
def test_add_says_new_exactly_once_per_fingerprint(keys: list[bytes], slots_log2: int) -> None:
    planned = KeySet(1 << slots_log2)
    seen: set[bytes] = set()
    for key in keys:
        fingerprint = key[:8] if any(key[:8]) else b"\x01" + bytes(7)  # 0 stands for 1
        assert planned.add(key) is (fingerprint not in seen)
        seen.add(fingerprint)
    assert len(planned) == len(seen)
    assert not any(planned.add(key) for key in keys)


def test_digests_through_many_doublings() -> None:
    rng = random.Random(3)
    digests = [hashlib.sha256(rng.randbytes(16)).digest() for _ in range(50_000)]
    planned = KeySet(2)
    assert all(planned.add(key) for key in digests)
    assert not any(planned.add(key) for key in digests[::7])
    assert len(planned) == 50_000
    assert planned.add(hashlib.sha256(b"one more").digest())


@pytest.mark.parametrize("slots", [0, 1, 3, 100])
def test_the_table_size_is_a_power_of_two(slots: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        KeySet(slots)
