"""Merge checks each shard output's line count against the rows its finished
record says its run wrote, and a refusal names the file that is wrong and
leaves ``--out`` as it was."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

import batchrun.merge as merge_module
from batchrun.cli import app
from batchrun.errors import UsageError
from batchrun.merge import ShardOutput, merge
from batchrun.mock.server import MockServer
from batchrun.state import StateDir
from tests.conftest import chat, read_jsonl, run_shards, write_jsonl

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

# 20 rows in 3 shards hold 7, 7 and 6 rows. Cutting shard 0's or 1's last
# line leaves 6/7/6 or 7/6/6: a shape a round-robin check alone accepts.
ROWS, COUNT = 20, 3
WROTE = [7, 7, 6]

Change = Callable[[Path], None]


def cut_last_line(path: Path) -> None:
    """``head -n -1 p.jsonl``."""
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))


def append_a_line(path: Path) -> None:
    """``tail -n 1 p.jsonl >> p.jsonl``: a well-formed, plausible extra line."""
    last = path.read_bytes().splitlines(keepends=True)[-1]
    with path.open("ab") as handle:
        handle.write(last)


async def shards(tmp_path: Path, server: MockServer) -> list[Path]:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(ROWS)])
    return await run_shards(tmp_path, server, source, COUNT)


def refusal(part: Path, index: int, lines: int) -> str:
    """The pattern of the refusal naming shard ``index``'s file ``part``."""
    counts = f"holds {lines} lines, but the run of shard {index}/{COUNT} wrote {WROTE[index]}"
    return f"{re.escape(str(part))} .*{re.escape(counts)}"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".merging").exists()


@pytest.mark.parametrize("index", range(COUNT))
async def test_a_shard_cut_short_by_its_last_line_is_refused_by_name(
    tmp_path: Path, server: MockServer, index: int
) -> None:
    parts = await shards(tmp_path, server)
    cut_last_line(parts[index])

    with pytest.raises(UsageError, match=refusal(parts[index], index, WROTE[index] - 1)):
        merge(parts, tmp_path / "m.jsonl")
    assert_nothing_written(tmp_path / "m.jsonl")


@pytest.mark.parametrize("index", range(COUNT))
async def test_a_shard_with_a_line_appended_is_refused_by_name(
    tmp_path: Path, server: MockServer, index: int
) -> None:
    parts = await shards(tmp_path, server)
    append_a_line(parts[index])

    with pytest.raises(UsageError, match=refusal(parts[index], index, WROTE[index] + 1)):
        merge(parts, tmp_path / "m.jsonl")
    assert_nothing_written(tmp_path / "m.jsonl")


async def test_the_command_refuses_a_short_shard_in_one_line_with_exit_2(
    tmp_path: Path, server: MockServer
) -> None:
    parts = await shards(tmp_path, server)
    merged = tmp_path / "m.jsonl"
    merge(parts, merged)  # an earlier merge, which a refused one must leave alone
    before = merged.read_bytes()
    cut_last_line(parts[1])

    done = CliRunner().invoke(app, ["merge", *map(str, parts), "--out", str(merged)])

    assert done.exit_code == 2, done.output
    assert done.output.count("\n") == 1, done.output
    assert re.match("batchrun: error: " + refusal(parts[1], 1, 6), done.output)
    assert merged.read_bytes() == before
    assert len(read_jsonl(merged)) == ROWS


@pytest.mark.parametrize(
    ("index", "change", "lines"), [(1, cut_last_line, 6), (0, append_a_line, 8)]
)
async def test_a_shard_changed_after_the_count_is_still_named_while_interleaving(
    tmp_path: Path,
    server: MockServer,
    monkeypatch: pytest.MonkeyPatch,
    index: int,
    change: Change,
    lines: int,
) -> None:
    parts = await shards(tmp_path, server)
    interleave = merge_module._interleave

    # The file changes between the count and the merge (a run writing it anew).
    def changed_first(found: list[ShardOutput], partial: Path) -> tuple[int, int]:
        change(parts[index])
        return interleave(found, partial)

    monkeypatch.setattr(merge_module, "_interleave", changed_first)
    with pytest.raises(UsageError, match=refusal(parts[index], index, lines)):
        merge(parts, tmp_path / "m.jsonl")
    assert_nothing_written(tmp_path / "m.jsonl")


async def test_finished_records_that_split_no_input_are_refused(
    tmp_path: Path, server: MockServer
) -> None:
    parts = await shards(tmp_path, server)
    record = StateDir(parts[2]).finished_path
    data = orjson.loads(record.read_bytes())
    record.write_bytes(orjson.dumps({**data, "rows": 5}))  # a record edited by hand
    cut_last_line(parts[2])  # and its file to match it

    with pytest.raises(UsageError, match="shard 0/3: 7, shard 1/3: 7, shard 2/3: 5"):
        merge(parts, tmp_path / "m.jsonl")
    assert_nothing_written(tmp_path / "m.jsonl")


async def test_intact_shards_still_merge_in_input_order(tmp_path: Path, server: MockServer) -> None:
    parts = await shards(tmp_path, server)

    report = merge(parts, tmp_path / "m.jsonl")

    assert (report.rows, report.failed) == (ROWS, 0)
    assert [r["line"] for r in read_jsonl(tmp_path / "m.jsonl")] == list(range(1, ROWS + 1))


async def test_merge_replaces_an_earlier_merge_but_no_other_file(
    tmp_path: Path, server: MockServer
) -> None:
    parts = await shards(tmp_path, server)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    with pytest.raises(UsageError, match=r"--out .*notes.txt exists and is not a batchrun output"):
        merge(parts, notes)
    assert notes.read_text() == "precious\n"
    out = tmp_path / "m.jsonl"
    merge(parts, out)
    merge(parts, out)  # made again: it held batchrun records
    assert [r["line"] for r in read_jsonl(out)] == list(range(1, ROWS + 1))
    # A record of several MiB (a large answer) is one too.
    big = b'{"id":"batch_req_1","custom_id":"a","line":1,"body":"' + b"x" * (3 << 20) + b'"}\n'
    out.write_bytes(big)
    merge(parts, out)
    assert len(read_jsonl(out)) == ROWS
    # A provider's own batch output (paid results) is not replaced.
    provider = b'{"id":"batch_req_6f1a2b3c","custom_id":"request-1","response":{},"error":null}\n'
    out.write_bytes(provider)
    with pytest.raises(UsageError, match="exists and is not a batchrun output"):
        merge(parts, out)
    assert out.read_bytes() == provider


async def test_a_link_left_where_merge_writes_is_not_written_through(
    tmp_path: Path, server: MockServer
) -> None:
    parts = await shards(tmp_path, server)
    kept = parts[1].read_bytes()
    out = tmp_path / "m.jsonl"
    out.with_name("m.jsonl.merging").symlink_to(parts[1])

    merge(parts, out)

    assert parts[1].read_bytes() == kept
    assert not out.is_symlink()
    assert len(read_jsonl(out)) == ROWS
