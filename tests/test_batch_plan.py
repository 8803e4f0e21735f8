"""The pure parts of batch mode: splitting rows into files, and result lines
mapped back to output records."""

from __future__ import annotations

import heapq
from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st

from batchrun.batchmode.known import Known, KnownResults, filed_head, merge_runs
from batchrun.batchmode.plan import Group, Splitter, batch_key, batch_line, line_of_key
from batchrun.batchmode.results import Reading, Records, collect
from batchrun.contentkey import canonical_json
from batchrun.providers.openai import OpenAIProvider
from batchrun.records import Outcome, Request, Response, output_line
from batchrun.rowsource import Finished, known_row
from batchrun.stats import Tally

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


def test_a_batch_line_sends_the_body_as_its_canonical_json() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": 'say "hi"\n'}], "a": 1}
    request = Request(line=7, custom_id="x", kind="chat", body=body)
    group, line, sent = batch_line(request, body)
    assert group == Group("/v1/chat/completions", "m")
    assert line.endswith(b"}\n")
    assert line.count(b"\n") == 1
    assert orjson.loads(line) == {
        "custom_id": "r7",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
    }
    assert sent == canonical_json(body)
    assert sent in line


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


def test_a_200_result_carrying_an_error_is_a_retryable_row_error(tmp_path: Path) -> None:
    provider = OpenAIProvider()
    gateway = {"error": {"message": "model overloaded", "code": "overloaded"}}
    answer = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    results = tmp_path / "out"
    results.write_bytes(
        b"".join(
            orjson.dumps(
                {"custom_id": batch_key(line), "response": {"status_code": 200, "body": body}}
            )
            + b"\n"
            for line, body in ((1, gateway), (2, {**answer, "error": None}))
        )
    )
    seen: list[tuple[int, bool, bool]] = []

    def note(line: int, at: int, record: bytes, ok: bool, retryable: bool, cost: object) -> None:
        seen.append((line, ok, retryable))

    found = collect([results], {1: "a", 2: "b"}, provider, tmp_path / "spill", note)
    records = [orjson.loads(chunk) for chunk in found.records.sorted_chunks()]
    found.records.close()
    failed, ok = records
    assert failed["error"]["code"] == "overloaded"
    assert failed["error"]["retryable"] is True
    assert failed["response"]["status_code"] == 200
    assert ok["error"] is None  # an answer with "error": null is an answer
    assert seen == [(1, False, True), (2, True, False)]  # the store keeps no error as an answer


def test_known_results_read_headed_and_plain_lines(tmp_path: Path) -> None:
    # A part collected with token heads, and one of an older run without them.
    answer = Response(status_code=200, request_id="r", body={})
    ok = output_line(Outcome(line=2, custom_id="a", response=answer, attempts=1))
    failed = output_line(Outcome(line=3, custom_id="b", error_code="bad", attempts=1))
    plain = output_line(Outcome(line=5, custom_id="c", response=answer, attempts=1))
    priced = output_line(Outcome(line=6, custom_id="d", response=answer, attempts=1, cost=0.25))
    headed = tmp_path / "a.results"
    headed.write_bytes(filed_head(2, 7, 11) + ok + failed + filed_head(6, 7, 11, 0.25) + priced)
    older = tmp_path / "b.results"
    older.write_bytes(plain)
    known = KnownResults([headed, older])
    try:
        assert known.get(1) is None
        assert known.get(2) == Known(ok, Tally(True, None, False, 7, 11))
        assert known.get(3) == Known(failed, None)
        assert known.get(4) is None
        assert known.get(5) == Known(plain, None)
        assert known.get(6) == Known(priced, Tally(True, None, False, 7, 11, 0.25))
        assert known.get(7) is None
        assert known.found == 4
    finally:
        known.close()


def answer_and_refusal(tmp_path: Path) -> Path:
    """A result file: row 1 answered with 4 tokens in and 9 out, row 2 refused (a 400)."""
    body = {"usage": {"prompt_tokens": 4, "completion_tokens": 9}}
    answer = {"custom_id": "r1", "response": {"status_code": 200, "body": body}}
    refused = {"custom_id": "r2", "response": {"status_code": 400, "body": {}}}
    results = tmp_path / "out"
    results.write_bytes(orjson.dumps(answer) + b"\n" + orjson.dumps(refused) + b"\n")
    return results


def test_collect_files_answers_with_their_tokens(tmp_path: Path) -> None:
    provider = OpenAIProvider()
    results = answer_and_refusal(tmp_path)
    ids = {1: "a", 2: "b"}
    found = collect([results], ids, provider, tmp_path / "spill", reading=Reading(provider.usage))
    chunks = [bytes(chunk) for chunk in found.records.sorted_chunks()]
    found.records.close()
    assert chunks[0].startswith(filed_head(1, 4, 9) + b'{"id":"batch_req_1"')
    assert chunks[1].startswith(b'{"id":"batch_req_2"')
    assert b'"cost"' not in chunks[0] + chunks[1]  # not priced


def test_collect_prices_answers_and_notes_their_cost(tmp_path: Path) -> None:
    provider = OpenAIProvider()
    results = answer_and_refusal(tmp_path)
    noted: list[tuple[int, bool, float | None]] = []

    def note(line: int, at: int, record: bytes, ok: bool, retry: bool, cost: float | None) -> None:
        noted.append((line, ok, cost))

    def price(tokens_in: int, tokens_out: int) -> float:
        return tokens_in * 0.5 + tokens_out * 0.25

    reading = Reading(provider.usage, price=price)
    found = collect([results], {1: "a", 2: "b"}, provider, tmp_path / "spill", note, reading)
    chunks = [bytes(chunk) for chunk in found.records.sorted_chunks()]
    found.records.close()

    assert noted == [(1, True, 4.25), (2, False, 0.0)]
    assert chunks[0].startswith(filed_head(1, 4, 9, 4.25) + b'{"id":"batch_req_1"')
    record = chunks[0].partition(b"\t")[2]
    assert orjson.loads(record)["cost"] == 4.25
    assert orjson.loads(chunks[1])["cost"] == 0.0  # an error costs nothing, as online


def test_records_in_line_order_are_kept_as_they_were_spilled(tmp_path: Path) -> None:
    in_order = Records(tmp_path / "spill-a")
    in_order.add(2, b"two\n")
    in_order.add(7, b"seven\n", b"7 1 1\t")
    assert in_order.keep_as(tmp_path / "a.results")
    in_order.close()
    assert (tmp_path / "a.results").read_bytes() == b"two\n7 1 1\tseven\n"
    shuffled = Records(tmp_path / "spill-b")
    shuffled.add(7, b"seven\n")
    shuffled.add(2, b"two\n")
    assert not shuffled.keep_as(tmp_path / "b.results")
    assert b"".join(shuffled.sorted_chunks()) == b"two\nseven\n"
    shuffled.close()
    assert not (tmp_path / "b.results").exists()
    assert not (tmp_path / "spill-b").exists()


@given(
    st.lists(
        st.lists(st.integers(1, 60), max_size=25).map(sorted),
        max_size=6,
    )
)
def test_merging_runs_gives_what_heapq_merge_gives(lines: list[list[int]]) -> None:
    """Consecutive, interleaved, repeated and empty runs: the same items in the
    same order (ties in run order), each item telling its run."""
    runs = [[(line, b"%d" % order) for line in run] for order, run in enumerate(lines)]
    expected = list(heapq.merge(*runs, key=lambda item: item[0]))
    assert list(merge_runs([iter(run) for run in runs])) == expected


def test_a_known_row_is_the_finished_row_its_fields_make() -> None:
    tally = Tally(True, None, False, 1, 2)
    row = known_row(3, 10, b"x\n", tally)
    assert row == Finished(3, 10, b"x\n", None, tally=tally, batched=True)
    assert len(row) == len(Finished._fields)
    assert (row.reused, row.journal_at, row.kept, row.tally) == (False, None, 0, tally)
    assert row.batched
