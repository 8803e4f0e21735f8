"""--shared-limits: one account's rpm, tpm and pauses shared through Redis.

Unit tests run the budget on fake time against a fake store; the rest start a
real ``redis-server`` (free port, ``--save ''``) and real batchrun processes
against the real mock provider.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

from batchrun.errors import UsageError
from batchrun.jobfile import build_config, load_job_file
from batchrun.layout import state_dir
from batchrun.mock.server import MockServer
from batchrun.sharedlimits import (
    LEASE_REQUESTS,
    RECONNECT_S,
    Grant,
    LeaseAsk,
    RedisUnavailable,
    SharedBudget,
    default_limits_key,
    open_lease_store,
    redact_url,
)
from tests.conftest import chat, read_jsonl, write_jsonl
from tests.fakes import FakeClock
from tests.redis_server import RedisServer
from tests.test_resume import wait_for

ROOT = Path(__file__).resolve().parent.parent


# --- the budget on fake time ----------------------------------------------------------


class FakeStore:
    """Grants every lease at once (or as scripted); ``down`` makes calls fail."""

    url = "redis://127.0.0.1:1/0"

    def __init__(self, processes: int = 1) -> None:
        self.asks: list[LeaseAsk] = []
        self.down = False
        self.processes = processes
        self.next: list[Grant] = []
        self.called = anyio.Event()

    async def call(self, ask: LeaseAsk) -> Grant:
        if self.down:
            raise RedisUnavailable("Connection refused")
        self.asks.append(ask)
        self.called.set()
        return self.next.pop(0) if self.next else Grant("ok", 0.0, self.processes)


def shared(store: FakeStore, time: FakeClock, **limits: float) -> SharedBudget:
    return SharedBudget(
        store, rpm=limits.get("rpm"), tpm=limits.get("tpm"), clock=time, sleep=time.sleep
    )


@pytest.mark.asyncio
async def test_a_lease_serves_many_requests_at_the_steady_rate() -> None:
    time, store = FakeClock(), FakeStore()
    budget = shared(store, time, rpm=2160)  # 36/s
    stamps = []
    for _ in range(360):
        await budget.acquire(0)
        stamps.append(time.now)
    assert len(store.asks) / 360 <= 0.1
    assert store.asks[0].requests == pytest.approx(LEASE_REQUESTS)
    assert stamps[-1] == pytest.approx(10.0)  # 360 at 36/s, each lease starting empty
    assert max(sum(1 for t in stamps if s <= t < s + 1) for s in stamps) <= 37


@pytest.mark.asyncio
async def test_a_lease_starts_when_the_script_says() -> None:
    time, store = FakeClock(), FakeStore()
    store.next = [Grant("ok", 2.0, 3)]
    budget = shared(store, time, rpm=600)  # 10/s
    await budget.acquire(0)
    assert time.now == pytest.approx(2.1)  # the lease starts in 2 s, paced from empty
    assert budget.processes == 3


@pytest.mark.asyncio
async def test_a_shared_pause_is_slept_through_then_the_lease_asked_again() -> None:
    time, store = FakeClock(), FakeStore()
    store.next = [Grant("pause", 3.0, 2), Grant("wait", 1.0, 2)]
    budget = shared(store, time, rpm=600)
    await budget.acquire(0)
    assert time.now == pytest.approx(4.1)
    assert len(store.asks) == 3
    assert budget.report()["shared pauses seen"] == 1


@pytest.mark.asyncio
async def test_tokens_debt_is_sent_in_a_batch_and_refunds_stay_local() -> None:
    time, store = FakeClock(), FakeStore()
    budget = shared(store, time, tpm=60_000)  # 1000 tokens/s: a lease of 250
    await budget.acquire(100)
    budget.settle(100, 150)
    budget.settle(100, 130)  # 80 of debt in all, not yet sent
    await budget.acquire(100)
    assert len(store.asks) == 1
    budget.settle(100, 40)  # a refund of 60 goes back to the lease
    await budget.acquire(100)  # 250 - 200 + 60 = 110 left: it fits
    assert len(store.asks) == 1
    await budget.acquire(100)  # 10 left: too few, a new lease
    assert len(store.asks) == 2
    assert store.asks[1].debt == 80
    assert store.asks[1].tokens == pytest.approx(250)


@pytest.mark.asyncio
async def test_a_refund_paces_the_next_requests_sooner() -> None:
    # Estimates of 500 tokens, answers using 100: at 1,000 tokens a second
    # the requests go at the pace of what they use, not of their estimates.
    time, store = FakeClock(), FakeStore()
    budget = shared(store, time, tpm=60_000)
    for _ in range(50):
        await budget.acquire(500)
        budget.settle(500, 100)
    assert time.now == pytest.approx(5.0)  # 50 x 100 tokens used; 24.6 s without the refunds


@pytest.mark.asyncio
async def test_an_oversize_request_asks_a_lease_big_enough() -> None:
    time, store = FakeClock(), FakeStore()
    budget = shared(store, time, tpm=6000)  # 100 tokens/s: a lease of 25
    await budget.acquire(500)
    assert store.asks[0].tokens == 500


@pytest.mark.asyncio
async def test_a_lost_redis_falls_back_to_a_share_then_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time, store = FakeClock(), FakeStore(processes=3)
    budget = shared(store, time, rpm=1800)  # 30/s; 10/s each of 3
    await budget.acquire(0)
    for _ in range(11):
        await budget.acquire(0)  # spend the first lease
    store.down = True
    lost_at = time.now
    stamps = []
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        for _ in range(5):
            await budget.acquire(0)
            stamps.append(time.now - lost_at)
        assert "keeping to 1/3 of the limits" in caplog.text
        # 10/s, starting empty: no burst at the switch.
        assert stamps == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
        store.down = False
        time.advance(1.0)
        await budget.acquire(0)
        assert "is back" in caplog.text
    assert budget.report()["redis outages"] == 1


@pytest.mark.asyncio
async def test_back_from_an_outage_a_process_keeps_its_share_for_a_reconnect_period() -> None:
    # Redis back (restarted without its data) grants this process the whole
    # rate, while the others may send at their shares until their next try:
    # the account would see up to 1.5 times its rate for a second.
    time, store = FakeClock(), FakeStore(processes=2)
    budget = shared(store, time, rpm=1200)  # 20/s; 10/s each of 2
    await budget.acquire(0)
    store.down = True
    for _ in range(LEASE_REQUESTS + 3):  # the lease spent, then the share
        await budget.acquire(0)
    assert budget.report()["redis outages"] == 1
    store.down = False
    time.advance(RECONNECT_S)  # the next acquire tries Redis again
    back_at = time.now
    stamps = []
    for _ in range(30):
        await budget.acquire(0)
        stamps.append(time.now - back_at)
    within = [t for t in stamps if t < RECONNECT_S]
    assert len(within) <= 10 + 1  # its share, 10/s, for the reconnect period
    after = [b - a for a, b in itertools.pairwise(stamps) if a >= RECONNECT_S + 0.1]
    assert after
    assert all(gap == pytest.approx(0.05) for gap in after)  # then the full 20/s


@pytest.mark.asyncio
async def test_hold_shares_the_pause_at_once() -> None:
    time, store = FakeClock(), FakeStore()
    budget = shared(store, time, rpm=600)
    async with budget.running():
        budget.hold(time.now + 5.0)
        with anyio.fail_after(5):
            await store.called.wait()
    assert store.asks[0].pause == pytest.approx(5.0)
    assert store.asks[0].requests == 0


def test_urls_and_keys() -> None:
    assert redact_url("redis://:secret@h:6380/1") == "redis://h:6380/1"
    assert redact_url("rediss://user:secret@h/0") == "rediss://user@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    key = default_limits_key("openai", "https://api.example.test/v1", "gpt-x")
    assert key == "openai:api.example.test:gpt-x"


def test_settings_and_job_file(tmp_path: Path) -> None:
    base = {"input": tmp_path / "in", "out": tmp_path / "out"}
    with pytest.raises(UsageError, match="redis:// or rediss://"):
        build_config({**base, "rpm": 60, "shared_limits": "http://x"})
    with pytest.raises(UsageError, match="set at least one"):
        build_config({**base, "shared_limits": "redis://127.0.0.1:1/0"})
    with pytest.raises(UsageError, match="--limits-key needs --shared-limits"):
        build_config({**base, "limits_key": "k"})
    # Redis's parser would read these as another server or database, or fail
    # with a traceback at the first call.
    for url, why in (
        ("redis://", "name the host"),
        ("redis://:pw@/0", "name the host"),
        ("redis://h:notaport/0", "the port must be a number from 1 to 65535"),
        ("redis://h:99999/0", "the port must be a number from 1 to 65535"),
        ("redis://:pw@h:0/0", "the port must be a number from 1 to 65535"),
        ("redis://h:1/abc", "the database must be a number"),
    ):
        with pytest.raises(UsageError, match=why) as caught:
            build_config({**base, "rpm": 60, "shared_limits": url})
        assert "pw" not in str(caught.value)
    assert redact_url("redis://u:pw@h:bad/0") == "redis://u@h:bad/0"
    job = tmp_path / "job.toml"
    job.write_text('[limits]\nrpm = 60\nshared_limits = "rediss://h:1/0"\nlimits_key = "acct"\n')
    limits = build_config({**base, **load_job_file(job)}).limits
    assert (limits.shared_limits, limits.limits_key) == ("rediss://h:1/0", "acct")


# --- a real Redis and real processes ----------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def limited() -> AsyncIterator[MockServer]:
    """A provider counting requests per second (its limit is far above the tests')."""
    async with MockServer(latency=0.01, rate_limit=10_000) as mock:
        yield mock


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BATCHRUN_")}
    return {**clean, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "k", **extra}


def shard_cmd(inp: Path, out: Path, server: MockServer, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "batchrun", "run", str(inp), "--out", str(out),
        "--provider", "openai", "--base-url", server.base_url, "--model", "m",
        "--no-progress", "--summary", str(out.with_suffix(".json")), *extra,
    ]  # fmt: skip


async def run_all(
    cmds: list[list[str]], **extra_env: str
) -> list[subprocess.CompletedProcess[bytes]]:
    results: list[Any] = [None] * len(cmds)

    async def one(i: int) -> None:
        results[i] = await anyio.run_process(cmds[i], check=False, env=env(**extra_env))

    async with anyio.create_task_group() as tasks:
        for i in range(len(cmds)):
            tasks.start_soon(one, i)
    return results


def summary(out: Path) -> dict[str, Any]:
    import json

    return dict(json.loads(out.with_suffix(".json").read_text()))


async def three_shards(
    tmp_path: Path, server: MockServer, rows: list[dict[str, Any]], *extra: str
) -> tuple[float, list[subprocess.CompletedProcess[bytes]], list[Path]]:
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    outs = [tmp_path / f"part-{i}.jsonl" for i in range(3)]
    cmds = [shard_cmd(inp, out, server, "--shard", f"{i}/3", *extra) for i, out in enumerate(outs)]
    started = time.monotonic()
    done = await run_all(cmds)
    return time.monotonic() - started, done, outs


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_three_processes_share_one_rpm(tmp_path: Path, redis_server: RedisServer) -> None:
    async with MockServer(latency=0.01, rate_limit=33, sliding_window=True) as server:
        rows = [chat(f"row {i}") for i in range(180)]
        shared_flags = ("--rpm", "1800", "--shared-limits", redis_server.url)  # 30/s in all
        wall, done, outs = await three_shards(tmp_path, server, rows, *shared_flags)
        refused = server.stats.statuses[429]
    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr[-500:] for d in done]
    assert sum(len(read_jsonl(out)) for out in outs) == 180
    # Each alone at 30/s would take 2 s; sharing 30/s takes 6 s.
    assert wall >= 5.5
    assert refused <= 3  # the provider refuses past 33 in any second
    calls = sum(summary(out)["extra"]["redis calls"] for out in outs)
    assert calls / 180 <= 0.15  # a lease per ~12 requests, plus the start-up checks


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_three_processes_share_one_tpm(
    tmp_path: Path, redis_server: RedisServer, limited: MockServer
) -> None:
    text = " ".join(["w"] * 60)  # 60 tokens in (words), about 120 characters
    rows = [chat(f"{i} {text}", max_tokens=5) for i in range(90)]
    flags = ("--tpm", "60000", "--shared-limits", redis_server.url, "--limits-key", "tpm")
    wall, done, outs = await three_shards(tmp_path, limited, rows, *flags)
    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr[-500:] for d in done]
    used = sum(
        line["response"]["body"]["usage"]["total_tokens"]
        for out in outs
        for line in read_jsonl(out)
    )
    # 1000 tokens/s for the three together: the run takes about used/1000 s.
    assert used / wall <= 1000 * 1.2
    assert wall >= 0.75 * used / 1000


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_one_429_pauses_every_process(
    tmp_path: Path, redis_server: RedisServer, limited: MockServer
) -> None:
    rows = [chat(f"row {i}") for i in range(60)]
    rows[0] = chat("row 0 mock:fail=429x1 mock:retry_after=3")  # shard 0's first row
    flags = ("--rpm", "600", "--shared-limits", redis_server.url, "--max-attempts", "3")
    _, done, outs = await three_shards(tmp_path, limited, rows, *flags)
    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr[-500:] for d in done]
    # 60 rows at 10/s: the others still had rows when shard 0 was told to pause.
    for out in outs[1:]:
        assert summary(out)["extra"]["shared pauses seen"] >= 1
    # The three together send 10/s, but for a whole second of the pause at most
    # the leases already granted went out (a process learns of the pause at its
    # next lease call, within half a second).
    per_second = limited.stats.received_per_second
    interior = [per_second.get(s, 0) for s in range(min(per_second) + 1, max(per_second))]
    assert min(interior) <= 2, (dict(per_second), done[0].stderr.decode()[-600:])


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_redis_lost_mid_run_then_back(
    tmp_path: Path, redis_server: RedisServer, limited: MockServer
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat(f"row {i}") for i in range(200)])
    outs = [tmp_path / f"part-{i}.jsonl" for i in range(2)]
    flags = ("--rpm", "1200", "--shared-limits", redis_server.url)  # 20/s for the two
    cmds = [shard_cmd(inp, out, limited, "--shard", f"{i}/2", *flags) for i, out in enumerate(outs)]

    async def outage() -> None:
        # Cut Redis once both runs are sending (their journals have begun),
        # not at a fixed time: a busy machine takes seconds to start them.
        journals = [state_dir(out) / "journal" for out in outs]
        await wait_for(lambda: all(j.exists() and j.stat().st_size for j in journals), 60)
        await anyio.sleep(1.0)
        redis_server.stop()
        await anyio.sleep(2.5)
        redis_server.start()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outage)
        done = await run_all(cmds)
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-500:] for d in done]
    assert sum(len(read_jsonl(out)) for out in outs) == 200
    for d in done:
        stderr = d.stderr.decode()
        assert "lost Redis at redis://127.0.0.1" in stderr
        assert "keeping to 1/2 of the limits" in stderr
        assert "is back" in stderr
    # No burst at the loss or the return: never far above 20 in a second.
    per_second = limited.stats.received_per_second
    assert max(per_second.values()) <= 20 * 1.3, dict(per_second)


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_unreachable_redis_is_exit_2_before_any_request(
    tmp_path: Path, server: MockServer
) -> None:
    from tests.redis_server import free_port

    inp = write_jsonl(tmp_path / "in.jsonl", [chat("row")])
    url = f"redis://127.0.0.1:{free_port()}/0"
    cmd = shard_cmd(inp, tmp_path / "out.jsonl", server, "--rpm", "60", "--shared-limits", url)
    [done] = await run_all([cmd])
    assert done.returncode == 2
    assert f"cannot reach Redis at {url}" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
    assert server.stats.requests == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_bad_redis_option_is_exit_2_not_a_traceback(tmp_path: Path) -> None:
    from tests.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0?db=x"
    with pytest.raises(UsageError, match=r"--shared-limits .*db=x: Invalid value for 'db'"):
        async with open_lease_store(url, "k"):
            pass


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_batch_mode_checks_redis_before_any_batch(tmp_path: Path) -> None:
    from batchrun.mock.batches import BatchFaults
    from batchrun.runner import run_async
    from tests.conftest import make_config
    from tests.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as batches:
        config = make_config(
            tmp_path, [chat("row")], batches, mode="batch", poll_interval=0.05, rpm=60,
            shared_limits=url,
        )  # fmt: skip
        with pytest.raises(UsageError, match=f"cannot reach Redis at {url}"):
            await run_async(config)
        assert batches.batches.created == 0  # nothing uploaded, nothing paid
        assert not batches.batches.contents


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_wrong_password_is_exit_2_without_the_password(
    tmp_path: Path, server: MockServer
) -> None:
    redis = RedisServer(tmp_path, password="right-one").start()
    try:
        inp = write_jsonl(tmp_path / "in.jsonl", [chat("row")])
        url = f"redis://:wrong-one@127.0.0.1:{redis.port}/0"
        flags = ("--rpm", "60", "--shared-limits", url)
        [done] = await run_all([shard_cmd(inp, tmp_path / "out.jsonl", server, *flags)])
        stderr = done.stderr.decode()
        assert done.returncode == 2, stderr
        assert f"Redis at redis://127.0.0.1:{redis.port}/0 refused the password" in stderr
        assert "wrong-one" not in stderr
        assert server.stats.requests == 0
        # None given at all: the message says where one goes.
        flags = ("--rpm", "60", "--shared-limits", redis.url)
        [done] = await run_all([shard_cmd(inp, tmp_path / "out3.jsonl", server, *flags)])
        stderr = done.stderr.decode()
        assert done.returncode == 2, stderr
        assert f"Redis at {redis.url} needs a password: put it in the URL" in stderr
        # The password may come from the environment instead.
        flags = ("--rpm", "600", "--shared-limits", redis.url)
        cmd = shard_cmd(inp, tmp_path / "out2.jsonl", server, *flags)
        [done] = await run_all([cmd], BATCHRUN_REDIS_PASSWORD="right-one")
        assert done.returncode == 0, done.stderr.decode()
    finally:
        redis.stop()


@pytest.mark.asyncio
async def test_a_process_counts_while_it_waits_for_its_next_lease(
    redis_server: RedisServer,
) -> None:
    # At 3 requests a minute each lease is one request, 20 s long: a process
    # calls again only once its lease is used up (or its wait is over), far
    # past the process TTL, and must still count as sharing until then.
    import redis.asyncio as redis_asyncio

    slow = LeaseAsk(requests=1, request_s=20.0)
    async with (
        open_lease_store(redis_server.url, "slow") as first,
        open_lease_store(redis_server.url, "slow") as second,
    ):
        taken = await first.call(slow)
        waiting = await second.call(slow)
        assert (taken.verdict, waiting.verdict) == ("ok", "wait")
        assert waiting.seconds == pytest.approx(15.0, abs=0.1)  # 20 ahead, less the horizon
        assert waiting.processes == 2
    client = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        now = float((await client.time())[0])
        scores = dict(await client.zrange("batchrun:limits:slow:processes", 0, -1, withscores=True))
    finally:
        await client.aclose()
    due = sorted(score - now for score in scores.values())
    # Counted until 5 s (the process TTL) after each is due to call again:
    # the waiting one in 15 s, the other once its 20 s lease is used up.
    assert due == [pytest.approx(20.0, abs=1.1), pytest.approx(25.0, abs=1.1)]
    # A pause it shares (a call asking no lease) does not cut that short.
    async with open_lease_store(redis_server.url, "paused") as third:
        assert (await third.call(slow)).verdict == "ok"
        await third.call(LeaseAsk(pause=1.0))
    client = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        now = float((await client.time())[0])
        scores = await client.zrange("batchrun:limits:paused:processes", 0, -1, withscores=True)
    finally:
        await client.aclose()
    assert [score - now for _, score in scores] == [pytest.approx(25.0, abs=1.1)]


@pytest.mark.asyncio
async def test_store_against_a_real_redis(redis_server: RedisServer) -> None:
    async with open_lease_store(redis_server.url, "unit") as store:
        first = await store.call(LeaseAsk(requests=10, request_s=0.1))
        second = await store.call(LeaseAsk(requests=10, request_s=0.1))
        assert first.verdict == second.verdict == "ok"
        assert first.seconds == pytest.approx(0.0, abs=0.05)
        assert second.seconds == pytest.approx(1.0, abs=0.05)  # after the first lease
        assert (await store.call(LeaseAsk(tokens=100, token_s=1.0))).verdict == "ok"
        far = await store.call(LeaseAsk(tokens=1, token_s=1.0))
        assert far.verdict == "wait"  # would start 102 s ahead, past the 5 s horizon
        assert far.seconds == pytest.approx(97.0, abs=0.1)
    async with open_lease_store(redis_server.url, "other") as store:
        paused = await store.call(LeaseAsk(pause=2.0))
        assert paused.verdict == "ok"
        during = await store.call(LeaseAsk(requests=1, request_s=0.1))
        assert during.verdict == "pause"
        assert during.seconds == pytest.approx(2.0, abs=0.1)


@pytest.mark.asyncio
async def test_any_redis_failure_mid_run_is_an_outage_not_a_crash(
    redis_server: RedisServer,
) -> None:
    async with open_lease_store(redis_server.url, "clash") as store:
        cli = ["redis-cli", "-p", str(redis_server.port), "SET", "batchrun:limits:clash", "x"]
        await anyio.run_process(cli)  # the script's hash key now holds a string
        with pytest.raises(RedisUnavailable, match="WRONGTYPE"):
            await store.call(LeaseAsk(requests=1, request_s=0.1))


@pytest.mark.asyncio
async def test_a_missing_redis_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # import fails, as uninstalled
    with pytest.raises(UsageError, match=r"pip install 'batchrun\[redis\]'"):
        async with open_lease_store("redis://127.0.0.1:1/0", "k"):
            pass
