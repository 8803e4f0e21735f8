"""A full disk (or an I/O error) while writing the journal or the output: the
run stops with one clear line naming the file and exit 74, and resumes once
space is back. Faults come from the BATCHRUN_DISK_FAULT hook, and, where this
machine lets the test mount one, from a real tmpfs that fills up."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest

from batchrun import crashpoint
from batchrun.errors import DiskError, disk_writes
from batchrun.journal import Journal, read_journal
from batchrun.mock.server import MockServer
from tests.conftest import chat, write_jsonl
from tests.test_resume import clean_output, command, duplicates, resume_to_end, rows, run_cli

EXIT_DISK = 74


def _same_rows(resumed: bytes, clean: bytes) -> int:
    """Assert the resumed output holds the clean run's rows; return how many
    it marks ``reused``: rows the result store kept while the journal could
    not (their answers were paid once, so they are not sent again)."""
    reused = 0
    pairs = zip(resumed.splitlines(), clean.splitlines(), strict=True)
    for got, want in pairs:
        record = orjson.loads(got)
        reused += bool(record.pop("reused", False))
        assert record == orjson.loads(want)
    return reused


def _assert_clean_disk_stop(done: subprocess.CompletedProcess[bytes], path_part: str) -> str:
    stderr = done.stderr.decode()
    assert done.returncode == EXIT_DISK, stderr
    assert "Traceback" not in stderr
    assert "Unclosed" not in stderr
    assert f"cannot write {path_part}" in stderr or f"{path_part}: " in stderr
    assert "run the same command again" in stderr
    return stderr


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "path_part", "reason"),
    [
        ("journal:120", "journal", "No space left on device (ENOSPC)"),
        ("output:4", "output.partial", "No space left on device (ENOSPC)"),
        ("journal:60:EIO", "journal", "Input/output error (EIO)"),
    ],
)
async def test_a_failing_write_stops_the_run_cleanly_and_it_resumes(
    tmp_path: Path, server: MockServer, fault: str, path_part: str, reason: str
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", rows(400))
    out = tmp_path / "out.jsonl"

    stopped = await run_cli(command(source, out, server), BATCHRUN_DISK_FAULT=fault)

    stderr = _assert_clean_disk_stop(stopped, path_part)
    assert reason in stderr
    assert not out.exists()
    summary = await resume_to_end(source, out, server, tmp_path)
    reused = _same_rows(out.read_bytes(), await clean_output(tmp_path, source))
    assert reused <= 8  # --max-async-requests: the rows in flight when the disk failed
    assert duplicates(server) <= summary["extra"]["in doubt (all runs)"]


# --- a real small filesystem -------------------------------------------------------------


def _mount(target: Path, size: str) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    target = tmp_path / "disk"
    target.mkdir()
    if sys.platform != "linux" or not _mount(target, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_really_full_tmpfs_stops_the_run_and_more_space_resumes_it(
    tmp_path: Path, server: MockServer, small_disk: Path
) -> None:
    # ~1.2 KiB answers: 600 rows need ~1.4 MiB (output, journal, store), past 1 MiB.
    source = write_jsonl(
        tmp_path / "in.jsonl", [chat(f"row {i} mock:size=900") for i in range(600)]
    )
    out = small_disk / "out.jsonl"

    stopped = await run_cli(command(source, out, server))

    stderr = _assert_clean_disk_stop(stopped, str(small_disk))
    assert "No space left on device (ENOSPC)" in stderr
    await anyio.run_process(["mount", "-o", "remount,size=64m", str(small_disk)])
    summary = await resume_to_end(source, out, server, tmp_path)
    _same_rows(out.read_bytes(), await clean_output(tmp_path, source))
    assert duplicates(server) <= summary["extra"]["in doubt (all runs)"]


# --- the pieces ---------------------------------------------------------------------------


def test_disk_writes_names_the_file_and_passes_other_errors(tmp_path: Path) -> None:
    target = tmp_path / "journal"
    full = r"cannot write .*journal: No space left on device"
    with pytest.raises(DiskError, match=full), disk_writes(target):
        raise OSError(28, "No space left on device")
    with pytest.raises(PermissionError), disk_writes(target):
        raise PermissionError(13, "Permission denied")


def test_a_journal_cut_short_takes_no_more_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "journal")
    journal.open()
    journal.begin(1)
    monkeypatch.setattr(crashpoint, "_FAULT_NAME", "journal")
    monkeypatch.setattr(crashpoint, "_fault_remaining", 1)
    with pytest.raises(DiskError):
        journal.begin(2)  # half of it reaches the file, as on a real full disk
    monkeypatch.setattr(crashpoint, "_FAULT_NAME", "")
    with pytest.raises(DiskError):
        journal.begin(3)  # even with space back: nothing may follow a torn record
    with contextlib.suppress(DiskError):
        journal.close()
    contents = read_journal(tmp_path / "journal", after_line=0)
    assert contents.begun == {1}  # the torn tail is dropped on reading
    assert (tmp_path / "journal").read_bytes().startswith(orjson.dumps({"b": 1}) + b"\n")
