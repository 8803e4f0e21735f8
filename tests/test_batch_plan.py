"""The pure parts of batch mode: splitting rows into files, and result lines
mapped back to output records."""

from __future__ import annotations

from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st

from batchrun.batchmode.plan import Group, Splitter, batch_key, batch_line, line_of_key
from batchrun.batchmode.results import collect
from batchrun.providers.openai import OpenAIProvider
from batchrun.records import Request

GROUPS = [Group("/v1/chat/completions", "a"), Group("/v1/chat/completions", "b")]


@given(
    rows=st.lists(st.tuples(st.sampled_from(GROUPS), st.integers(1, 50)), max_size=200),
    max_rows=st.integers(1, 10),
    max_bytes=st.integers(1, 120),
)
def test_parts_hold_one_group_within_the_limits(
    rows: list[tuple[Group, int]], max_rows: int, max_bytes: int
) -> None:
    splitter = Splitter(max_rows, max_bytes)
    parts: dict[int, list[tuple[Group, int]]] = {}
    closed: set[int] = set()
    for group, size in rows:
        part, full = splitter.place(group, size)
        assert part not in closed  # a closed part never gets another row
        if full is not None:
            closed.add(full)
        parts.setdefault(part, []).append((group, size))
    for members in parts.values():
        assert len({group for group, _ in members}) == 1
        assert len(members) <= max_rows
        sizes = [size for _, size in members]
        assert sum(sizes) <= max_bytes or len(sizes) == 1


def test_rows_split_by_count_and_by_model() -> None:
    splitter = Splitter(max_rows=2, max_bytes=10**6)
    placed = [splitter.place(GROUPS[i % 2], 10)[0] for i in range(6)]
    assert placed == [1, 2, 1, 2, 3, 4]


def test_ids_in_a_file_are_unique_even_when_the_input_repeats_its_own() -> None:
    requests = [
        Request(line=n, custom_id="same", kind="chat", body={"model": "m", "messages": []})
        for n in (1, 2)
    ]
    keys = [orjson.loads(batch_line(r, r.body)[1])["custom_id"] for r in requests]
    assert len(set(keys)) == 2
    assert [line_of_key(key) for key in keys] == [1, 2]
    assert line_of_key("someone-else") is None


def test_results_map_back_by_our_key_and_missing_rows_are_unfinished(tmp_path: Path) -> None:
    provider = OpenAIProvider()
    ids = {3: "a", 5: "a", 9: "b"}
    body = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    output = orjson.dumps(
        {
            "custom_id": batch_key(5),
            "response": {"status_code": 200, "request_id": "q", "body": body},
        }
    )
    bad = {"error": {"message": "no", "type": "invalid_request_error", "code": "bad"}}
    errors = b"\n".join(
        [
            orjson.dumps(
                {"custom_id": batch_key(3), "response": {"status_code": 400, "body": bad}}
            ),
            orjson.dumps({"custom_id": batch_key(9), "error": {"code": "batch_expired"}}),
        ]
    )
    files = [tmp_path / "out", tmp_path / "err"]
    files[0].write_bytes(output + b"\n")
    files[1].write_bytes(errors + b"\n")
    found = collect(files, ids, provider, tmp_path / "spill")
    assert found.unfinished == {9}
    records = [orjson.loads(chunk) for chunk in found.records.sorted_chunks()]
    found.records.close()
    failed, ok = records
    assert ok["custom_id"] == "a"
    assert ok["error"] is None
    assert ok["line"] == 5
    assert failed["error"]["code"] == "bad"
    assert failed["response"]["status_code"] == 400
