"""Rows parked behind an identical row in flight: each is handed back once,
in input order, when its leader settles, and the key is then free."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batchrun.records import Request
from batchrun.rowsource import Work
from batchrun.twins import Twins


def work(row: int, key: bytes) -> Work:
    request = Request(line=row + 1, custom_id=f"c{row}", kind="chat", body={})
    return Work(row, 0, request, key)


def test_the_first_row_of_a_key_leads_and_the_next_ones_wait_for_it() -> None:
    twins = Twins()
    assert twins.lead(work(0, b"a"))
    assert twins.lead(work(1, b"b"))
    assert not twins.lead(work(2, b"a"))
    assert not twins.lead(work(3, b"a"))
    assert twins.parked == 2

    assert [w.row for w in twins.settle(b"a")] == [2, 3]
    assert not twins.settle(b"b")
    assert twins.parked == 0
    assert twins.lead(work(4, b"a"))  # settled: the key is free again


# A run: rows (of a few keys) read in order; after each, maybe a leader settles.
_STEPS = st.lists(st.tuples(st.sampled_from([b"k1", b"k2", b"k3"]), st.booleans()), max_size=60)


@given(steps=_STEPS)
def test_every_parked_row_comes_back_once_in_order(steps: list[tuple[bytes, bool]]) -> None:
    twins = Twins()
    leaders: list[bytes] = []  # keys in flight, oldest first
    sent, handed_back = [], []
    for row, (key, settle_one) in enumerate(steps):
        if twins.lead(work(row, key)):
            sent.append(row)
            leaders.append(key)
        if settle_one and leaders:
            handed_back += [w.row for w in twins.settle(leaders.pop(0))]
    for key in leaders:
        handed_back += [w.row for w in twins.settle(key)]

    assert sorted(sent + handed_back) == list(range(len(steps)))
    assert twins.parked == 0
    for key in {b"k1", b"k2", b"k3"}:  # a key's rows come back in input order
        rows = [r for r in handed_back if steps[r][0] == key]
        assert rows == sorted(rows)
