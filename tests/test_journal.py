"""The journal and the resume point: torn tails, corruption, compaction."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import anyio
import anyio.lowlevel
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun import journal as journal_module
from batchrun.errors import CorruptStateError
from batchrun.journal import Journal, read_journal
from batchrun.resume import recover
from batchrun.state import Checkpoint, StateDir
from batchrun.stats import Counts


def record(line: int, ok: bool = True) -> bytes:
    error = None if ok else {"code": "server_error", "message": "x", "retryable": True}
    body = {"usage": {"prompt_tokens": 2, "completion_tokens": 3}} if ok else None
    response = {"status_code": 200, "request_id": None, "body": body} if ok else None
    data = {
        "id": f"batch_req_{line}",
        "custom_id": f"c{line}",
        "line": line,
        "response": response,
        "error": error,
        "attempts": 1,
    }
    return orjson.dumps(data, option=orjson.OPT_APPEND_NEWLINE)


def usage(body: object) -> tuple[int, int]:
    if isinstance(body, dict):
        return body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
    return 0, 0


def write_journal(path: Path, events: list[tuple[str, int]]) -> None:
    journal = Journal(path)
    journal.open()
    for kind, line in events:
        if kind == "b":
            journal.begin(line)
        elif kind == "x":
            journal.abandon(line)
        else:
            journal.record(record(line))
    journal.close()


def test_results_begun_and_abandoned(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    write_journal(path, [("b", 1), ("b", 2), ("b", 3), ("r", 2), ("x", 3), ("b", 4)])

    contents = read_journal(path, after_line=0)

    assert set(contents.results) == {2}
    assert contents.in_doubt == {1, 4}  # 3 was answered fatally: not billed, not in doubt
    assert contents.valid_bytes == path.stat().st_size


def test_rows_in_the_ordered_prefix_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    write_journal(path, [("b", 1), ("r", 1), ("b", 2), ("r", 2), ("b", 3)])

    contents = read_journal(path, after_line=2)

    assert contents.results == {}
    assert contents.in_doubt == {3}


def test_a_cut_at_every_byte_of_the_last_record_reads_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    write_journal(path, [("b", 1), ("r", 1), ("b", 2), ("r", 2)])
    whole = path.read_bytes()
    last_start = whole.rindex(b"\n", 0, len(whole) - 1) + 1

    for cut in range(last_start, len(whole) + 1):
        path.write_bytes(whole[:cut])
        contents = read_journal(path, after_line=0)
        complete = cut == len(whole)
        assert set(contents.results) == ({1, 2} if complete else {1}), cut
        assert contents.in_doubt == (set() if complete else {2}), cut
        assert contents.valid_bytes == (cut if complete else last_start), cut


def test_corruption_in_the_middle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    write_journal(path, [("b", 1), ("r", 1), ("b", 2), ("r", 2)])
    damaged = bytearray(path.read_bytes())
    damaged[12] = ord("#")
    path.write_bytes(bytes(damaged))

    with pytest.raises(CorruptStateError, match="damaged at record"):
        read_journal(path, after_line=0)


def test_rewrite_replaces_the_journal_atomically(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = Journal(path)
    journal.open()
    for line in range(1, 6):
        journal.begin(line)
        journal.record(record(line))
    journal.rewrite([b'{"b":7}\n', record(6)])
    journal.begin(8)
    journal.close()

    contents = read_journal(path, after_line=0)
    assert set(contents.results) == {6}
    assert contents.in_doubt == {7, 8}
    assert not (tmp_path / "journal.new").exists()


events = st.lists(
    st.tuples(st.sampled_from(["b", "r", "x"]), st.integers(min_value=1, max_value=30)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(events=events, cut_fraction=st.floats(min_value=0, max_value=1))
def test_property_a_torn_journal_keeps_exactly_its_complete_records(
    tmp_path_factory: pytest.TempPathFactory, events: list[tuple[str, int]], cut_fraction: float
) -> None:
    path = tmp_path_factory.mktemp("j") / "journal"
    write_journal(path, events)
    whole = path.read_bytes()
    cut = int(len(whole) * cut_fraction)
    path.write_bytes(whole[:cut])
    complete = whole[:cut].count(b"\n")

    contents = read_journal(path, after_line=0)

    expected_results: set[int] = set()
    expected_begun: set[int] = set()
    for kind, line in events[:complete]:
        if kind == "r":
            expected_results.add(line)
        elif kind == "b":
            expected_begun.add(line)
        else:
            expected_begun.discard(line)
    assert set(contents.results) == expected_results
    assert contents.in_doubt == expected_begun - expected_results


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(min_value=0, max_value=40),
    checkpoint_at=st.integers(min_value=0, max_value=40),
    torn=st.integers(min_value=0, max_value=60),
)
def test_property_recover_counts_the_complete_ordered_prefix(
    tmp_path_factory: pytest.TempPathFactory, rows: int, checkpoint_at: int, torn: int
) -> None:
    checkpoint_at = min(checkpoint_at, rows)
    state = StateDir(tmp_path_factory.mktemp("s") / "out.jsonl")
    state.root.mkdir(parents=True)
    lines = [record(n, ok=n % 3 != 0) for n in range(1, rows + 2)]
    partial = b"".join(lines[:rows]) + lines[rows][: torn % len(lines[rows])]
    state.partial_path.write_bytes(partial)
    before = b"".join(lines[:checkpoint_at])
    fails = sum(1 for n in range(1, checkpoint_at + 1) if n % 3 == 0)
    state.write_checkpoint(
        Checkpoint(
            rows=checkpoint_at,
            output_bytes=len(before),
            counts=Counts(
                ok=checkpoint_at - fails,
                failed_by_code=Counter({"server_error": fails} if fails else {}),
                tokens_in=2 * (checkpoint_at - fails),
                tokens_out=3 * (checkpoint_at - fails),
            ),
        )
    )

    point = recover(state, usage)

    failed = sum(1 for n in range(1, rows + 1) if n % 3 == 0)
    assert point.checkpoint.rows == rows
    assert point.checkpoint.output_bytes == len(b"".join(lines[:rows]))
    assert point.checkpoint.ok == rows - failed
    assert point.checkpoint.failed_by_code.get("server_error", 0) == failed
    assert point.checkpoint.tokens_out == 3 * (rows - failed)


def test_recover_refuses_a_damaged_output(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()
    state.partial_path.write_bytes(record(1) + record(3))  # row 2 is missing

    with pytest.raises(CorruptStateError, match="damaged at the row of line 2"):
        recover(state, usage)


@pytest.mark.asyncio
async def test_a_steady_run_makes_one_write_per_row(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    journal.open()
    for line in range(1, 101):
        journal.begin(line)  # carries the previous row's result with it
        journal.record(b'{"line":%d}\n' % line, line=line)
    await anyio.lowlevel.checkpoint()  # the end of the loop's pass writes the last
    journal.close()

    assert journal.writes == 101
    contents = read_journal(tmp_path / "journal.jsonl", after_line=0)
    assert sorted(contents.results) == list(range(1, 101))
    assert contents.in_doubt == set()


@pytest.mark.asyncio
async def test_a_begin_mark_is_written_before_begin_returns_and_results_by_the_pass_end(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.open()
    journal.begin(1)
    assert path.read_bytes() == b'{"b":1}\n'  # the request may go to the socket now
    journal.record(b'{"line":1}\n', line=1)
    assert path.read_bytes() == b'{"b":1}\n'  # waiting for the end of this pass
    await anyio.lowlevel.checkpoint()
    assert path.read_bytes() == b'{"b":1}\n{"line":1}\n'
    journal.close()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40_000), min_size=1, max_size=12),
    most=st.integers(min_value=1, max_value=50_000),
)
def test_records_reach_the_file_whole_through_short_writes(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], most: int
) -> None:
    """Small batches go as one joined write, large ones by writev: either
    way, when the kernel takes fewer bytes than offered (``most`` per call
    here), the rest follows and the file holds every record whole, in order."""
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data[:most]))

    def short_writev(fd: int, views: list[memoryview]) -> int:
        return real_write(fd, b"".join(bytes(view) for view in views)[:most])

    pieces = [bytes([65 + number % 26]) * size for number, size in enumerate(sizes)]
    path = tmp_path_factory.mktemp("short") / "journal"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(journal_module.os, "write", short_write)
            patch.setattr(journal_module.os, "writev", short_writev)
            Journal._write_all(fd, pieces)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)
