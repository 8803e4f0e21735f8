"""--mode batch against the mock provider's files and batches API: splitting,
faults, cleanup, and the same output as online mode."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from batchrun.batchmode import job as job_module
from batchrun.batchmode.record import BatchRecord, Part
from batchrun.batchmode.settle import MAX_ROUNDS, Settler
from batchrun.errors import UsageError
from batchrun.mock.batches import BatchFaults
from batchrun.mock.server import MockServer
from batchrun.runner import run_async
from tests.conftest import chat, make_config, read_jsonl, write_jsonl
from tests.fakes import FakeClock
from tests.redis_server import free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

FAST = {"mode": "batch", "poll_interval": 0.05}


@pytest_asyncio.fixture
async def batch_server() -> AsyncIterator[MockServer]:
    async with MockServer(batch_faults=BatchFaults(seconds=0.2)) as mock:
        yield mock


def rows(count: int, **extra: Any) -> list[dict[str, Any]]:
    return [chat(f"row {i}", **extra) for i in range(count)]


def batch_models(server: MockServer) -> list[set[str]]:
    """The models of each batch's input file."""
    found = []
    for batch in server.batches.batches.values():
        data = server.batches.contents.get(batch.info["input_file_id"])
        lines = [orjson.loads(raw) for raw in (data or b"").splitlines()]
        found.append({line["body"]["model"] for line in lines})
    return found


def total(batch: Any) -> int:
    return int(batch.info["request_counts"]["total"])


def paid_twice(server: MockServer) -> int:
    return sum(count - 1 for count in server.stats.by_digest.values())


async def test_rows_are_split_by_count_and_by_model(
    tmp_path: Path, batch_server: MockServer
) -> None:
    source = [chat(f"row {i}", model="m-a" if i % 3 else "m-b") for i in range(20)]
    config = make_config(tmp_path, source, batch_server, batch_rows=4, keep_files=True, **FAST)
    summary = await run_async(config)
    assert summary.exit_code == 0
    # m-a: 13 rows -> 4 files of <= 4; m-b: 7 rows -> 2 files.
    assert batch_server.batches.created == 6
    assert all(len(models) == 1 for models in batch_models(batch_server))
    sizes = sorted(total(b) for b in batch_server.batches.batches.values())
    assert sizes == [1, 3, 4, 4, 4, 4]
    assert batch_server.stats.requests == 0  # nothing went online
    assert [row["line"] for row in read_jsonl(config.out)] == list(range(1, 21))


async def test_output_equals_online_modes(tmp_path: Path, batch_server: MockServer) -> None:
    source: list[Any] = [
        *rows(5, model="m"),
        chat("refused mock:fail=400", model="m"),
        {"custom_id": "e1", "input": "embed this", "model": "emb"},
        b"not json",
        {"input": {"messages": [{"role": "user", "content": "native"}]}, "model": "m"},
    ]
    batch = make_config(tmp_path, source, batch_server, **FAST)
    assert (await run_async(batch)).exit_code == 1
    async with MockServer() as online_server:
        online = make_config(tmp_path, source, online_server, out=tmp_path / "online.jsonl")
        assert (await run_async(online)).exit_code == 1
    assert batch.out.read_bytes() == online.out.read_bytes()
    assert batch_server.stats.requests == 0


def counted(summary: Any) -> tuple[Any, ...]:
    """What a summary counts the rows for."""
    return (
        summary.rows,
        summary.ok,
        summary.failed,
        summary.failed_by_code,
        summary.tokens_in,
        summary.tokens_out,
    )


async def test_summary_counts_equal_online_modes(tmp_path: Path, batch_server: MockServer) -> None:
    # Answers are counted from the tokens filed when they were collected;
    # errors from their records: the totals are the online run's.
    source: list[Any] = [
        *rows(4, model="m"),
        chat("refused mock:fail=400", model="m"),
        chat("longer answer " * 5, model="m"),
        b"not json",
    ]
    batch = make_config(tmp_path, source, batch_server, batch_rows=3, **FAST)
    summary = await run_async(batch)
    async with MockServer() as online_server:
        online = make_config(tmp_path, source, online_server, out=tmp_path / "online.jsonl")
        expected = await run_async(online)
    assert counted(summary) == counted(expected)
    assert summary.tokens_in > 0
    assert summary.failed == 2
    assert summary.extra["answered in batches"] == 6


async def test_dashscope_batch_tokens_are_read_as_dashscope_reads_them(
    tmp_path: Path, batch_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    source = [chat(f"row {i}", model="qwen") for i in range(3)]
    config = make_config(
        tmp_path,
        source,
        batch_server,
        provider="dashscope",
        base_url=batch_server.dashscope_base_url,
        **FAST,
    )
    summary = await run_async(config)
    bodies = [r["response"]["body"] for r in read_jsonl(config.out)]
    assert summary.tokens_in == sum(body["usage"]["prompt_tokens"] for body in bodies) > 0
    assert summary.tokens_out == sum(body["usage"]["completion_tokens"] for body in bodies) > 0


async def test_provider_files_are_cleaned_up(tmp_path: Path, batch_server: MockServer) -> None:
    config = make_config(tmp_path, rows(10, model="m"), batch_server, batch_rows=3, **FAST)
    assert (await run_async(config)).exit_code == 0
    assert batch_server.batches.created == 4
    assert batch_server.batches.files == {}
    assert not (tmp_path / "out.jsonl.batchrun" / "batch").exists()


async def test_files_left_by_a_stop_before_their_deletion_are_deleted_by_the_next_run(
    tmp_path: Path, batch_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Part 1 is collected, part 2 refused: the run stops with its state kept.
    # The first run's deletions never happen, as if it was killed just after
    # collecting; the next run (stopping again at the refusal) deletes them.
    source = [*rows(2, model="m"), chat("mock:invalid_file", model="m")]
    config = make_config(tmp_path, source, batch_server, batch_rows=2, **FAST)

    async def killed_first(self: Settler, part: Part) -> None:
        del self, part

    with monkeypatch.context() as patched:
        patched.setattr(Settler, "cleanup", killed_first)
        assert (await run_async(config)).exit_code == 3
    assert len(batch_server.batches.files) == 3  # part 1's input and output, part 2's input
    assert (await run_async(config)).exit_code == 3
    assert batch_server.batches.files == {}


async def test_keep_files_keeps_them(tmp_path: Path, batch_server: MockServer) -> None:
    config = make_config(tmp_path, rows(4, model="m"), batch_server, keep_files=True, **FAST)
    assert (await run_async(config)).exit_code == 0
    purposes = sorted(info["purpose"] for info in batch_server.batches.files.values())
    assert purposes == ["batch", "batch_output"]


async def test_expiry_resubmits_only_the_unfinished_rows(tmp_path: Path) -> None:
    faults = BatchFaults(seconds=0.2, expire_first=1, expire_share=0.5)
    async with MockServer(batch_faults=faults) as server:
        config = make_config(tmp_path, rows(10, model="m"), server, **FAST)
        assert (await run_async(config)).exit_code == 0
        statuses = [b.info["status"] for b in server.batches.batches.values()]
        assert statuses == ["expired", "completed"]
        assert [total(b) for b in server.batches.batches.values()] == [10, 5]
        assert server.stats.batch_rows == 10
        assert paid_twice(server) == 0
    assert all(row["error"] is None for row in read_jsonl(config.out))


async def test_expiry_with_fallback_online_sends_the_rest_online(tmp_path: Path) -> None:
    faults = BatchFaults(seconds=0.2, expire_first=1, expire_share=0.3)
    async with MockServer(batch_faults=faults) as server:
        config = make_config(tmp_path, rows(10, model="m"), server, fallback="online", **FAST)
        summary = await run_async(config)
        assert summary.exit_code == 0
        assert server.batches.created == 1
        assert server.stats.batch_rows == 7
        assert server.stats.requests == 3
        assert paid_twice(server) == 0
    assert len(read_jsonl(config.out)) == 10


async def test_enqueued_token_limit_then_success(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=0.2, token_limit_first=1)) as server:
        config = make_config(tmp_path, rows(6, model="m"), server, batch_rows=3, **FAST)
        assert (await run_async(config)).exit_code == 0
        statuses = sorted(b.info["status"] for b in server.batches.batches.values())
        assert statuses == ["completed", "completed", "failed"]
        assert paid_twice(server) == 0
        assert server.stats.batch_rows == 6
        # The refused part's file was uploaded once and reused.
        inputs = [b.info["input_file_id"] for b in server.batches.batches.values()]
        assert len(set(inputs)) == 2


async def test_a_refused_line_becomes_a_row_error(tmp_path: Path, batch_server: MockServer) -> None:
    source = [*rows(3, model="m"), chat("bad mock:invalid", model="m")]
    config = make_config(tmp_path, source, batch_server, **FAST)
    summary = await run_async(config)
    assert summary.exit_code == 1
    records = read_jsonl(config.out)
    assert [r["error"]["code"] if r["error"] else None for r in records] == [
        None,
        None,
        None,
        "invalid_request",
    ]
    assert batch_server.stats.batch_rows == 3


async def test_a_refused_lines_file_mates_go_in_a_new_batch_even_with_fallback_online(
    tmp_path: Path, batch_server: MockServer
) -> None:
    # The refused file never ran: --fallback online is for batches that ran
    # out of time, not a reason to pay full price for its other rows.
    # The refused line's twin (left out of the batch) gets its record too.
    bad = chat("bad mock:invalid", model="m")
    source = [*rows(3, model="m"), bad, bad]
    config = make_config(tmp_path, source, batch_server, fallback="online", **FAST)
    assert (await run_async(config)).exit_code == 1
    assert batch_server.stats.requests == 0
    assert batch_server.stats.batch_rows == 3
    codes = [None, None, None, "invalid_request", "invalid_request"]
    assert error_codes(config.out) == codes


async def test_a_refused_file_aborts_quoting_the_provider(
    tmp_path: Path, batch_server: MockServer
) -> None:
    # Two parts: the first is answered, the second refused as a whole.
    source = [*rows(2, model="m"), chat("mock:invalid_file", model="m")]
    config = make_config(tmp_path, source, batch_server, batch_rows=2, **FAST)
    summary = await run_async(config)
    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert "refused it as a whole" in summary.aborted
    assert ".." not in summary.aborted
    assert summary.aborted.endswith(
        "the answers already collected are reused (--restart would pay for them again)"
    )
    assert not config.out.exists()
    # The same command again (a scheduler's retry) stops the same way at
    # once, instead of polling a part that will never run.
    again = await run_async(config)
    assert (again.exit_code, again.aborted) == (3, summary.aborted)
    assert batch_server.batches.created == 2
    # With the input fixed, the same command goes on: only the fixed row is new.
    source[2] = chat("fixed", model="m")
    fixed = make_config(tmp_path, source, batch_server, batch_rows=2, **FAST)
    assert (await run_async(fixed)).exit_code == 0
    assert len(read_jsonl(fixed.out)) == 3
    assert batch_server.stats.batch_rows == 3
    assert paid_twice(batch_server) == 0


async def test_a_part_the_token_limit_keeps_refusing_stops_the_run_resumably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_module, "MAX_TOKEN_LIMIT_TRIES", 2)
    async with MockServer(batch_faults=BatchFaults(seconds=0.1, token_limit_first=5)) as server:
        config = make_config(tmp_path, rows(2, model="m"), server, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert "enqueued-token limit refused it 2 times" in summary.aborted
    assert summary.aborted.endswith("run the same command again later: it resumes")


async def test_a_batch_that_never_ends_is_polled_for_a_bounded_time(tmp_path: Path) -> None:
    # The provider keeps the batch in_progress past its 24 h window: the run
    # stops (exit 3) instead of polling for ever, and leaves the batch running.
    clock = FakeClock()
    async with MockServer(batch_faults=BatchFaults(seconds=1e9)) as server:
        settings = {"mode": "batch", "poll_interval": 3600.0}
        config = make_config(tmp_path, rows(2, model="m"), server, **settings)
        summary = await run_async(config, clock=clock.as_clock())
        (batch,) = server.batches.batches.values()
        status = batch.info["status"]
        assert status in ("validating", "in_progress")  # not cancelled: left as it is
    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert f"batch {batch.info['id']} is still {status} after 30 h of polling" in summary.aborted
    assert f"batchrun cancel {config.out}" in summary.aborted
    assert job_module.MAX_BATCH_WAIT < clock.now <= job_module.MAX_BATCH_WAIT + 2 * 3600 * 1.2
    assert not config.out.exists()


async def test_a_wrong_base_url_aborts_saying_that_the_run_resumes(
    tmp_path: Path, batch_server: MockServer
) -> None:
    wrong = batch_server.base_url + "/nowhere"
    config = make_config(tmp_path, rows(2, model="m"), batch_server, base_url=wrong, **FAST)
    summary = await run_async(config)
    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert summary.aborted.startswith("the provider keeps failing: http_404: POST files")
    assert "then run the same command again: it resumes" in summary.aborted
    assert "--restart" not in summary.aborted


async def test_a_provider_never_reached_stops_the_run_at_once(
    tmp_path: Path, batch_server: MockServer
) -> None:
    # Nothing listens there: a typo in --base-url, not an outage to wait out
    # for 20 poll rounds. The first failed step stops the run, resumably.
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    settings = {"base_url": nowhere, "max_attempts": 2, "backoff_initial": 0.01, **FAST}
    config = make_config(tmp_path, rows(2, model="m"), batch_server, **settings)
    summary = await run_async(config)
    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert summary.aborted.startswith(f"the provider at {nowhere} cannot be reached (connect_error")
    assert "then run the same command again: it resumes" in summary.aborted
    assert not config.out.exists()
    # Run again unfixed: looking for files uploaded before the stop fails the same way.
    again = await run_async(config)
    assert again.exit_code == 3
    assert again.aborted == summary.aborted
    # With --base-url fixed, the run goes on there: nothing of it was at the old URL.
    fixed = make_config(tmp_path, rows(2, model="m"), batch_server, **FAST)
    assert (await run_async(fixed)).exit_code == 0
    assert [row["line"] for row in read_jsonl(fixed.out)] == [1, 2]


async def _stopped_unreached(
    tmp_path: Path, server: MockServer, count: int, **settings: Any
) -> BatchRecord:
    """A batch run of ``count`` rows whose provider never answered (exit 3):
    its record, every part only planned."""
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    flags = {"base_url": nowhere, "max_attempts": 1, **FAST, **settings}
    config = make_config(tmp_path, rows(count, model="m"), server, **flags)
    assert (await run_async(config)).exit_code == 3
    record = BatchRecord(tmp_path / "out.jsonl.batchrun")
    assert record.exists()
    return record


def _base_url(record: BatchRecord) -> str:
    state = record.load()
    assert state is not None
    return state.base_url


def _as_uploaded(record: BatchRecord, index: int) -> None:
    """Record part ``index``'s file as uploaded (then a batch may exist)."""
    state = record.load()
    assert state is not None
    state.parts[index].status, state.parts[index].input_file_id = "uploaded", "file-1"
    record.save(state)


async def test_online_mode_goes_on_where_no_batch_part_was_uploaded(
    tmp_path: Path, batch_server: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A batch run that never reached the provider left only planned parts:
    # nothing of it exists there, so switching to online mode is safe.
    source = rows(4, model="m")
    record = await _stopped_unreached(tmp_path, batch_server, 4, batch_rows=2)
    online = make_config(tmp_path, source, batch_server)
    summary = await run_async(online)
    assert summary.exit_code == 0
    assert "may have left" not in caplog.text  # no upload reached the provider
    assert not record.exists()  # a later batch run cannot submit the dropped parts
    assert batch_server.stats.requests == 4
    assert batch_server.stats.batch_rows == 0
    assert [row["line"] for row in read_jsonl(online.out)] == [1, 2, 3, 4]


async def test_online_mode_refuses_parts_that_reached_the_provider(
    tmp_path: Path, batch_server: MockServer
) -> None:
    record = await _stopped_unreached(tmp_path, batch_server, 4, batch_rows=2)
    _as_uploaded(record, 1)  # its batch may have been created since
    with pytest.raises(UsageError, match="2 batch parts not yet collected"):
        await run_async(make_config(tmp_path, rows(4, model="m"), batch_server))
    assert record.exists()
    assert batch_server.stats.requests == 0


async def test_restart_names_the_files_a_stop_mid_upload_may_have_left(
    tmp_path: Path, batch_server: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Killed mid-upload: the part is only planned, so --restart may go on;
    # the record that could find the file goes, so the run names it.
    record = await _stopped_unreached(tmp_path, batch_server, 4, batch_rows=2)
    state = record.load()
    assert state is not None
    state.parts[1].upload_started = True
    record.save(state)
    left = f"batchrun-{state.run_id}-part-{state.parts[1].id}.jsonl"
    config = make_config(tmp_path, rows(4, model="m"), batch_server, restart=True, **FAST)
    assert (await run_async(config)).exit_code == 0
    warnings = [r.message for r in caplog.records if "may have left 1 file(s)" in r.message]
    assert len(warnings) == 1
    assert left in warnings[0]


async def test_restart_names_the_batches_whose_result_files_it_leaves(
    tmp_path: Path, batch_server: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A batch that ended (cancelled, say) and was never collected: its
    # result files are on the provider, named by no record once --restart
    # drops this one; only its batch tells where they are.
    record = await _stopped_unreached(tmp_path, batch_server, 4, batch_rows=2)
    state = record.load()
    assert state is not None
    part = state.parts[1]
    part.status, part.upload_started, part.input_file_id = "submitted", True, "file-x"
    part.batch_id, part.batch_status = "batch_x", "cancelled"
    record.save(state)
    config = make_config(tmp_path, rows(4, model="m"), batch_server, restart=True, **FAST)
    assert (await run_async(config)).exit_code == 0
    warnings = [r.message for r in caplog.records if "batch_x" in r.message]
    assert len(warnings) == 1
    assert "result files" in warnings[0]


async def test_a_new_base_url_is_refused_while_the_old_one_holds_the_runs_files(
    tmp_path: Path, batch_server: MockServer
) -> None:
    record = await _stopped_unreached(tmp_path, batch_server, 2)
    nowhere = _base_url(record)
    _as_uploaded(record, 0)  # as if the upload had worked there before the provider went away
    held = f"1 parts of this output have files or batches at {nowhere}"
    with pytest.raises(UsageError, match=held):
        await run_async(make_config(tmp_path, rows(2, model="m"), batch_server, **FAST))
    assert batch_server.batches.created == 0


async def test_rows_answered_online_are_not_put_in_a_batch(
    tmp_path: Path, batch_server: MockServer
) -> None:
    # An online run stops at a fatal answer on row 6, with rows 1-5 answered.
    source = [*rows(5, model="m"), chat("mock:quota", model="m"), *rows(3, model="n")]
    online = make_config(tmp_path, source, batch_server, max_async_requests=1)
    stopped = await run_async(online)
    assert stopped.exit_code == 3
    assert stopped.aborted is not None
    assert "insufficient_quota" in stopped.aborted
    assert ".." not in stopped.aborted  # the provider's message ends with its own period
    answered = batch_server.stats.requests
    batch = make_config(tmp_path, source, batch_server, **FAST)
    assert (await run_async(batch)).exit_code == 0
    assert batch_server.stats.batch_rows == len(source) - (answered - 1)
    assert len(read_jsonl(batch.out)) == len(source)


async def test_online_mode_refuses_an_output_with_batches_not_collected(
    tmp_path: Path, batch_server: MockServer
) -> None:
    from batchrun.batchmode.record import BatchRecord, Part

    config = make_config(tmp_path, rows(2, model="m"), batch_server)
    record = BatchRecord(tmp_path / "out.jsonl.batchrun")
    state = record.new(provider="mock", base_url=batch_server.base_url, api_key_env=None)
    part = Part(1, "/v1/chat/completions", "m", rows=2, bytes=10, status="submitted")
    part.batch_id = "batch_1"  # a live part always has one
    state.parts.append(part)
    record.save(state)
    with pytest.raises(UsageError, match="--mode batch"):
        await run_async(config)
    with pytest.raises(UsageError, match="batchrun cancel"):
        await run_async(make_config(tmp_path, rows(2), batch_server, restart=True))
    # `batchrun cancel OUT` records what the provider says of each batch.
    state.parts[0].batch_status = "cancelling"
    record.save(state)
    with pytest.raises(UsageError, match="1 batches of this output are being cancelled"):
        await run_async(make_config(tmp_path, rows(2), batch_server, restart=True))
    state.parts[0].batch_status = "cancelled"  # ended: --restart may start over
    record.save(state)
    restarted = await run_async(make_config(tmp_path, rows(2), batch_server, restart=True))
    assert restarted.exit_code == 0


async def test_rows_with_a_stored_answer_are_not_put_in_a_batch(
    tmp_path: Path, batch_server: MockServer
) -> None:
    cache = tmp_path / "cache"
    first = make_config(
        tmp_path, rows(3, model="m"), batch_server, cache=cache, out=tmp_path / "a.jsonl"
    )
    assert (await run_async(first)).exit_code == 0
    assert batch_server.stats.requests == 3
    source = write_jsonl(tmp_path / "more.jsonl", rows(5, model="m"))
    batch = make_config(
        tmp_path, [], batch_server, input=source, cache=cache, out=tmp_path / "b.jsonl", **FAST
    )
    assert (await run_async(batch)).exit_code == 0
    assert batch_server.stats.batch_rows == 2  # rows 3 and 4 only
    assert batch_server.stats.requests == 3
    assert paid_twice(batch_server) == 0
    assert [r["line"] for r in read_jsonl(batch.out)] == [1, 2, 3, 4, 5]


async def test_batch_answers_are_stored_for_an_online_rerun(
    tmp_path: Path, batch_server: MockServer
) -> None:
    cache = tmp_path / "cache"
    batch = make_config(
        tmp_path, rows(4, model="m"), batch_server, cache=cache, out=tmp_path / "b.jsonl", **FAST
    )
    assert (await run_async(batch)).exit_code == 0
    online = make_config(tmp_path, [], batch_server, input=batch.input, cache=cache)
    assert (await run_async(online)).exit_code == 0
    assert batch_server.stats.requests == 0
    reused = read_jsonl(online.out)
    assert all(record.pop("reused") for record in reused)
    assert reused == read_jsonl(batch.out)


PRICES = {"price_input_per_million": 2.0, "price_output_per_million": 6.0}


async def test_batch_answers_cost_their_share_of_the_prices(
    tmp_path: Path, batch_server: MockServer
) -> None:
    source = [*rows(4, model="m"), chat("refused mock:fail=400", model="m")]
    cache = tmp_path / "cache"
    half = make_config(tmp_path, source, batch_server, batch_rows=2, cache=cache, **PRICES, **FAST)
    summary = await run_async(half)
    quarter = make_config(
        tmp_path, [], batch_server, input=half.input, out=tmp_path / "q.jsonl",
        batch_price_share=0.25, **PRICES, **FAST,
    )  # fmt: skip
    assert (await run_async(quarter)).exit_code == 1
    async with MockServer() as online_server:
        online = make_config(
            tmp_path, [], online_server, input=half.input, out=tmp_path / "o.jsonl", **PRICES
        )
        expected = await run_async(online)

    paid = [record["cost"] for record in read_jsonl(online.out)]
    assert paid[0] > 0
    assert paid[4] == 0.0
    assert [record["cost"] for record in read_jsonl(half.out)] == [cost / 2 for cost in paid]
    assert [record["cost"] for record in read_jsonl(quarter.out)] == [cost / 4 for cost in paid]
    assert summary.cost == pytest.approx(expected.cost / 2)
    assert summary.cost is not None
    assert summary.cost > 0
    rerun = make_config(
        tmp_path,
        [],
        batch_server,
        input=half.input,
        out=tmp_path / "r.jsonl",
        cache=cache,
        **PRICES,
    )
    again = await run_async(rerun)
    assert again.cost_saved == pytest.approx(summary.cost)  # the batch price, from the store
    assert batch_server.stats.requests == 0


async def test_a_batch_price_share_past_1_is_a_usage_error(
    tmp_path: Path, batch_server: MockServer
) -> None:
    with pytest.raises(UsageError, match="batch_price_share must be a number from 0 to 1, got 2"):
        make_config(tmp_path, rows(1), batch_server, batch_price_share=2, **PRICES, **FAST)


async def test_dashscope_batches_go_through_compatible_mode(
    tmp_path: Path, batch_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    native = {"input": {"messages": [{"role": "user", "content": "native"}]}, "model": "qwen"}
    # A completion row goes as a chat request, as online: DashScope's batches
    # take chat and embeddings only.
    prompt = {"prompt": "a prompt", "model": "qwen"}
    config = make_config(
        tmp_path,
        [native, chat("plain", model="qwen"), prompt],
        batch_server,
        provider="dashscope",
        base_url=batch_server.dashscope_base_url,
        keep_files=True,
        **FAST,
    )
    assert (await run_async(config)).exit_code == 0
    assert batch_server.stats.batch_rows == 3
    assert batch_server.stats.requests == 0
    answers = [
        r["response"]["body"]["choices"][0]["message"]["content"] for r in read_jsonl(config.out)
    ]
    assert answers == ["echo: native", "echo: plain", "echo: a prompt"]
    (batch,) = batch_server.batches.batches.values()  # one file: one endpoint, one model
    lines = batch_server.batches.contents[batch.info["input_file_id"]].splitlines()
    assert {orjson.loads(line)["url"] for line in lines} == {"/v1/chat/completions"}


@pytest.mark.parametrize(
    ("no_id", "call", "quoted"),
    [
        ("files", "POST files", '{"object":"file"'),
        ("batches", "POST batches", '{"object":"batch"'),
        ("error", "POST batches", '{"error":{"message":"mock fault'),
    ],
)
async def test_an_answer_without_an_id_stops_naming_the_call_then_resumes(
    tmp_path: Path, no_id: str, call: str, quoted: str
) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=0.2, no_id=no_id)) as server:
        config = make_config(tmp_path, rows(3, model="m"), server, **FAST)
        summary = await run_async(config)
        assert summary.exit_code == 3
        assert summary.aborted is not None
        assert f"invalid_answer: {call} answered without a valid 'id': {quoted}" in summary.aborted
        assert "run the same command again: it resumes" in summary.aborted
        server.batches.faults.no_id = ""
        assert (await run_async(config)).exit_code == 0
        # The file or batch the bare answer made is found, not made again.
        assert server.batches.uploads == 1
        assert server.batches.created == 1
        assert server.stats.batch_rows == 3
        assert paid_twice(server) == 0


def error_codes(out: Path) -> list[str | None]:
    return [r["error"]["code"] if r["error"] else None for r in read_jsonl(out)]


async def test_rows_a_provider_keeps_dropping_are_resubmitted_a_bounded_number_of_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Completed batches without an output file: each new batch would be paid.
    async with MockServer(batch_faults=BatchFaults(seconds=0.05, lose_share=1.0)) as server:
        # Row 5 repeats row 1: left out of the batches, it gets row 1's record
        # from the store, not an online request of its own.
        source = [*rows(4, model="m"), rows(1, model="m")[0]]
        config = make_config(tmp_path, source, server, **FAST)
        summary = await run_async(config)
        assert summary.exit_code == 1
        assert server.batches.created == MAX_ROUNDS == 3
        assert summary.failed_by_code == {"batch_unfinished": 5}
        assert server.stats.requests == 0
        records = read_jsonl(config.out)
        assert all(r["error"]["retryable"] for r in records)
        assert "send it online with --retry-failed" in records[0]["error"]["message"]
        faults = [r.message for r in caplog.records if "a provider fault" in r.message]
        assert len(faults) == 1
        assert faults[0].startswith("the provider ended 2 batches (the last batch_")
        # The run is done: an online --retry-failed pass sends those rows.
        server.batches.faults.lose_share = 0.0
        again = make_config(tmp_path, source, server, retry_failed=True)
        assert (await run_async(again)).exit_code == 0
        assert server.stats.requests == 4
    assert error_codes(config.out) == [None] * 5


async def test_each_row_is_resubmitted_at_most_twice(tmp_path: Path) -> None:
    # Each batch drops half its rows: 8 rows, then 4, then 2 are sent; the
    # one row the third batch drops too is given up on.
    async with MockServer(batch_faults=BatchFaults(seconds=0.05, lose_share=0.5)) as server:
        config = make_config(tmp_path, rows(8, model="m"), server, **FAST)
        assert (await run_async(config)).exit_code == 1
        assert [total(b) for b in server.batches.batches.values()] == [8, 4, 2]
        assert server.stats.batch_rows == 7
        assert paid_twice(server) == 0
    assert error_codes(config.out) == [None] * 7 + ["batch_unfinished"]


async def test_rows_of_batches_that_keep_expiring_are_given_up_on(tmp_path: Path) -> None:
    faults = BatchFaults(seconds=0.05, expire_first=10, expire_share=1.0)
    async with MockServer(batch_faults=faults) as server:
        config = make_config(tmp_path, rows(3, model="m"), server, **FAST)
        assert (await run_async(config)).exit_code == 1
        assert server.batches.created == 3
    assert error_codes(config.out) == ["batch_unfinished"] * 3


async def test_fallback_online_sends_dropped_rows_online_at_once(tmp_path: Path) -> None:
    async with MockServer(batch_faults=BatchFaults(seconds=0.05, lose_share=1.0)) as server:
        config = make_config(tmp_path, rows(4, model="m"), server, fallback="online", **FAST)
        assert (await run_async(config)).exit_code == 0
        assert server.batches.created == 1
        assert server.stats.requests == 4
        assert paid_twice(server) == 0
    assert error_codes(config.out) == [None] * 4


async def test_identical_rows_go_into_a_batch_once(
    tmp_path: Path, batch_server: MockServer
) -> None:
    same = {"messages": [{"role": "user", "content": "the same"}], "model": "m"}
    source: list[Any] = [
        {"custom_id": "a", **same},
        chat("other", model="m"),
        {"custom_id": "b", **same},
        {"custom_id": "c", **same},
    ]
    batch = make_config(tmp_path, source, batch_server, batch_rows=1, **FAST)
    summary = await run_async(batch)

    assert summary.exit_code == 0
    assert batch_server.stats.batch_rows == 2  # "the same" once, "other" once
    assert batch_server.stats.requests == 0
    assert paid_twice(batch_server) == 0
    out = read_jsonl(batch.out)
    assert [r["custom_id"] for r in out] == ["a", out[1]["custom_id"], "b", "c"]
    assert [r.get("reused", False) for r in out] == [False, False, True, True]
    assert out[2]["response"]["body"] == out[0]["response"]["body"]
    async with MockServer() as online_server:
        online = make_config(tmp_path, source, online_server, out=tmp_path / "online.jsonl")
        assert (await run_async(online)).exit_code == 0
    assert online_server.stats.requests == 2
    assert batch.out.read_bytes() == online.out.read_bytes()


async def test_rows_answered_in_batches_are_this_runs_work_in_the_progress_line(
    tmp_path: Path, batch_server: MockServer
) -> None:
    stream = io.StringIO()
    config = make_config(tmp_path, rows(6), batch_server, progress=True, **FAST)
    summary = await run_async(config, stream=stream)
    assert (summary.exit_code, summary.skipped) == (0, 0)
    progress = [line for line in stream.getvalue().splitlines() if line.startswith("progress ")]
    # Not "skipped 6" (which says an earlier run did them), nor a rate of 0.
    assert " | ok 6 failed 0 | " in progress[-1]
    assert " 0.0 rows/s" not in progress[-1]


async def test_a_create_whose_answer_was_lost_makes_no_second_batch(tmp_path: Path) -> None:
    # The batch is made, its answer lost, and no retry is left: the next
    # round looks the batch up before creating one, as a retry would.
    async with MockServer(batch_faults=BatchFaults(seconds=0.1, lost_creates=1)) as server:
        config = make_config(tmp_path, rows(3, model="m"), server, max_attempts=1, **FAST)
        assert (await run_async(config)).exit_code == 0
        assert server.batches.created == 1
        assert server.stats.batch_rows == 3
        assert paid_twice(server) == 0
    assert [row["line"] for row in read_jsonl(config.out)] == [1, 2, 3]


async def test_an_upload_whose_answer_was_lost_leaves_no_second_file(tmp_path: Path) -> None:
    # The file is kept, its answer lost: the retry finds it by its name
    # instead of uploading a second one that nothing would ever delete.
    async with MockServer(batch_faults=BatchFaults(seconds=0.1, lost_uploads=1)) as server:
        config = make_config(tmp_path, rows(3, model="m"), server, backoff_initial=0.01, **FAST)
        assert (await run_async(config)).exit_code == 0
        assert server.batches.files == {}
        assert server.batches.uploads == 1
        assert server.stats.batch_rows == 3


@pytest.mark.parametrize("model", [["m"], {"name": "m"}])
async def test_a_line_whose_model_is_no_text_is_answered_by_the_mock_not_a_500(
    tmp_path: Path, batch_server: MockServer, model: object
) -> None:
    # batchrun sends such a line as it is (the provider judges it); the mock's
    # check of one model per file hashed it and failed every create with a 500.
    config = make_config(tmp_path, rows(2, model=model), batch_server, max_attempts=1, **FAST)
    assert (await run_async(config)).exit_code == 0
    assert batch_server.stats.batch_rows == 2
