"""Tests of batchrun.writer: the reorder buffer and the atomically published output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun import writer
from batchrun.layout import state_dir
from batchrun.writer import OutputFile, ReorderBuffer

# --- ReorderBuffer ---------------------------------------------------------------


def test_releases_in_order() -> None:
    buffer: ReorderBuffer[str] = ReorderBuffer()
    assert buffer.next_index == 0
    assert buffer.push(2, "c") == []
    assert buffer.held == 1
    assert buffer.push(1, "b") == []
    assert buffer.held == 2
    assert buffer.push(0, "a") == ["a", "b", "c"]
    assert buffer.held == 0
    assert buffer.next_index == 3
    assert buffer.push(3, "d") == ["d"]
    assert buffer.push(5, "f") == []
    assert buffer.next_index == 4
    assert buffer.push(4, "e") == ["e", "f"]
    assert buffer.next_index == 6


def test_in_order_pushes_release_immediately() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer()
    for index in range(5):
        assert buffer.push(index, index * 10) == [index * 10]
        assert buffer.held == 0
    assert buffer.next_index == 5


def test_gap_holds_everything_after_it() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer()
    for index in range(1, 6):
        assert buffer.push(index, index) == []
    assert buffer.held == 5
    assert buffer.next_index == 0
    assert buffer.push(0, 0) == [0, 1, 2, 3, 4, 5]


def test_an_item_passed_at_its_turn_is_skipped_in_order() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer(2)
    buffer.pass_next()  # written straight away, never pushed
    assert buffer.next_index == 3
    assert buffer.push(3, 3) == [3]
    assert buffer.push(5, 5) == []
    with pytest.raises(ValueError, match="index 4 passed"):
        buffer.pass_next()  # 5 waits: 4 must come through push
    assert buffer.push(4, 4) == [4, 5]


def test_duplicate_held_index_raises() -> None:
    buffer: ReorderBuffer[str] = ReorderBuffer()
    buffer.push(3, "x")
    with pytest.raises(ValueError, match="index 3"):
        buffer.push(3, "y")
    assert buffer.held == 1
    assert buffer.push(0, "a") == ["a"]


def test_duplicate_released_index_raises() -> None:
    buffer: ReorderBuffer[str] = ReorderBuffer()
    assert buffer.push(0, "a") == ["a"]
    with pytest.raises(ValueError, match="index 0"):
        buffer.push(0, "again")
    assert buffer.next_index == 1
    assert buffer.held == 0


def test_starting_index() -> None:
    buffer: ReorderBuffer[str] = ReorderBuffer(next_index=100)
    assert buffer.next_index == 100
    with pytest.raises(ValueError, match="index 99"):
        buffer.push(99, "old")
    assert buffer.push(101, "b") == []
    assert buffer.push(100, "a") == ["a", "b"]
    assert buffer.next_index == 102


@given(
    st.integers(min_value=0, max_value=40).flatmap(lambda n: st.permutations(list(range(n)))),
    st.integers(min_value=0, max_value=1000),
)
def test_property_any_permutation_released_in_order(order: list[int], start: int) -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer(next_index=start)
    released: list[int] = []
    for pushed, index in enumerate(order, start=1):
        released.extend(buffer.push(start + index, index))
        assert buffer.held == pushed - len(released)
        assert buffer.next_index == start + len(released)
    assert released == list(range(len(order)))
    assert buffer.held == 0


# --- state_dir and OutputFile ----------------------------------------------------


def test_state_dir_naming(tmp_path: Path) -> None:
    assert state_dir(Path("out.jsonl")) == Path("out.jsonl.batchrun")
    assert state_dir(Path("runs/a/results.jsonl")) == Path("runs/a/results.jsonl.batchrun")
    assert state_dir(tmp_path / "out") == tmp_path / "out.batchrun"


def test_output_file_paths(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    output = OutputFile(out)
    assert output.final == out
    assert output.partial == tmp_path / "out.jsonl.batchrun" / "output.partial"
    assert not output.partial.parent.exists()  # nothing touched before open()


def test_write_then_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", recording_replace)
    out = tmp_path / "out.jsonl"
    output = OutputFile(out)
    output.open()
    assert output.partial.parent.is_dir()
    output.write(b'{"line":1}\n')
    output.write(b'{"line":2}\n')
    output.flush()
    assert output.partial.read_bytes() == b'{"line":1}\n{"line":2}\n'
    assert not out.exists()
    output.write(b'{"line":3}\n')
    assert not out.exists()
    output.publish()
    assert out.read_bytes() == b'{"line":1}\n{"line":2}\n{"line":3}\n'
    assert renames == [(os.fspath(output.partial), os.fspath(out))]
    assert not output.partial.exists()
    assert not state_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_publish_after_close(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    output = OutputFile(out)
    output.open()
    output.write(b"a\n")
    output.close()
    assert output.partial.read_bytes() == b"a\n"
    assert not out.exists()
    output.publish()
    assert out.read_bytes() == b"a\n"
    assert not state_dir(out).exists()


@pytest.mark.parametrize("durable", [True, False])
def test_a_durable_publish_puts_the_output_on_the_disk_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    # The run's writer closed the output without an fsync; the finished
    # record then says it is complete, so with --fsync batch or always a
    # power loss after the rename must not find it short.
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        events.append("rename")
        real_replace(src, dst)

    out = tmp_path / "o.jsonl"
    written = OutputFile(out)
    written.open()
    written.write(b"a\n")
    written.close()
    monkeypatch.setattr(writer.os, "fsync", fsync)
    monkeypatch.setattr(writer.os, "replace", replace)

    OutputFile(out).publish(durable=durable)

    expected = ["fsync file", "rename", "fsync dir"] if durable else ["rename", "fsync dir"]
    assert events == expected
    assert out.read_bytes() == b"a\n"


def test_publish_keeps_non_empty_state_dir(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    output = OutputFile(out)
    output.open()
    output.write(b"x\n")
    keep = state_dir(out) / "checkpoint"
    keep.write_bytes(b"state")
    output.publish()
    assert out.read_bytes() == b"x\n"
    assert keep.read_bytes() == b"state"
    assert not output.partial.exists()


def test_publish_replaces_existing_out(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old\n")
    output = OutputFile(out)
    output.open()
    output.write(b"new\n")
    output.flush()
    assert out.read_bytes() == b"old\n"
    output.publish()
    assert out.read_bytes() == b"new\n"


def test_open_keeps_only_the_bytes_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = OutputFile(out)
    first.open()
    first.write(b"1\n{torn")
    first.close()

    resumed = OutputFile(out)
    resumed.open(keep_bytes=2)  # the complete lines; the torn tail goes
    resumed.write(b"2\n")
    resumed.close()
    assert resumed.partial.read_bytes() == b"1\n2\n"

    fresh = OutputFile(out)
    fresh.open()
    fresh.write(b"3\n")
    fresh.close()
    assert fresh.partial.read_bytes() == b"3\n"


def test_open_creates_missing_parent(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "er" / "out.jsonl"
    output = OutputFile(out)
    output.open()
    output.write(b"z\n")
    output.publish()
    assert out.read_bytes() == b"z\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]


def test_flush_and_close_without_open_are_noops(tmp_path: Path) -> None:
    output = OutputFile(tmp_path / "out.jsonl")
    output.flush()
    output.flush(fsync=True)
    output.close()
    assert not output.partial.parent.exists()


@pytest.mark.asyncio
@pytest.mark.parametrize(("fsync", "durable"), [("off", False), ("batch", True), ("always", True)])
async def test_a_run_publishes_durably_unless_fsync_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: str, durable: bool
) -> None:
    from batchrun.mock.server import MockServer
    from batchrun.runner import run_async
    from tests.conftest import chat, make_config

    asked: list[bool] = []
    real_publish = OutputFile.publish

    def publish(self: OutputFile, *, durable: bool = False) -> None:
        asked.append(durable)
        real_publish(self, durable=durable)

    monkeypatch.setattr(OutputFile, "publish", publish)
    async with MockServer() as server:
        config = make_config(tmp_path, [chat("a")], server, fsync=fsync)
        assert (await run_async(config)).exit_code == 0
    assert asked == [durable]
