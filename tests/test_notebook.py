"""batchrun.run() where an event loop already runs (a notebook cell), and
Ctrl-C there: a real process interrupted with SIGINT, then resumed."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
import pytest

from batchrun import build_config, read_results, run
from batchrun.mock.server import MockServer
from tests.conftest import chat, read_jsonl, write_jsonl
from tests.test_cli import ROOT, cli_env
from tests.test_resume import wait_for

pytestmark = pytest.mark.timeout(60)

# A notebook in miniature: a running loop whose cell calls the blocking run().
_CELL = """
import asyncio, sys
from batchrun import build_config, run

async def cell():
    summary = run(build_config({
        "input": sys.argv[1], "out": sys.argv[2], "provider": "openai",
        "base_url": sys.argv[3], "max_async_requests": 2, "progress": False,
    }))
    print("exit", summary.exit_code, flush=True)

asyncio.run(cell())
"""


@pytest.mark.asyncio
async def test_run_works_inside_a_running_loop(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"row {i}") for i in range(20)])
    config = build_config(
        {"input": source, "out": tmp_path / "out.jsonl", "provider": "mock", "progress": False}
    )

    summary = run(config)  # blocks this loop's thread; the job has a loop of its own

    assert summary.exit_code == 0
    assert summary.ok == 20
    assert [row["text"] for row in read_results(config.out)] == [
        f"echo: row {i}" for i in range(20)
    ]


async def _cell(tmp_path: Path, server: MockServer, *, interrupts: int) -> tuple[int, str, str]:
    """Run the cell in its own process; send SIGINT ``interrupts`` times once
    requests arrive. Its exit status, stdout and stderr."""
    source = tmp_path / "in.jsonl"
    args = [sys.executable, "-c", _CELL, source, tmp_path / "out.jsonl", server.base_url]
    env = cli_env(OPENAI_API_KEY="sk-test")
    baseline = server.stats.requests
    async with await anyio.open_process(args, env=env, cwd=ROOT) as process:
        with anyio.fail_after(30):
            if interrupts:
                await wait_for(lambda: server.stats.requests >= baseline + 2)
            for _ in range(interrupts):
                process.send_signal(signal.SIGINT)
                await anyio.sleep(0.1)
            assert process.stdout is not None
            assert process.stderr is not None
            out = b"".join([chunk async for chunk in process.stdout]).decode()
            err = b"".join([chunk async for chunk in process.stderr]).decode()
            return await process.wait(), out, err


@pytest.mark.asyncio
async def test_ctrl_c_stops_the_run_resumably_and_a_second_cancels(
    tmp_path: Path, server: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat(f"row {i} mock:delay=0.3") for i in range(12)])

    first = await _cell(tmp_path, server, interrupts=1)
    sent_before_resume = server.stats.requests
    resumed = await _cell(tmp_path, server, interrupts=0)

    assert first[:2] == (0, "exit 75\n"), first[2]
    assert resumed[:2] == (0, "exit 0\n"), resumed[2]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 12
    # In-flight rows finished within the grace: nothing was sent twice.
    assert server.stats.requests == 12
    assert sent_before_resume < 12

    # In-flight rows now take 2 s: the second Ctrl-C comes within the grace.
    write_jsonl(tmp_path / "in.jsonl", [chat(f"again {i} mock:delay=2") for i in range(12)])
    (tmp_path / "out.jsonl").unlink()
    twice = await _cell(tmp_path, server, interrupts=2)

    assert twice[0] != 0
    assert "KeyboardInterrupt" in twice[2]
    # Cancelled, not killed: the lock is free and the run resumes.
    again = await _cell(tmp_path, server, interrupts=0)
    assert again[:2] == (0, "exit 0\n"), again[2]
