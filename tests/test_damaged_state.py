"""A damaged state directory, or a mock server setting out of range: one line
naming what is wrong and exit code 2, never a traceback.

A state file is valid JSON of the wrong shape when edited by hand or written
by another program; its readers check every field where they read it, so the
damage is named there and not met later, deep in a report, as a crash."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from batchrun.batchmode.record import BatchRecord
from batchrun.config import RunConfig
from batchrun.errors import CorruptStateError
from batchrun.mock.server import MockServer
from batchrun.state import StateDir
from tests.conftest import chat, make_config, write_jsonl
from tests.test_cli import abatchrun, batchrun
from tests.test_resume import command, run_cli, wait_for

# The asyncio mark goes on each async test: on a plain one it is a warning,
# which this suite makes an error.
pytestmark = pytest.mark.timeout(60)

_READERS: dict[str, Callable[[StateDir], object]] = {
    "finished.json": StateDir.read_finished,
    "checkpoint.json": StateDir.read_checkpoint,
    "meta.json": StateDir.read_meta,
}

# (file, its whole text, the field named): each valid JSON of the wrong shape.
_WRONG_SHAPES = [
    ("finished.json", b'{"rows": "x"}', "rows"),
    ("finished.json", b'{"failed_by_code": {"timeout": "2"}}', "failed_by_code"),
    ("finished.json", b'{"exit_code": true}', "exit_code"),
    ("finished.json", b'{"finished_at": 5}', "finished_at"),
    ("finished.json", b'{"latency_p95_ms": "9 ms"}', "latency_p95_ms"),
    ("finished.json", b'{"extra": [1]}', "extra"),
    ("checkpoint.json", b'{"rows": -1}', "rows"),
    ("checkpoint.json", b'{"input_offset": 1.5}', "input_offset"),
    ("checkpoint.json", b'{"cost": "0"}', "cost"),
    ("meta.json", b'{"provider": "nope"}', "provider"),
    ("meta.json", b'{"shard": "2/2"}', "shard"),
    ("meta.json", b'{"input_size": "92"}', "input_size"),
    ("meta.json", b'{"params": []}', "params"),
]


@pytest.mark.parametrize(("name", "text", "key"), _WRONG_SHAPES)
def test_a_state_file_of_the_wrong_shape_is_damaged(
    tmp_path: Path, name: str, text: bytes, key: str
) -> None:
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()
    (state.root / name).write_bytes(text)

    with pytest.raises(CorruptStateError) as caught:
        _READERS[name](state)

    assert str(caught.value) == (
        f"{state.root / name} is damaged (a bad {key!r}); run again with --restart"
    )


def test_what_older_versions_left_out_or_null_still_reads(tmp_path: Path) -> None:
    # Counts.from_dict and Summary.from_dict take a null tally for none.
    state = StateDir(tmp_path / "out.jsonl")
    state.root.mkdir()
    state.finished_path.write_bytes(b'{"rows": 2, "ok": 2, "failed_by_code": null}')
    state.checkpoint_path.write_bytes(b'{"rows": 1, "failed_by_code": null, "cost": 0}')
    state.meta_path.write_bytes(b'{"input": "in.jsonl", "shard": null}')

    finished = state.read_finished()
    assert finished is not None
    assert (finished.summary.rows, finished.at) == (2, None)
    assert state.read_checkpoint().rows == 1
    assert state.read_meta() == {"input": "in.jsonl", "shard": None}


def test_a_directory_in_place_of_a_state_file_is_damaged_and_restart_mends_it(
    tmp_path: Path,
) -> None:
    state = StateDir(tmp_path / "out.jsonl")
    (state.meta_path / "x").mkdir(parents=True)

    with pytest.raises(CorruptStateError, match=r"meta\.json is damaged \(a directory\)"):
        state.read_meta()
    state.clear()  # what --restart does first: it must not fail on the directory
    assert state.read_meta() is None


def _error_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a refused command prints; asserts exit 2 and no traceback."""
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert stderr.startswith("batchrun: error: "), stderr
    assert stderr.count("\n") == 1, stderr
    return stderr.removeprefix("batchrun: error: ").strip()


@pytest.mark.asyncio
async def test_a_damaged_finished_json_is_one_line_for_run_and_status(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b")])
    out = tmp_path / "out.jsonl"
    assert (await run_cli(command(source, out, server))).returncode == 0
    sent = server.stats.requests
    finished = StateDir(out).finished_path
    finished.write_bytes(b'{"rows": "x"}')  # valid JSON, the wrong type

    rerun = _error_line(await run_cli(command(source, out, server)))
    status = _error_line(await abatchrun("status", out))

    expected = f"{finished} is damaged (a bad 'rows'); run again with --restart"
    assert rerun == status == expected
    assert server.stats.requests == sent


@pytest.mark.asyncio
async def test_a_directory_in_place_of_the_lock_is_one_line_naming_it(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a")])
    out = tmp_path / "out.jsonl"
    lock = StateDir(out).lock_path
    lock.mkdir(parents=True)

    line = _error_line(await run_cli(command(source, out, server)))

    assert line.startswith(f"{lock} is a directory, not batchrun's lock file")
    assert server.stats.requests == 0
    assert not out.exists()


# NaN passes the command line's ranges (no comparison with it is true), and
# infinite seconds would leave every answer or batch waiting for ever.
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--fail-rate", "nan", "--fail-rate must be a number in [0, 1], got nan"),
        ("--latency", "nan", "--latency must be a finite number of seconds >= 0, got nan"),
        ("--latency", "inf", "--latency must be a finite number of seconds >= 0, got inf"),
        ("--batch-seconds", "nan", "--batch-seconds must be a finite number of seconds"),
        ("--batch-seconds", "1e400", "--batch-seconds must be a finite number of seconds"),
    ],
)
def test_a_mock_server_setting_out_of_range_is_a_usage_error(
    flag: str, value: str, message: str
) -> None:
    done = batchrun("mock-server", "--port", "0", flag, value)

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"batchrun: error: {message}")
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rows", "x"),
        ("status", 3),
        ("status", "Collected"),
        ("status", ["collected"]),
        ("counts", {"total": "9"}),
        ("result_files", [1]),
    ],
)
@pytest.mark.asyncio
async def test_a_batch_record_of_the_wrong_shape_is_one_line_for_status(
    tmp_path: Path, field: str, value: object
) -> None:
    config, record = await _refused_batch_run(tmp_path)
    state = record.load()
    assert state is not None
    setattr(state.parts[0], field, value)
    record.save(state)

    line = _error_line(await abatchrun("status", config.out))

    # No command drops it: the batches it names may run, paid. The line says what to do.
    assert line.startswith(f"{record.path} is damaged (a field of the wrong type); batches")
    assert f"then delete the directory {record.root} to go on" in line


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_batch_record_whose_key_variable_is_no_text_is_one_line_for_cancel(
    tmp_path: Path,
) -> None:
    # cancel reads the key from the variable the record names: a number
    # there is damage like any field of the wrong type, not a traceback.
    def edit(data: dict[str, Any]) -> None:
        data["api_key_env"] = 5

    record, line = await _cancel_after(tmp_path, edit)

    assert line.startswith(f"{record.path} is damaged (a field of the wrong type); batches")


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        ("record", "provider", "nope"),  # cancel would look up the dialect: KeyError
        ("part", "batch_id", None),  # live without a batch id: run would poll it: AssertionError
        ("part", "batch_id", ""),
    ],
)
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_batch_record_naming_what_batchrun_never_writes_is_one_line_for_cancel(
    tmp_path: Path, where: str, field: str, value: object
) -> None:

    def edit(data: dict[str, Any]) -> None:
        data["parts"][0]["status"] = "submitted"  # live: cancel and run act on it
        data["parts"][0]["batch_id"] = "batch_1"
        (data if where == "record" else data["parts"][0])[field] = value

    record, line = await _cancel_after(tmp_path, edit)

    assert line.startswith(f"{record.path} is damaged (a field of the wrong type); batches")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_file_in_place_of_the_batch_directory_is_a_damaged_record(
    tmp_path: Path,
) -> None:
    from batchrun.runner import run_async

    # Its record is lost as a damaged state.json's is: the line says what to
    # do. It said "run again with --restart", which failed the same way.
    config, record = await _refused_batch_run(tmp_path)
    shutil.rmtree(record.root)
    record.root.write_bytes(b"x")

    line = _error_line(await abatchrun("cancel", config.out))

    assert line.startswith(f"{record.path} is damaged; batches")
    with pytest.raises(CorruptStateError, match="is damaged; batches"):
        await run_async(dataclasses.replace(config, restart=True))


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_batch_part_in_no_known_state_is_refused_by_run(tmp_path: Path) -> None:
    from batchrun.runner import run_async

    # A part the run would neither submit, poll nor count as settled: it
    # would wait on it for ever.
    config, record = await _refused_batch_run(tmp_path)
    record.path.write_bytes(record.path.read_bytes().replace(b'"refused"', b'"Refused"'))
    with pytest.raises(CorruptStateError, match="a field of the wrong type"):
        await run_async(config)  # refused before any call: no server needed


# (part file, its damaged content; None: the file is gone).
_PART_FILE_DAMAGE = [
    *(("ids", text) for text in (b'[[1,"a"],', b'[[1,"a"],[2]]', b'[["1","a"]]', b'{"1":"a"}')),
    ("ids", b"[[1,2]]"),
    ("ids", None),
    ("keys", None),
    ("keys", b"abc"),  # short: an answer would be filed under a key no request has
]


@pytest.mark.parametrize(("suffix", "damage"), _PART_FILE_DAMAGE)
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_damaged_batch_part_file_is_one_line_not_a_traceback(
    tmp_path: Path, suffix: str, damage: bytes | None
) -> None:
    from batchrun.batchmode.record import BatchRecord
    from batchrun.mock.batches import BatchFaults
    from batchrun.runner import run_async

    async with MockServer(batch_faults=BatchFaults(seconds=60)) as batch_server:
        config = make_config(
            tmp_path, [chat("a", model="m")], batch_server, mode="batch", poll_interval=0.05
        )
        record = BatchRecord(tmp_path / "out.jsonl.batchrun")

        def submitted() -> bool:
            return record.exists() and b'"submitted"' in record.path.read_bytes()

        async with anyio.create_task_group() as tasks:  # stopped as a signal would stop it
            tasks.start_soon(run_async, config)
            await wait_for(submitted)
            tasks.cancel_scope.cancel()
        batch_server.batches.faults.seconds = 0.05  # it ends: collecting reads the file
        path = record.file(1, suffix)
        if damage is None:
            path.unlink()
        else:
            path.write_bytes(damage)
        # As a damaged state.json: its batch may be done and paid, so the
        # line says what to do, not only what is wrong.
        with pytest.raises(
            CorruptStateError, match=rf"part-000001\.{suffix} is damaged.*; batches"
        ):
            await run_async(config)


@pytest.mark.parametrize("name", ["journal", "output.partial"])
@pytest.mark.asyncio
async def test_a_directory_in_place_of_the_journal_or_partial_output_is_one_line(
    tmp_path: Path, server: MockServer, name: str
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b")])
    out = tmp_path / "out.jsonl"
    assert (await run_cli(command(source, out, server))).returncode == 0
    state = StateDir(out)
    state.finished_path.unlink()  # as if stopped before the end
    _replace_with_a_directory(state.root / name)

    rerun = _error_line(await run_cli(command(source, out, server)))
    status = _error_line(await abatchrun("status", out))

    expected = f"Is a directory: {state.root / name} (the output's state directory is damaged"
    assert rerun.startswith(expected)
    assert status.startswith(expected)
    assert (await run_cli(command(source, out, server, "--restart"))).returncode == 0


def _replace_with_a_directory(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


async def _cancel_after(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None]
) -> tuple[BatchRecord, str]:
    """The record of a refused batch run, and the error line of ``batchrun
    cancel`` once ``edit`` changed the record's ``state.json``."""
    config, record = await _refused_batch_run(tmp_path)
    data = orjson.loads(record.path.read_bytes())
    edit(data)
    record.path.write_bytes(orjson.dumps(data))
    return record, _error_line(await abatchrun("cancel", config.out))


async def _refused_batch_run(tmp_path: Path) -> tuple[RunConfig, BatchRecord]:
    """A batch run stopped (exit 3) with its record kept: its one file was
    refused; its config and batch record."""
    from batchrun.batchmode.record import BatchRecord
    from batchrun.mock.batches import BatchFaults
    from batchrun.runner import run_async

    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as batch_server:
        rows = [chat("mock:invalid_file", model="m")]
        config = make_config(tmp_path, rows, batch_server, mode="batch", poll_interval=0.05)
        assert (await run_async(config)).exit_code == 3
    return config, BatchRecord(tmp_path / "out.jsonl.batchrun")
