"""Paying once through the real command line: a SIGKILLed run whose input is
edited before the resume, two runs sharing one --cache at once, the cache
commands, and caches that cannot be used."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import orjson
import pytest

from batchrun.mock.server import MockServer
from batchrun.state import StateDir
from tests.conftest import chat, read_jsonl, write_jsonl
from tests.test_resume import command, run_cli

pytestmark = pytest.mark.asyncio


def rows(count: int, tag: str = "row") -> list[dict[str, object]]:
    return [chat(f"{tag} {i:04d}", custom_id=f"{tag}-{i}") for i in range(count)]


def answers(out: Path) -> list[str]:
    return [r["response"]["body"]["choices"][0]["message"]["content"] for r in read_jsonl(out)]


async def test_a_same_size_edit_in_the_finished_part_of_a_killed_run_gets_a_new_answer(
    tmp_path: Path, server: MockServer
) -> None:
    lines = rows(30)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    size = source.stat().st_size
    serial = [*command(source, out, server), "--max-async-requests", "1"]
    killed = await run_cli(serial, BATCHRUN_CRASH_AT="after_response:15")
    assert killed.returncode == -9
    assert server.stats.requests == 15  # the 15th answer was received, not journaled
    lines[3] = chat("ROW 0003", custom_id="row-3")
    write_jsonl(source, lines)
    assert source.stat().st_size == size

    summary_path = tmp_path / "summary.json"
    resumed = await run_cli([*serial, "--summary", str(summary_path)])

    assert resumed.returncode == 0, resumed.stderr.decode()
    # Rows 0-13 were journaled: all but the edited row 3 are reused; row 14
    # was in flight at the kill and is sent again with rows 15-29.
    assert server.stats.requests == 15 + 1 + 16
    assert answers(out) == [f"echo: {row['messages'][0]['content']}" for row in lines]  # type: ignore[index]
    summary = orjson.loads(summary_path.read_bytes())
    assert (summary["sent"], summary["reused"]) == (17, 13)


async def test_two_runs_share_one_cache_at_once(tmp_path: Path, server: MockServer) -> None:
    cache = tmp_path / "cache"
    lines = [chat(f"shared {i} mock:delay=0.002") for i in range(200)]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    results: list[int] = []

    async def one(out: Path) -> None:
        done = await run_cli(command(source, out, server, "--cache", str(cache)))
        assert b"Traceback" not in done.stderr
        results.append(done.returncode)

    async with anyio.create_task_group() as group:
        for out in outs:
            group.start_soon(one, out)

    assert results == [0, 0]
    assert server.stats.requests <= 400
    expected = [f"echo: shared {i} mock:delay=0.002" for i in range(200)]
    assert answers(outs[0]) == answers(outs[1]) == expected
    sent = server.stats.requests
    third = await run_cli(command(source, tmp_path / "c.jsonl", server, "--cache", str(cache)))
    assert third.returncode == 0
    assert server.stats.requests == sent  # all 200 from the shared cache
    stats = await run_cli(
        [sys.executable, "-m", "batchrun", "cache", "stats", str(cache), "--json"]
    )
    assert orjson.loads(stats.stdout)["results"] == 200


async def test_cache_stats_and_prune(tmp_path: Path, server: MockServer) -> None:
    cache = tmp_path / "cache"
    source = write_jsonl(tmp_path / "in.jsonl", rows(5))
    assert (
        await run_cli(command(source, tmp_path / "o.jsonl", server, "--cache", str(cache)))
    ).returncode == 0
    base = [sys.executable, "-m", "batchrun", "cache"]

    shown = await run_cli([*base, "stats", str(cache)])
    kept = await run_cli([*base, "prune", str(cache), "--older-than", "30d"])
    pruned = await run_cli([*base, "prune", str(cache), "--older-than", "0s"])
    after = await run_cli([*base, "stats", str(cache), "--json"])
    bad = await run_cli([*base, "prune", str(cache), "--older-than", "soon"])
    missing = await run_cli([*base, "stats", str(tmp_path / "nowhere")])
    by_file = await run_cli([*base, "stats", str(cache / "results.sqlite"), "--json"])
    not_a_store = await run_cli([*base, "stats", str(source)])

    assert b"5 results" in shown.stdout
    assert b"deleted 0 results" in kept.stdout
    assert b"deleted 5 results" in pruned.stdout
    assert orjson.loads(after.stdout)["results"] == 0
    assert (bad.returncode, missing.returncode) == (2, 2)
    assert b"--older-than" in bad.stderr
    assert orjson.loads(by_file.stdout)["results"] == 0  # the store file itself will do
    assert not_a_store.returncode == 2
    assert b"is a file: give the directory" in not_a_store.stderr


async def test_an_outputs_own_store_is_not_pruned_under_a_live_run(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", rows(3))
    out = tmp_path / "o.jsonl"
    assert (await run_cli(command(source, out, server))).returncode == 0
    own = tmp_path / "o.jsonl.batchrun"
    prune = [sys.executable, "-m", "batchrun", "cache", "prune", str(own), "--older-than", "0s"]
    live = StateDir(out)
    live.lock()  # as a run on the output holds it
    try:
        refused = await run_cli(prune)
        by_file = await run_cli([*prune[:5], str(own / "results.sqlite"), *prune[6:]])
    finally:
        live.unlock()
    pruned = await run_cli(prune)

    assert (refused.returncode, by_file.returncode) == (4, 4)
    assert refused.stderr.decode().startswith(f"batchrun: error: a run on {out} is live (pid ")
    assert b"prune it once that run ends" in refused.stderr
    assert b"deleted 3 results" in pruned.stdout  # kept until then, pruned after


async def test_a_cache_that_cannot_be_written_is_exit_2_before_any_request(
    tmp_path: Path, server: MockServer
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    source = write_jsonl(tmp_path / "in.jsonl", rows(3))

    done = await run_cli(
        command(source, tmp_path / "o.jsonl", server, "--cache", str(blocker / "c"))
    )

    assert done.returncode == 2
    assert str(blocker).encode() in done.stderr
    assert b"Traceback" not in done.stderr
    assert server.stats.requests == 0


async def test_a_damaged_cache_is_exit_2_naming_the_file(
    tmp_path: Path, server: MockServer
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "results.sqlite").write_bytes(b"\x00not sqlite\xff" * 200)
    source = write_jsonl(tmp_path / "in.jsonl", rows(3))

    done = await run_cli(command(source, tmp_path / "o.jsonl", server, "--cache", str(cache)))

    assert done.returncode == 2
    assert b"results.sqlite is damaged" in done.stderr
    assert b"Traceback" not in done.stderr
    assert server.stats.requests == 0


async def test_twins_of_an_answer_a_killed_run_journaled_are_not_paid_again(
    tmp_path: Path, server: MockServer
) -> None:
    # One request six times (answered at 0.2 s: its five twins parked behind
    # it), then five others (0.5 s), killed as the first of those is answered.
    lines = [chat("twin mock:delay=0.2", custom_id=f"twin-{i}") for i in range(6)]
    lines += [chat(f"slow {i} mock:delay=0.5", custom_id=f"slow-{i}") for i in range(5)]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    killed = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT="after_response:2")
    assert killed.returncode == -9
    assert server.stats.requests == 1 + 5

    resumed = await run_cli(command(source, out, server))

    assert resumed.returncode == 0, resumed.stderr.decode()
    assert server.stats.requests == 1 + 5 + 5  # the five in flight at the kill, again
    assert answers(out) == [f"echo: {row['messages'][0]['content']}" for row in lines]  # type: ignore[index]
    assert [r["custom_id"] for r in read_jsonl(out)] == [row["custom_id"] for row in lines]
