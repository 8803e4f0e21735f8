"""Paying once: answers reused by their request's content across input edits,
a shared --cache, the spend and --max-cost. Every count is what the real mock
server received."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from batchrun import pipeline, reuse
from batchrun.errors import UsageError
from batchrun.mock.server import MockServer
from batchrun.runner import EXIT_BUDGET, run_async
from batchrun.state import StateDir
from batchrun.stats import Summary
from batchrun.store import ResultStore, StoreRow
from tests.conftest import chat, make_config, read_jsonl

pytestmark = pytest.mark.asyncio


def prompts(count: int, tag: str = "row") -> list[dict[str, Any]]:
    return [chat(f"{tag} {i:04d}", custom_id=f"{tag}-{i}") for i in range(count)]


async def run(tmp_path: Path, rows: list[Any], server: MockServer, **settings: Any) -> Summary:
    return await run_async(make_config(tmp_path, rows, server, **settings))


def assert_answers_match(out: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every output line answers its own row's current prompt, in order."""
    records = read_jsonl(out)
    assert len(records) == len(rows)
    for number, (record, row) in enumerate(zip(records, rows, strict=True), start=1):
        assert record["line"] == number
        assert record["custom_id"] == row["custom_id"]
        answer = record["response"]["body"]["choices"][0]["message"]["content"]
        assert answer == "echo: " + row["messages"][0]["content"]
    return records


async def test_an_unchanged_rerun_sends_nothing(tmp_path: Path, server: MockServer) -> None:
    rows = prompts(30)
    first = await run(tmp_path, rows, server)
    assert (first.sent, first.reused, server.stats.requests) == (30, 0, 30)

    again = await run(tmp_path, rows, server)

    assert again.exit_code == 0
    assert server.stats.requests == 30


@pytest.mark.parametrize(
    ("change", "expected_sent"),
    [
        ("edit", 3),
        ("insert", 2),
        ("delete", 0),
        ("append", 5),
        ("reorder", 0),
        ("all", 3 + 2 + 5),
    ],
)
async def test_an_edited_input_sends_only_rows_without_a_stored_answer(
    tmp_path: Path, server: MockServer, change: str, expected_sent: int
) -> None:
    rows = prompts(40)
    assert (await run(tmp_path, rows, server)).exit_code == 0
    sent_before = server.stats.requests
    edited = list(rows)
    if change in ("edit", "all"):
        for i in (3, 17, 30):
            edited[i] = chat(f"ROW {i:04d}", custom_id=f"row-{i}")  # same byte size
    if change in ("delete", "all"):
        del edited[5:9]
    if change in ("insert", "all"):
        edited[10:10] = prompts(2, "inserted")
    if change in ("append", "all"):
        edited += prompts(5, "appended")
    if change == "reorder":
        random.Random(3).shuffle(edited)

    summary = await run(tmp_path, edited, server)

    assert summary.exit_code == 0, summary.aborted
    assert server.stats.requests - sent_before == expected_sent
    assert summary.sent == expected_sent
    assert summary.reused == len(edited) - expected_sent
    records = assert_answers_match(tmp_path / "out.jsonl", edited)
    assert sum(1 for r in records if r.get("reused")) == summary.reused


async def test_restart_pays_for_everything_again(tmp_path: Path, server: MockServer) -> None:
    rows = prompts(10)
    await run(tmp_path, rows, server)
    summary = await run(tmp_path, rows, server, restart=True)
    assert (summary.sent, summary.reused, server.stats.requests) == (10, 0, 20)


async def test_row_errors_are_reused_and_retryable_ones_resent_only_on_request(
    tmp_path: Path, server: MockServer
) -> None:
    rows = [chat("a"), chat("bad mock:fail=400"), chat("flaky mock:fail=500x1")]
    first = await run(tmp_path, rows, server, max_attempts=1)
    assert first.exit_code == 1
    assert server.stats.requests == 3
    edited = [*rows, chat("new")]

    kept = await run(tmp_path, edited, server, max_attempts=1)
    assert server.stats.requests == 4  # only the new row
    assert kept.failed_by_code == {"invalid_request_error": 1, "server_error": 1}

    retried = await run(tmp_path, [*edited, chat("newer")], server, retry_failed=True)
    assert server.stats.requests == 6  # the retryable row and the newer one
    assert retried.failed_by_code == {"invalid_request_error": 1}


async def test_a_changed_model_is_a_different_request(tmp_path: Path, server: MockServer) -> None:
    rows = prompts(5)
    await run(tmp_path, rows, server, model="m1")
    summary = await run(tmp_path, rows, server, model="m2")
    assert (summary.sent, server.stats.requests) == (5, 10)
    back = await run(tmp_path, rows, server, model="m1")
    assert (back.sent, back.reused, server.stats.requests) == (0, 5, 10)


async def test_a_shard_output_is_not_turned_into_another_shards(
    tmp_path: Path, server: MockServer
) -> None:
    # Forgetting --shard on a rerun would make the output the whole input's,
    # paying for every other shard's rows.
    rows = prompts(6)
    assert (await run(tmp_path, rows, server, shard="1/2")).exit_code == 0
    before = (tmp_path / "out.jsonl").read_bytes()
    for other in (None, "0/2", "1/3"):
        with pytest.raises(UsageError, match=r"out\.jsonl holds the rows of --shard 1/2, and"):
            await run(tmp_path, rows, server, shard=other)
    assert server.stats.requests == 3
    assert (tmp_path / "out.jsonl").read_bytes() == before


async def test_retry_failed_refuses_a_changed_request_instead_of_paying_for_every_row(
    tmp_path: Path, server: MockServer
) -> None:
    rows = [*prompts(4), chat("flaky mock:fail=500x1")]
    assert (await run(tmp_path, rows, server, model="m1", max_attempts=1)).exit_code == 1
    with pytest.raises(UsageError, match="--retry-failed resends the failed rows as the run"):
        await run(tmp_path, rows, server, model="m2", retry_failed=True)
    assert server.stats.requests == 5
    retried = await run(tmp_path, rows, server, model="m1", retry_failed=True)
    assert (retried.exit_code, server.stats.requests) == (0, 6)


async def test_a_shared_cache_serves_other_outputs_and_jobs(
    tmp_path: Path, server: MockServer
) -> None:
    cache = tmp_path / "cache"
    rows = prompts(20)
    await run(tmp_path, rows, server, cache=cache)
    other_out = tmp_path / "other.jsonl"

    summary = await run(
        tmp_path, [*rows[5:], *prompts(3, "more")], server, cache=cache, out=other_out
    )

    assert (summary.sent, summary.reused) == (3, 15)
    assert server.stats.requests == 23
    assert all(r.get("reused") for r in read_jsonl(other_out)[:15])


async def test_costs_per_record_in_the_summary_and_saved_on_reuse(
    tmp_path: Path, server: MockServer
) -> None:
    prices = {"price_input_per_million": 1_000_000.0, "price_output_per_million": 2_000_000.0}
    rows = [chat("one two three")]  # 3 words in; the answer "echo: one two three" is 4 out
    first = await run(tmp_path, rows, server, **prices)
    record = read_jsonl(tmp_path / "out.jsonl")[0]
    assert record["cost"] == pytest.approx(3 * 1.0 + 4 * 2.0)
    assert first.cost == pytest.approx(11.0)
    assert first.cost_saved == 0.0

    again = await run(tmp_path, [chat("new"), *rows], server, **prices)

    assert again.cost == pytest.approx(1.0 + 2 * 2.0)
    assert again.cost_saved == pytest.approx(11.0)
    assert orjson.loads(orjson.dumps(again.to_dict()))["reused"] == 1


async def test_max_cost_stops_with_exit_5_and_a_higher_cap_finishes_without_paying_twice(
    tmp_path: Path, server: MockServer
) -> None:
    # Each row: 2 words in (price 1 each), "echo: r N" = 3 words out (price 1 each),
    # worst case estimated from ~2 prompt tokens plus max_tokens 3.
    costs = {
        "price_input_per_million": 1_000_000.0,
        "price_output_per_million": 1_000_000.0,
        "params": {"max_tokens": 3},
        "max_async_requests": 2,
    }
    rows = [chat(f"r {i}", custom_id=f"r{i}") for i in range(20)]

    stopped = await run(tmp_path, rows, server, max_cost=30.0, **costs)

    assert stopped.exit_code == EXIT_BUDGET
    assert "raise --max-cost" in (stopped.aborted or "")
    assert stopped.cost is not None
    assert stopped.cost <= 30.0
    paid = server.stats.requests
    assert 0 < paid < 20
    assert not (tmp_path / "out.jsonl").exists()

    finished = await run(tmp_path, rows, server, max_cost=1000.0, **costs)

    assert finished.exit_code == 0, finished.aborted
    assert server.stats.requests == 20  # every row paid exactly once over both runs
    assert max(server.stats.by_digest.values()) == 1
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in records] == [f"r{i}" for i in range(20)]
    assert sum(r["cost"] for r in records) == pytest.approx(20 * 5.0)
    assert stopped.cost + (finished.cost or 0) == pytest.approx(100.0)


async def test_max_cost_waits_for_rows_in_flight_instead_of_stopping_far_below_it(
    tmp_path: Path, server: MockServer
) -> None:
    # Each row costs 5 but reserves its worst case, 2 + 256 output tokens:
    # 32 rows in flight hold 8,000 of reservations. A cap of 1,000 must let
    # all 100 rows through (500 spent), not stop once the reservations fill it.
    costs = {"price_input_per_million": 1_000_000.0, "price_output_per_million": 1_000_000.0}
    rows = [chat(f"r {i}", custom_id=f"r{i}") for i in range(100)]
    done = await run(tmp_path, rows, server, max_cost=1000.0, max_async_requests=32, **costs)
    assert done.exit_code == 0, done.aborted
    assert done.cost == pytest.approx(500.0)
    # A cap it cannot reach: the run goes as far as the cap allows, and no further.
    capped = await run(
        tmp_path, rows, server, out=tmp_path / "capped.jsonl", max_cost=400.0, **costs
    )
    assert capped.exit_code == EXIT_BUDGET
    assert capped.cost is not None
    assert 400.0 - 260.0 < capped.cost <= 400.0  # stopped only when one worst case would pass it


async def test_the_budget_waits_while_rows_in_flight_hold_the_room() -> None:
    from batchrun.budget import Budget

    budget = Budget(cap=10.0, spent=2.0)
    assert budget.reserve(5.0)
    assert not budget.reserve(4.0)  # 2 + 5 + 4 > 10, but 2 + 4 fits once the 5 settle
    assert not budget.refused
    assert not budget.reserve(9.0)  # 2 + 9 > 10 whatever settles
    assert budget.refused


async def test_max_cost_needs_prices(tmp_path: Path, server: MockServer) -> None:
    from batchrun.errors import UsageError

    with pytest.raises(UsageError, match="--max-cost needs the prices"):
        make_config(tmp_path, prompts(1), server, max_cost=1.0)


async def test_a_damaged_store_is_refused_by_name_before_any_request(
    tmp_path: Path, server: MockServer
) -> None:
    from batchrun.store import STORE_FILE, StoreError

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / STORE_FILE).write_bytes(b"garbage, not a database" * 50)
    with pytest.raises(StoreError, match=str(cache / STORE_FILE)):
        await run(tmp_path, prompts(3), server, cache=cache)
    assert server.stats.requests == 0


async def test_rows_answered_in_batches_are_not_paid_again_online(
    tmp_path: Path, server: MockServer
) -> None:
    rows = prompts(8)
    batch = await run(tmp_path, rows, server, mode="batch", poll_interval=0.05)
    assert batch.exit_code == 0
    assert server.stats.requests == 0  # all answered in a batch

    online = await run(tmp_path, [*rows, *prompts(2, "new")], server)

    assert (online.sent, online.reused) == (2, 8)
    assert server.stats.requests == 2


async def test_the_progress_line_shows_the_spend(tmp_path: Path, server: MockServer) -> None:
    import io

    prices = {"price_input_per_million": 1_000_000.0, "price_output_per_million": 1_000_000.0}
    stream = io.StringIO()
    config = make_config(tmp_path, [chat("one two")], server, progress=True, **prices)

    await run_async(config, stream=stream)

    assert "cost 5" in stream.getvalue()  # 2 words in, "echo: one two" 3 out


async def test_rows_answered_online_are_left_out_of_batches(
    tmp_path: Path, server: MockServer
) -> None:
    rows = prompts(8)
    assert (await run(tmp_path, rows, server)).exit_code == 0
    assert server.stats.requests == 8

    batch = await run(
        tmp_path, [*rows, *prompts(2, "new")], server, mode="batch", poll_interval=0.05
    )

    assert batch.exit_code == 0, batch.aborted
    assert server.stats.requests == 8  # nothing more online
    assert len(server.batches.batches) == 1
    assert server.stats.batch_rows == 2  # only the new rows went into the batch
    assert batch.reused == 8
    assert_answers_match(tmp_path / "out.jsonl", [*rows, *prompts(2, "new")])


async def test_a_damaged_output_store_is_refused_until_restart(
    tmp_path: Path, server: MockServer
) -> None:
    from batchrun.store import STORE_FILE, StoreError

    rows = prompts(3)
    await run(tmp_path, rows, server)
    own = tmp_path / "out.jsonl.batchrun" / STORE_FILE
    for sidecar in (own.with_name(STORE_FILE + "-wal"), own.with_name(STORE_FILE + "-shm")):
        sidecar.unlink(missing_ok=True)
    own.write_bytes(b"\x13garbage" * 500)

    with pytest.raises(StoreError, match=f"{own}.*--restart"):
        await run(tmp_path, [*rows, chat("new")], server)
    assert server.stats.requests == 3

    restarted = await run(tmp_path, [*rows, chat("new")], server, restart=True)
    assert (restarted.exit_code, restarted.sent) == (0, 4)


async def test_cache_and_max_cost_are_job_file_keys(tmp_path: Path) -> None:
    from batchrun.jobfile import build_config, load_job_file

    job = tmp_path / "job.toml"
    job.write_text(
        'input = "in.jsonl"\nout = "out.jsonl"\ncache = "/var/cache/batchrun"\n'
        "[costs]\nprice_input_per_million = 1.0\nprice_output_per_million = 2.0\n"
        "max_cost = 12.5\n"
    )

    config = build_config(load_job_file(job))

    assert config.cache == Path("/var/cache/batchrun")
    assert config.costs.max_cost == 12.5


async def test_a_result_reaches_the_store_only_once_the_journal_holds_it(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kill right after a store commit must find each committed result in the
    # journal too: else the resumed run takes it for a reused answer. Commit
    # after every result, and look at the journal on disk at each commit.
    monkeypatch.setattr(reuse, "FLUSH_EVERY", 1)
    config = make_config(tmp_path, prompts(40), server)
    journal = StateDir(config.out).journal_path
    put_rows = ResultStore.put_rows
    missing: list[bytes] = []

    def checked(store: ResultStore, rows: list[StoreRow]) -> None:
        on_disk = journal.read_bytes() if journal.exists() else b""
        missing.extend(row[1] for row in rows if row[1] not in on_disk)
        put_rows(store, rows)

    monkeypatch.setattr(ResultStore, "put_rows", checked)
    summary = await run_async(config)

    assert summary.exit_code == 0
    assert summary.sent == 40
    assert missing == []


async def test_the_output_flush_timer_commits_the_stores_only_every_so_often(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit per output flush would rewrite the store's index pages
    # twenty times a second: the timer commits every STORE_EVERY flushes.
    monkeypatch.setattr(pipeline, "FLUSH_INTERVAL", 0.001)
    monkeypatch.setattr(pipeline, "STORE_EVERY", 10_000)
    server.latency = 0.005
    commits: list[int] = []
    put_rows = ResultStore.put_rows

    def counted(store: ResultStore, rows: list[StoreRow]) -> None:
        if rows:
            commits.append(len(rows))
        put_rows(store, rows)

    monkeypatch.setattr(ResultStore, "put_rows", counted)
    rows = prompts(200)
    summary = await run(tmp_path, rows, server, max_async_requests=2)

    assert summary.exit_code == 0
    assert sum(commits) == 200  # every result is stored, once
    assert len(commits) <= 3  # not one per flush (several hundred of them)


def twin_rows(copies: int) -> list[dict[str, Any]]:
    """``copies`` rows of one request (the mock answers it after 0.2 s), each
    with its own id, between rows of other requests."""
    rows: list[dict[str, Any]] = []
    for i in range(copies):
        rows.append(chat("same request mock:delay=0.2", custom_id=f"twin-{i}"))
        rows.append(chat(f"other {i} mock:delay=0.2", custom_id=f"other-{i}"))
    return rows


@pytest.mark.parametrize(
    "max_async",
    [
        pytest.param(16, id="twins-in-flight"),  # all read while the first is sent: parked
        pytest.param(1, id="twins-answered"),  # read after its answer, before any commit
    ],
)
async def test_identical_rows_of_one_input_are_paid_once(
    tmp_path: Path, server: MockServer, max_async: int
) -> None:
    rows = twin_rows(5)
    summary = await run(
        tmp_path, rows, server, max_async_requests=max_async, max_async_requests_per_host=max_async
    )

    assert server.stats.requests == 6  # the request the twins share, and five others
    assert (summary.exit_code, summary.sent, summary.reused) == (0, 6, 4)
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in records] == [row["custom_id"] for row in rows]
    assert [r["line"] for r in records] == list(range(1, 11))
    twins = [r for r in records if r["custom_id"].startswith("twin-")]
    assert {orjson.dumps(r["response"]["body"]) for r in twins} == {
        orjson.dumps(twins[0]["response"]["body"])
    }
    assert [bool(r.get("reused")) for r in twins] == [False, True, True, True, True]


@pytest.mark.parametrize(
    ("fault", "requests", "failed"),
    [
        pytest.param("mock:fail=500", 1 + 4, 4, id="failing-again: each twin tried"),
        pytest.param("mock:fail=500x1", 1 + 1, 0, id="answered: the twins share it"),
    ],
)
async def test_twins_share_a_retryable_failure_until_retry_failed_resends_it(
    tmp_path: Path, server: MockServer, fault: str, requests: int, failed: int
) -> None:
    rows = [chat(f"down {fault} mock:delay=0.1", custom_id=f"t{i}") for i in range(4)]
    first = await run(tmp_path, rows, server, max_attempts=1)
    assert (server.stats.requests, first.reused) == (1, 3)
    assert first.failed_by_code == {"server_error": 4}

    again = await run(tmp_path, rows, server, max_attempts=1, retry_failed=True)

    assert server.stats.requests == requests
    assert sum(again.failed_by_code.values()) == failed
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in records] == ["t0", "t1", "t2", "t3"]
    assert sum(bool(r.get("reused")) for r in records) == 4 - (requests - 1)


async def test_a_first_run_finds_its_own_results_before_and_after_their_commit(
    tmp_path: Path,
) -> None:
    answers = reuse.open_answers(tmp_path, None, resend_retryable=False)
    assert not answers.lookup  # an empty store: no lookups, save the run's own keys
    row: StoreRow = (b"k" * 32, b'{"line":1}', 1, 0, None, 1.0)
    answers.add_row(row)

    fresh = answers.find(row[0])  # not committed yet
    answers.flush()
    committed = answers.find(row[0])

    assert fresh is not None
    assert committed is not None
    assert fresh.record == committed.record == b'{"line":1}'
    assert answers.find(b"x" * 32) is None
    answers.close()


async def test_an_input_rewritten_while_a_run_reads_it_is_not_published(
    tmp_path: Path, server: MockServer
) -> None:
    # 400 rows of 20 ms, 4 at a time: the run reads for about 2 s.
    rows = [chat(f"row {i:04d} mock:delay=0.02", custom_id=f"r{i}") for i in range(400)]
    config = make_config(tmp_path, rows, server, max_async_requests=4)
    edited = [chat(f"ROW {i:04d} mock:delay=0.02", custom_id=f"r{i}") for i in range(400)]

    async def run_while_rewritten() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run_async, config)
            await anyio.sleep(0.5)
            # Rewritten in place, as `cat new > in.jsonl` does: the run reads on.
            config.input.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in edited))

    with pytest.raises(ExceptionGroup) as refused:
        await run_while_rewritten()
    assert refused.group_contains(UsageError, match="changed while this run read it")
    assert not config.out.exists()
    assert 0 < server.stats.requests < 800

    again = await run_async(config)

    assert again.exit_code == 0
    assert_answers_match(config.out, edited)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_stop_reaches_workers_writing_reused_rows_within_short_turns(
    tmp_path: Path, server: MockServer
) -> None:
    # Every ready worker takes its turn before another task (a signal's
    # receiver, this stopper) does: in turns of 256 reused rows, 32 workers
    # kept it waiting for seconds, to the end of this input. Turns are now
    # bounded in time too.
    rows = prompts(12_000)
    assert (await run(tmp_path, rows, server, max_async_requests=32)).exit_code == 0
    partial = StateDir(tmp_path / "out.jsonl").partial_path
    stop = anyio.Event()

    async def stop_midway() -> None:
        while not partial.exists() or partial.stat().st_size < 200_000:  # noqa: ASYNC110
            await anyio.sleep(0.005)  # the output is the run's own state: no event to await
        stop.set()

    edited = make_config(tmp_path, [*rows, chat("new")], server, max_async_requests=32)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(stop_midway)
        summary = await run_async(edited, stop=stop)

    assert summary.exit_code == 75, summary.aborted
    assert partial.read_bytes().count(b"\n") < 6_000  # about 1,000; before, about 12,000
