"""The Bloom filter that spares a first run store lookups: it may say a new
key was seen (costing one lookup), never that a seen key was not."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.keyfilter import BITS_LOG2, KeyFilter


@given(
    added=st.lists(st.binary(min_size=0, max_size=40), max_size=300),
    bits_log2=st.integers(min_value=3, max_value=16),
)
def test_a_key_once_added_is_always_held(added: list[bytes], bits_log2: int) -> None:
    seen = KeyFilter(bits_log2)
    for key in added:
        seen.add(key)
    assert all(seen.add(key) for key in added)


def test_a_new_key_is_new_to_an_empty_filter() -> None:
    rng = random.Random(1)
    empty = KeyFilter(16)
    assert not any(empty.add(rng.randbytes(32)) for _ in range(10))


def test_new_keys_rarely_pass_for_seen_ones() -> None:
    # 100,000 digests in 2 ** 23 bits with two probes: about 0.06 % expected.
    rng = random.Random(7)
    seen = KeyFilter()
    for _ in range(100_000):
        seen.add(rng.randbytes(32))
    passed = sum(seen.add(rng.randbytes(32)) for _ in range(10_000))
    assert passed < 60


@pytest.mark.parametrize("bits_log2", [2, BITS_LOG2 + 1])
def test_a_size_out_of_bounds_is_refused(bits_log2: int) -> None:
    with pytest.raises(ValueError, match="bits_log2"):
        KeyFilter(bits_log2)
