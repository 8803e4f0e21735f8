"""Batch mode for real: subprocess runs killed right after creating a batch,
stopped by SIGTERM while batches run, cancelled on purpose; the mock server
runs in this test's event loop and keeps every batch."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import orjson
import pytest

from batchrun.batchmode.record import Part
from batchrun.mock.batches import BatchFaults
from batchrun.mock.server import MockServer
from tests.conftest import chat, read_jsonl, write_jsonl
from tests.test_resume import finish, run_cli, start_cli, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


def command(source: Path, out: Path, server: MockServer, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchrun",
        "run",
        str(source),
        "--out",
        str(out),
        "--provider",
        "openai",
        "--base-url",
        server.base_url,
        "--mode",
        "batch",
        "--poll-interval",
        "0.05",
        "--batch-rows",
        "4",
        "--no-progress",
        *extra,
    ]


def source_rows(tmp_path: Path, count: int = 10) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [chat(f"row {i}", model="m") for i in range(count)])


def submitted(out: Path) -> int:
    path = out.with_name(out.name + ".batchrun") / "batch" / "state.json"
    try:
        parts = orjson.loads(path.read_bytes())["parts"]
    except (FileNotFoundError, orjson.JSONDecodeError):
        return 0
    return sum(part["status"] == "submitted" for part in parts)


async def test_a_crash_after_create_makes_no_second_batch(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=0.3)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        crashed = await run_cli(
            command(source, out, server), BATCHRUN_CRASH_AT="after_batch_create:2"
        )
        assert crashed.returncode == -signal.SIGKILL
        made = server.batches.created
        assert made >= 2  # the second one exists on the provider, unrecorded
        done = await run_cli(command(source, out, server))
        assert done.returncode == 0, done.stderr.decode()
        assert b"attached to" in done.stderr
        assert server.batches.created == 3  # one per part: 10 rows in files of 4
        assert sum(count - 1 for count in server.stats.by_digest.values()) == 0
        assert server.stats.batch_rows == 10
    assert [row["line"] for row in read_jsonl(out)] == list(range(1, 11))


async def test_a_crash_after_upload_uploads_no_second_file(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=0.3)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        crashed = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT="after_upload:2")
        assert crashed.returncode == -signal.SIGKILL
        done = await run_cli(command(source, out, server))
        assert done.returncode == 0, done.stderr.decode()
        assert b"found its file uploaded before a crash" in done.stderr
        assert server.batches.uploads == 3  # one per part
        assert server.batches.created == 3
        assert server.batches.files == {}  # and every one cleaned up
    assert len(read_jsonl(out)) == 10


async def test_online_mode_after_a_crash_mid_upload_names_the_files_left(tmp_path: Path) -> None:
    # Killed after an upload and before its file id was recorded: every part
    # is still "planned", so online mode may go on, and the record that could
    # find the file goes. The file stays on the provider: the run names it.
    async with MockServer(batch_faults=BatchFaults(seconds=0.3)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        crashed = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT="after_upload:1")
        assert crashed.returncode == -signal.SIGKILL
        left = {str(file["filename"]) for file in server.batches.files.values()}
        assert left
        online = [a for a in command(source, out, server) if a not in ("--mode", "batch")]
        done = await run_cli(online)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "a stopped batch run may have left" in stderr
    assert all(name in stderr for name in left)
    assert len(read_jsonl(out)) == 10


async def test_sigterm_leaves_the_batches_running_and_the_rerun_attaches(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=60)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        process = await start_cli(command(source, out, server))
        await wait_for(lambda: submitted(out) == 3)
        process.send_signal(signal.SIGTERM)
        code, stderr = await finish(process)
        assert code == 75, stderr
        assert "3 batches keep running" in stderr
        statuses = {b.info["status"] for b in server.batches.batches.values()}
        assert statuses <= {"validating", "in_progress"}
        assert all(b.cancelled is None for b in server.batches.batches.values())
        status = await run_cli([sys.executable, "-m", "batchrun", "status", str(out)])
        listed = status.stdout.decode()
        assert status.returncode == 0
        assert "batch_" in listed
        assert "part 3" in listed
        server.batches.faults.seconds = 0.2  # let them finish now
        done = await run_cli(command(source, out, server))
        assert done.returncode == 0, done.stderr.decode()
        assert server.batches.created == 3
        assert server.stats.batch_rows == 10
    assert len(read_jsonl(out)) == 10


async def test_a_signal_while_planning_ends_it_at_once_and_records_no_part(
    tmp_path: Path,
) -> None:
    # Planning a big input takes seconds: a stop must not wait for its end
    # (Airflow kills a task 5 s after SIGTERM), nor record the parts after it.
    source = tmp_path / "in.jsonl"
    with source.open("wb") as handle:
        handle.writelines(_row(i) for i in range(300_000))
    async with MockServer(batch_faults=BatchFaults(seconds=0.3)) as server:
        out = tmp_path / "out.jsonl"
        process = await start_cli(command(source, out, server, "--batch-rows", "50000"))
        batch_dir = out.with_name(out.name + ".batchrun") / "batch"
        await wait_for((batch_dir / "part-000001.jsonl").exists)
        process.send_signal(signal.SIGTERM)
        code, stderr = await finish(process)
        assert code == 75, stderr
        assert submitted(out) == 0
        state = batch_dir / "state.json"
        assert not state.exists() or orjson.loads(state.read_bytes())["parts"] == []
        assert not server.batches.contents  # nothing uploaded


def _row(index: int) -> bytes:
    return b'{"messages": [{"role": "user", "content": "row %d"}]}\n' % index


async def stopped_with_batches_running(tmp_path: Path, server: MockServer) -> tuple[Path, Path]:
    """The input and output of a run stopped by SIGTERM once its 3 batches
    are submitted (they keep running on ``server``)."""
    source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
    process = await start_cli(command(source, out, server))
    await wait_for(lambda: submitted(out) == 3)
    process.send_signal(signal.SIGTERM)
    assert (await finish(process))[0] == 75
    return source, out


async def test_cancel_cancels_and_the_rerun_keeps_finished_rows(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=60)) as server:
        source, out = await stopped_with_batches_running(tmp_path, server)
        cancelled = await run_cli([sys.executable, "-m", "batchrun", "cancel", str(out)])
        assert cancelled.returncode == 0, cancelled.stderr.decode()
        assert all(b.cancelled is not None for b in server.batches.batches.values())
        assert cancelled.stderr.decode().startswith(
            "batchrun: asked the provider to cancel 3 batches; run the same command again"
        )
        server.batches.faults.seconds = 0.2
        done = await run_cli(command(source, out, server, "--fallback", "online"))
        assert done.returncode == 0, done.stderr.decode()
        assert server.batches.created == 3  # nothing resubmitted as a batch
        assert server.stats.batch_rows + server.stats.requests == 10
    assert len(read_jsonl(out)) == 10


async def test_cancel_refuses_while_a_run_polls_then_cancels_once_it_stopped(
    tmp_path: Path,
) -> None:
    # A polling run would see its batches end cancelled and pay for their rows
    # again in new batches: cancel waits until the run is stopped.
    async with MockServer(batch_faults=BatchFaults(seconds=60)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        process = await start_cli(command(source, out, server))
        await wait_for(lambda: submitted(out) == 3)
        refused = await run_cli([sys.executable, "-m", "batchrun", "cancel", str(out)])
        stderr = refused.stderr.decode()
        assert refused.returncode == 4, stderr
        assert stderr.startswith(f"batchrun: error: a run on {out} is live (pid ")
        assert stderr.endswith("then run batchrun cancel again\n")
        assert stderr.count("\n") == 1
        assert all(b.cancelled is None for b in server.batches.batches.values())
        assert process.returncode is None  # the run polls on
        process.send_signal(signal.SIGTERM)
        assert (await finish(process))[0] == 75
        cancelled = await run_cli([sys.executable, "-m", "batchrun", "cancel", str(out)])
        assert cancelled.returncode == 0, cancelled.stderr.decode()
        assert all(b.cancelled is not None for b in server.batches.batches.values())
        assert server.batches.created == 3


async def test_cancel_with_a_key_no_header_can_carry_says_so_in_one_line(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=60)) as server:
        _, out = await stopped_with_batches_running(tmp_path, server)
        argv = [sys.executable, "-m", "batchrun", "cancel", str(out)]
        cancelled = await run_cli(argv, OPENAI_API_KEY="sk-test\n")
        assert all(b.cancelled is None for b in server.batches.batches.values())
    stderr = cancelled.stderr.decode()
    assert cancelled.returncode == 2, stderr
    assert stderr == (
        "batchrun: error: the API key in OPENAI_API_KEY holds the character U+000A, which an"
        " HTTP header cannot carry: set it to the key alone\n"
    )


async def test_cancel_with_the_provider_unreachable_says_so_in_one_line(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=60)) as server:
        _, out = await stopped_with_batches_running(tmp_path, server)
    # The server is gone: nothing answers at the recorded base URL.
    cancelled = await run_cli([sys.executable, "-m", "batchrun", "cancel", str(out)])
    stderr = cancelled.stderr.decode()
    assert cancelled.returncode == 3, stderr
    assert stderr.startswith("batchrun: error: the provider could not be asked to cancel")
    assert stderr.endswith("The batches may still be running: run batchrun cancel again\n")
    assert "Traceback" not in stderr


async def test_a_kill_mid_write_resumes_to_the_same_output_and_counts(tmp_path: Path) -> None:
    # Every batch is collected, then the ordered output is torn at row 7: the
    # rerun counts the 6 written rows from the output and the rest from the
    # results files, and writes what an uninterrupted run writes.
    async with MockServer(batch_faults=BatchFaults(seconds=0.2)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        summary = tmp_path / "summary.json"
        crashed = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT="output_torn:7")
        assert crashed.returncode == -signal.SIGKILL
        assert not out.exists()
        done = await run_cli(command(source, out, server, "--summary", str(summary)))
        assert done.returncode == 0, done.stderr.decode()
        assert server.batches.created == 3
        assert server.stats.batch_rows == 10  # nothing paid twice
        clean = tmp_path / "clean.jsonl"
        again = await run_cli(command(source, clean, server))
        assert again.returncode == 0, again.stderr.decode()
    assert out.read_bytes() == clean.read_bytes()
    counts = orjson.loads(summary.read_bytes())
    bodies = [row["response"]["body"] for row in read_jsonl(out)]
    assert (counts["rows"], counts["ok"], counts["failed"], counts["skipped"]) == (10, 10, 0, 6)
    assert counts["extra"]["answered in batches"] == 4
    assert counts["tokens_in"] == sum(body["usage"]["prompt_tokens"] for body in bodies)
    assert counts["tokens_out"] == sum(body["usage"]["completion_tokens"] for body in bodies)


async def test_cancel_says_which_batches_had_ended_and_when_none_ran() -> None:
    from batchrun.cli import _cancel_note

    assert _cancel_note([]) == "no batch of this output is running: nothing to cancel"
    note = _cancel_note([("b1", "cancelling"), ("b2", "completed"), ("b3", "expired")])
    assert note.startswith("asked the provider to cancel 1 batch (2 had ended already); ")
    note = _cancel_note([("b1", "cancelling"), ("b2", "cancelling")])
    assert note.startswith("asked the provider to cancel 2 batches; ")
    note = _cancel_note([("b1", "completed"), ("b2", "failed")])
    assert note.startswith("all 2 batches had ended already: nothing to cancel; ")


async def test_a_batch_seen_records_its_status_and_integer_counts() -> None:
    part = Part(1, "/v1/chat/completions", "m", rows=10, bytes=100, status="submitted")
    part.seen({"status": "in_progress", "request_counts": {"total": 10, "completed": 3}})
    assert (part.batch_status, part.counts) == ("in_progress", {"total": 10, "completed": 3})
    # A cancel's answer for a batch that had completed meanwhile: its counts are news.
    part.seen({"status": "completed", "request_counts": {"total": 10, "completed": 10, "x": True}})
    assert (part.batch_status, part.counts) == ("completed", {"total": 10, "completed": 10})
    part.seen({"status": "cancelled"})  # no counts given: the last ones stay
    assert (part.batch_status, part.counts) == ("cancelled", {"total": 10, "completed": 10})
    part.seen({"status": "failed", "request_counts": {"total": 10, "completed": -3}})
    assert part.counts == {"total": 10}  # a count below zero is none (status shows no -3)


async def test_a_batch_created_but_unrecorded_is_cancelled_before_a_restart(
    tmp_path: Path,
) -> None:
    # Killed between creating a batch and recording its id: the batch runs on,
    # paid. --restart must not pay for its rows again beside it, and cancel
    # must find it (as a resume does) instead of reporting nothing to cancel.
    async with MockServer(batch_faults=BatchFaults(seconds=60)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        crashed = await run_cli(
            command(source, out, server), BATCHRUN_CRASH_AT="after_batch_create:1"
        )
        assert crashed.returncode == -signal.SIGKILL
        assert server.batches.created >= 1  # on the provider, unrecorded
        online = [a for a in command(source, out, server) if a not in ("--mode", "batch")]
        refused = await run_cli([*online, "--restart"])
        assert refused.returncode == 2, refused.stderr.decode()
        assert b"batchrun cancel OUT" in refused.stderr
        assert server.stats.requests == 0
        cancelled = await run_cli([sys.executable, "-m", "batchrun", "cancel", str(out)])
        assert cancelled.returncode == 0, cancelled.stderr.decode()
        assert all(b.cancelled is not None for b in server.batches.batches.values())
        server.batches.faults.seconds = 0.2  # the cancels end now
        again = await run_cli([sys.executable, "-m", "batchrun", "cancel", str(out)])
        assert again.returncode == 0, again.stderr.decode()
        restarted = await run_cli([*online, "--restart"])
        assert restarted.returncode == 0, restarted.stderr.decode()
    assert len(read_jsonl(out)) == 10


@pytest.mark.parametrize("point", ["batch:8", "download"])
async def test_a_full_disk_stops_the_batch_run_with_74_and_it_resumes(
    tmp_path: Path, point: str
) -> None:
    # The batch record's files and the downloaded results are state files
    # too: one line naming the file, exit 74, no traceback, no provider blamed.
    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as server:
        source, out = source_rows(tmp_path), tmp_path / "out.jsonl"
        full = await run_cli(command(source, out, server), BATCHRUN_DISK_FAULT=point)
        stderr = full.stderr.decode()
        assert full.returncode == 74, stderr
        assert "Traceback" not in stderr
        assert "No space left on device (ENOSPC). Free some space" in stderr
        done = await run_cli(command(source, out, server))
        assert done.returncode == 0, done.stderr.decode()
        assert sum(count - 1 for count in server.stats.by_digest.values()) == 0
    assert [row["line"] for row in read_jsonl(out)] == list(range(1, 11))
