"""Operations: several hosts, shards in separate processes and their merge."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from batchrun.hosts import FAILURES_TO_REST, HostPool
from batchrun.merge import merge
from batchrun.mock.server import MockServer
from batchrun.runner import run_async
from tests.conftest import chat, make_config, read_jsonl, run_shards, write_jsonl
from tests.fakes import FakeClock

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.asyncio
async def test_two_hosts_share_the_load_and_a_failing_one_rests(
    tmp_path: Path, fake_time: FakeClock
) -> None:
    async with MockServer() as steady, MockServer(fail_rate=1.0) as flaky:
        rows = [chat(f"row {i} mock:delay=0.01") for i in range(300)]
        config = make_config(
            tmp_path,
            rows,
            steady,
            base_url=[steady.base_url, flaky.base_url],
            max_async_requests=8,
            adaptive_concurrency=False,
        )

        async def recover_later() -> None:
            await anyio.sleep(0.3)
            flaky.fail_rate = 0.0

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(recover_later)
            summary = await run_async(config, clock=fake_time.as_clock())

    assert summary.exit_code == 0
    assert all(r["error"] is None for r in read_jsonl(config.out))
    hosts = summary.extra["hosts"]
    assert isinstance(hosts, dict)
    assert "rested" in hosts[flaky.base_url]
    assert "rested 0x" not in hosts[flaky.base_url]
    assert steady.stats.statuses[200] > flaky.stats.statuses[200]
    assert steady.stats.max_in_flight <= 8


def test_host_pool_prefers_the_least_busy_and_rests_a_failing_host() -> None:
    now = [0.0]
    pool = HostPool(("http://a", "http://b"), clock=lambda: now[0])
    first, second = pool.pick(), pool.pick()
    assert {first.base_url, second.base_url} == {"http://a", "http://b"}
    pool.finished(second, host_failed=False)
    assert pool.pick() is second  # now the less busy one
    b = pool.hosts[1]
    for _ in range(FAILURES_TO_REST):
        b.in_flight += 1
        pool.finished(b, host_failed=True)
    assert b.rests == 1
    assert all(pool.pick() is pool.hosts[0] for _ in range(5))  # b rests
    now[0] += 60
    assert pool.pick() is b  # rested: back in, and idle


def cli(*args: str | Path, **env: str) -> list[str]:
    return [sys.executable, "-m", "batchrun", *map(str, args)]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sharded_runs_in_separate_processes_merge_to_a_single_runs_output(
    tmp_path: Path, server: MockServer
) -> None:
    rng = random.Random(5)
    rows = [chat(f"row {i} mock:delay={rng.uniform(0, 0.02):.3f}") for i in range(203)]
    rows[17] = chat("row 17 mock:fail=400")
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    common = ["--provider", "openai", "--base-url", server.base_url, "--no-progress"]

    async def run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
        with anyio.fail_after(60):
            return await anyio.run_process(cli(*args), env=env, cwd=ROOT, check=False)

    shard_outs = [tmp_path / f"part-{i}.jsonl" for i in range(3)]
    async with anyio.create_task_group() as tasks:
        for i, part in enumerate(shard_outs):
            tasks.start_soon(run, "run", source, "--out", part, "--shard", f"{i}/3", *common)
    single = await run("run", source, "--out", tmp_path / "single.jsonl", *common)
    merged = await run("merge", *shard_outs, "--out", tmp_path / "merged.jsonl")

    assert single.returncode == 1  # row 17 failed, in both
    assert merged.returncode == 1, merged.stderr.decode()
    assert [len(read_jsonl(p)) for p in shard_outs] == [68, 68, 67]
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()


@pytest.mark.asyncio
async def test_merge_refuses_missing_unfinished_and_foreign_shards(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrun.errors import UsageError

    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(10)])
    parts = await run_shards(tmp_path, server, source, 2)
    other = write_jsonl(tmp_path / "other.jsonl", [chat(f"x{i}") for i in range(10)])
    foreign = make_config(tmp_path, [], server, input=other, out=tmp_path / "f1.jsonl", shard="1/2")
    await run_async(foreign, clock=FakeClock().as_clock())
    monkeypatch.setenv("OPENAI_API_KEY", "bad-key")
    unfinished = make_config(
        tmp_path,
        [],
        server,
        input=source,
        provider="openai",
        out=tmp_path / "u1.jsonl",
        shard="1/2",
    )
    await run_async(unfinished, clock=FakeClock().as_clock())  # aborts: not finished

    with pytest.raises(UsageError, match="shard 1/2 missing"):
        merge([parts[0]], tmp_path / "m.jsonl")
    with pytest.raises(UsageError, match="different input"):
        merge([parts[0], foreign.out], tmp_path / "m.jsonl")
    with pytest.raises(UsageError, match="has not finished"):
        merge([parts[0], unfinished.out], tmp_path / "m.jsonl")
    with pytest.raises(UsageError, match="not a batchrun output"):
        merge([source], tmp_path / "m.jsonl")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    whole = make_config(tmp_path, [], server, input=source, out=tmp_path / "whole.jsonl")
    await run_async(whole, clock=FakeClock().as_clock())
    with pytest.raises(UsageError, match="not a shard"):
        merge([parts[0], whole.out], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
    report = merge(parts, tmp_path / "m.jsonl")
    assert report.rows == 10
    assert [r["line"] for r in read_jsonl(tmp_path / "m.jsonl")] == list(range(1, 11))


@pytest.mark.asyncio
async def test_a_shard_resumes_on_its_own(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [chat(f"r{i}") for i in range(40)]
    rows[21] = chat("r21 mock:fail=401")  # row 22: shard 1/2's 11th row aborts the first run
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config = make_config(
        tmp_path, [], server, input=source, provider="openai", shard="1/2", max_async_requests=1
    )
    first = await run_async(config, clock=FakeClock().as_clock())
    assert first.exit_code == 3
    sent = server.stats.requests
    server.stats.reset()
    second = await run_async(config, clock=FakeClock().as_clock())

    assert second.exit_code == 3  # the same row still answers 401
    assert server.stats.requests == 1  # it resumed at that row, not from the start
    assert sent >= 10
