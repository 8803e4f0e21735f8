"""The library run end to end against the real mock provider on loopback."""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest

from batchrun.errors import UsageError
from batchrun.mock.server import MockServer
from batchrun.runner import Clock, run_async, write_summary
from tests.conftest import chat, make_config, read_jsonl, write_jsonl
from tests.fakes import FakeClock
from tests.redis_server import free_port

pytestmark = pytest.mark.asyncio


async def test_scrambled_completions_come_out_in_input_order(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rng = random.Random(7)
    rows = [
        chat(f"row {i} mock:delay={rng.uniform(0, 0.15):.3f}", custom_id=f"c{i}") for i in range(80)
    ]
    config = make_config(tmp_path, rows, server, max_async_requests=16)

    summary = await run_async(config, clock=fake_clock)

    out = read_jsonl(config.out)
    assert [r["line"] for r in out] == list(range(1, 81))
    assert [r["custom_id"] for r in out] == [f"c{i}" for i in range(80)]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in out)
    assert out[3]["response"]["body"]["choices"][0]["message"]["content"].startswith("echo: row 3")
    assert summary.exit_code == 0
    assert (summary.ok, summary.failed) == (80, 0)


async def test_in_flight_never_exceeds_max_async(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat(f"row {i} mock:delay=0.05") for i in range(60)]
    config = make_config(tmp_path, rows, server, max_async_requests=5)

    await run_async(config, clock=fake_clock)

    assert server.stats.max_in_flight == 5  # reached, never passed
    assert server.stats.requests == 60


async def test_per_host_cap_holds_below_the_global_cap(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat(f"row {i} mock:delay=0.05") for i in range(40)]
    config = make_config(
        tmp_path, rows, server, max_async_requests=8, max_async_requests_per_host=3
    )

    await run_async(config, clock=fake_clock)

    assert server.stats.max_in_flight == 3


async def test_transient_faults_are_retried_until_success(
    tmp_path: Path, server: MockServer, fake_clock: Clock, fake_time: FakeClock
) -> None:
    rows = [
        chat("a mock:fail=429x2 mock:retry_after=7"),
        chat("b mock:fail=503x1"),
        chat("c mock:reset=1"),
        chat("d mock:truncate=1"),
        chat("e mock:badjson=1"),
        chat("f mock:fail=408x1"),
        chat("g"),
    ]
    config = make_config(tmp_path, rows, server)

    summary = await run_async(config, clock=fake_clock)

    out = read_jsonl(config.out)
    assert [r["attempts"] for r in out] == [3, 2, 2, 2, 2, 2, 1]
    assert all(r["error"] is None for r in out)
    assert summary.retries == 7
    assert summary.exit_code == 0
    # The two waits of row a honour its Retry-After of 7 s.
    assert sum(1 for wait in fake_time.sleeps if wait >= 7) >= 2


async def test_permanent_error_is_recorded_and_not_retried(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("ok"), chat("bad mock:fail=400"), chat("ok too")]
    config = make_config(tmp_path, rows, server)

    summary = await run_async(config, clock=fake_clock)

    out = read_jsonl(config.out)
    bad = out[1]
    assert bad["error"]["code"] == "invalid_request_error"
    assert bad["response"]["status_code"] == 400
    assert bad["attempts"] == 1
    assert out[0]["error"] is None
    assert out[2]["error"] is None
    assert summary.exit_code == 1
    assert summary.failed_by_code == {"invalid_request_error": 1}


async def test_exhausted_retries_record_the_last_error(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    config = make_config(tmp_path, [chat("x mock:fail=500")], server, max_attempts=3)

    summary = await run_async(config, clock=fake_clock)

    (row,) = read_jsonl(config.out)
    assert row["error"]["code"] == "server_error"
    assert row["attempts"] == 3
    assert server.stats.requests == 3
    assert summary.exit_code == 1


@pytest.mark.slow
async def test_slow_answer_past_the_read_timeout_is_a_read_timeout(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("slow mock:delay=3"), chat("quick")]
    config = make_config(tmp_path, rows, server, read_timeout=0.3, max_attempts=2)

    await run_async(config, clock=fake_clock)

    slow, quick = read_jsonl(config.out)
    assert slow["error"]["code"] == "read_timeout"
    assert slow["response"] is None
    assert slow["attempts"] == 2
    assert quick["error"] is None


async def test_malformed_lines_get_error_records_in_place(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows: list[dict[str, object] | bytes] = [
        chat("fine"),
        b"",
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe\x00",
        {"nothing": "here"},
        chat("fine again"),
    ]
    config = make_config(tmp_path, rows, server)

    summary = await run_async(config, clock=fake_clock)

    out = read_jsonl(config.out)
    assert len(out) == 7
    assert [r["error"] is None for r in out] == [True, False, False, False, False, False, True]
    for number in range(2, 7):
        assert f"line {number}" in out[number - 1]["error"]["message"]
    assert "blank" in out[1]["error"]["message"]
    assert "UTF-8" in out[4]["error"]["message"]
    assert server.stats.requests == 2
    assert summary.exit_code == 1


async def test_gzip_input(tmp_path: Path, server: MockServer, fake_clock: Clock) -> None:
    plain = write_jsonl(tmp_path / "plain.jsonl", [chat(f"z{i}") for i in range(5)])
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    config = make_config(tmp_path, [], server, input=packed)

    summary = await run_async(config, clock=fake_clock)

    assert [r["line"] for r in read_jsonl(config.out)] == [1, 2, 3, 4, 5]
    assert summary.ok == 5


async def test_job_defaults_fill_what_the_line_leaves_out(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("no model"), chat("own model", model="line-model")]
    config = make_config(tmp_path, rows, server, model="job-model", params={"temperature": 0.1})

    await run_async(config, clock=fake_clock)

    first, second = read_jsonl(config.out)
    assert first["response"]["body"]["model"] == "job-model"
    assert second["response"]["body"]["model"] == "line-model"


async def test_dashscope_native_dialect(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    rows = [
        chat("hello qwen"),
        {"custom_id": "n1", "input": {"messages": [{"role": "user", "content": "native"}]}},
    ]
    config = make_config(
        tmp_path,
        rows,
        server,
        provider="dashscope",
        base_url=server.dashscope_base_url,
        model="qwen-plus",
    )

    summary = await run_async(config, clock=fake_clock)

    chat_row, native_row = read_jsonl(config.out)
    assert chat_row["response"]["body"]["output"]["choices"][0]["message"]["content"] == (
        "echo: hello qwen"
    )
    assert native_row["custom_id"] == "n1"
    assert summary.tokens_in > 0
    assert summary.tokens_out > 0
    assert summary.exit_code == 0


async def test_bad_key_aborts_early_with_exit_3_and_the_key_redacted(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "bad-key")
    rows = [chat(f"row {i}") for i in range(500)]
    config = make_config(tmp_path, rows, server, provider="openai", max_async_requests=4)

    summary = await run_async(config, clock=fake_clock)

    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert "invalid_api_key" in summary.aborted
    assert "bad-key" not in summary.aborted
    assert "bad-key" not in summary.render()
    assert server.stats.requests <= 8  # a handful, not the whole file
    assert not config.out.exists()  # an aborted run publishes nothing


async def test_a_provider_never_reached_aborts_resumably_instead_of_failing_every_row(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat(f"row {i}") for i in range(50)]
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    config = make_config(tmp_path, rows, server, base_url=nowhere, max_async_requests=4)

    summary = await run_async(config, clock=fake_clock)

    assert summary.exit_code == 3
    assert summary.aborted is not None
    assert summary.aborted.startswith("no request could reach the provider (connect_error)")
    assert "run the same command again: it resumes where it stopped" in summary.aborted
    assert summary.failed == 0  # no row got a connect_error record
    assert not config.out.exists()
    fixed = make_config(tmp_path, rows, server, max_async_requests=4)
    assert (await run_async(fixed, clock=fake_clock)).exit_code == 0
    assert [row["line"] for row in read_jsonl(fixed.out)] == list(range(1, 51))
    assert server.stats.requests == 50


async def test_a_provider_that_answered_then_went_away_fails_rows_not_the_run(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    # One answer, then the port closes: the provider was reached, so later
    # rows that find no connection fail one by one (retryable), as before.
    async with answering_once() as port:
        rows = [chat(f"row {i}") for i in range(3)]
        url = f"http://127.0.0.1:{port}/v1"
        config = make_config(tmp_path, rows, server, base_url=url, max_async_requests=1)
        summary = await run_async(config, clock=fake_clock)

    assert summary.exit_code == 1
    out = read_jsonl(config.out)
    assert out[0]["error"] is None
    assert [row["error"]["code"] for row in out[1:]] == ["connect_error", "connect_error"]
    assert all(row["error"]["retryable"] for row in out[1:])


@asynccontextmanager
async def answering_once() -> AsyncIterator[int]:
    """A loopback port that answers one chat request (then closes the
    connection) and stops listening; the port."""
    body = orjson.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )
    async with raw_server(b"application/json", body, once=True) as (port, _):
        yield port


@asynccontextmanager
async def raw_server(
    content_type: bytes, body: bytes, *, once: bool = False
) -> AsyncIterator[tuple[int, list[int]]]:
    """A loopback port answering each request with HTTP 200, ``content_type``
    and ``body`` on a connection of its own; with ``once``, it stops listening
    at its first connection. Yields the port and a list that counts requests."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nConnection: close\r\n" % content_type
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if once:
            server.close()  # no second connection
        request = await reader.readuntil(b"\r\n\r\n")
        found = re.search(rb"(?i)content-length: *(\d+)", request)
        await reader.readexactly(int(found.group(1)) if found else 0)
        seen.append(1)
        writer.write(head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def test_a_streamed_answer_fails_its_row_without_a_retry(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    # Each attempt would be paid, and come back as events again.
    events = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n'
    async with raw_server(b"text/event-stream", events) as (port, seen):
        url = f"http://127.0.0.1:{port}/v1"
        config = make_config(tmp_path, [chat("a"), chat("b")], server, base_url=url)
        summary = await run_async(config, clock=fake_clock)
    assert summary.exit_code == 1
    assert len(seen) == 2
    records = read_jsonl(config.out)
    assert [r["error"]["code"] for r in records] == ["streamed_answer", "streamed_answer"]
    assert not any(r["error"]["retryable"] for r in records)
    assert [r["attempts"] for r in records] == [1, 1]


async def test_a_stopped_run_counts_the_answers_left_waiting_for_an_earlier_row(
    tmp_path: Path, server: MockServer
) -> None:
    # Rows 2-6 are answered while row 1 is slow; row 7's fatal answer stops
    # the run with them journaled, not written: they were still sent and paid
    # for by this run, and the next run writes them as done before.
    prices = {"price_input_per_million": 1_000_000, "price_output_per_million": 1_000_000}
    rows = [chat("slow mock:delay=6"), *(chat(f"quick {i}") for i in range(5))]
    rows.append(chat("mock:quota mock:delay=1.5"))
    config = make_config(tmp_path, rows, server, max_async_requests=8, **prices)

    stopped = await run_async(config)

    assert stopped.exit_code == 3
    assert stopped.rows == 0  # nothing written: row 1 never came
    assert stopped.sent == 5
    assert stopped.cost == pytest.approx(5 * 5.0)  # 2 tokens in, 3 out each
    resumed = await run_async(make_config(tmp_path, rows[:-1], server, **prices))
    assert resumed.exit_code == 0
    assert resumed.sent == 1  # row 1: rows 2-6 were journaled, paid before, and are reused
    assert resumed.cost == pytest.approx(5.0)


async def test_a_row_timed_out_before_a_fatal_answer_stays_in_doubt(
    tmp_path: Path, server: MockServer
) -> None:
    # Row 1's attempt times out (the provider may have done and billed it)
    # and waits to be retried when row 2's fatal answer stops the run: no
    # retry goes out, and row 1 is counted in doubt.
    rows = [chat("slow mock:delay=3"), chat("mock:quota")]
    settings = {"read_timeout": 0.3, "backoff_initial": 2.0, "backoff_max": 2.0}
    # One in flight: row 2 goes once row 1 waits out its backoff (a spare worker).
    config = make_config(
        tmp_path, rows, server, max_async_requests=1, adaptive_concurrency=False, **settings
    )

    stopped = await run_async(config)

    assert stopped.exit_code == 3
    assert server.stats.requests == 2
    assert stopped.extra["in doubt"] == 1


@pytest.mark.parametrize(
    ("key", "flaw"),
    [
        ("sk-abc\r", "holds the character U+000D, which an HTTP header cannot carry"),
        ("sk-a\u2010b", "holds the character U+2010, which an HTTP header cannot carry"),
        (" sk-abc", "starts or ends with a space, which an HTTP header drops"),
    ],
)
async def test_a_key_an_http_header_cannot_carry_is_an_error_before_any_request(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch, key: str, flaw: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", key)
    config = make_config(tmp_path, [chat("x")], server, provider="openai")

    with pytest.raises(UsageError) as caught:
        await run_async(config)
    assert str(caught.value) == f"the API key in OPENAI_API_KEY {flaw}: set it to the key alone"
    assert "sk-a" not in str(caught.value)
    assert server.stats.requests == 0


async def test_missing_key_is_an_error_before_any_request(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = make_config(tmp_path, [chat("x")], server, provider="openai")

    with pytest.raises(UsageError, match="OPENAI_API_KEY"):
        await run_async(config)
    assert server.stats.requests == 0


async def test_missing_input_is_a_usage_error(tmp_path: Path, server: MockServer) -> None:
    config = make_config(tmp_path, [], server, input=tmp_path / "nope.jsonl")

    with pytest.raises(UsageError, match="does not exist"):
        await run_async(config)


async def test_an_input_that_is_no_regular_file_says_what_it_is(
    tmp_path: Path, server: MockServer
) -> None:
    fifo, folder = tmp_path / "pipe.jsonl", tmp_path / "folder.jsonl"
    os.mkfifo(fifo)
    folder.mkdir()
    cases = [(fifo, "is not a regular file (a pipe"), (folder, "is a directory")]
    for path, said in [*cases, (Path("-"), "is no file")]:
        config = make_config(tmp_path, [], server, input=path)
        with pytest.raises(UsageError, match=re.escape(f"input file {path} {said}")):
            await run_async(config)
    assert server.stats.requests == 0


async def test_rows_stopped_while_their_connection_is_made_are_not_in_doubt(
    tmp_path: Path, server: MockServer
) -> None:
    # A host that takes connections and never answers the TLS handshake:
    # every row waits for its connection when the run is stopped. None wrote
    # a byte of its request, so none may be billed: none is in doubt.
    connected = 0
    stop = anyio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connected
        connected += 1
        if connected == 8:  # every row waits for its handshake now
            stop.set()
        await reader.read()  # until the client closes it
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    rows = [chat(f"r{i}") for i in range(8)]
    config = make_config(tmp_path, rows, server, base_url=f"https://127.0.0.1:{port}/v1")
    try:
        with anyio.fail_after(20):
            summary = await run_async(config, stop=stop)
    finally:
        listener.close()

    assert summary.exit_code == 75
    assert summary.extra["in doubt"] == 0


async def test_reorder_window_bounds_how_far_reading_runs_ahead(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("head of line mock:delay=0.6")] + [chat(f"quick {i}") for i in range(300)]
    config = make_config(tmp_path, rows, server, max_async_requests=4, reorder_window=20)
    seen_while_blocked: list[int] = []

    async def watch() -> None:
        await anyio.sleep(0.4)
        seen_while_blocked.append(server.stats.requests)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        summary = await run_async(config, clock=fake_clock)

    # Row 1 holds the window: at most 20 rows were read, so at most 20 were sent.
    assert seen_while_blocked
    assert seen_while_blocked[0] <= 20
    assert summary.ok == 301
    assert [r["line"] for r in read_jsonl(config.out)] == list(range(1, 302))


async def test_the_output_may_not_be_the_input(tmp_path: Path, server: MockServer) -> None:
    config = make_config(tmp_path, [chat("x")], server, out=tmp_path / "in.jsonl")

    with pytest.raises(UsageError, match="is also the input"):
        await run_async(config)
    assert server.stats.requests == 0


async def test_the_summary_setting_is_written_from_python_too(
    tmp_path: Path, server: MockServer
) -> None:
    summary_path = tmp_path / "s.json"
    config = make_config(tmp_path, [chat("a"), chat("b")], server, summary=summary_path)

    summary = await run_async(config)

    assert orjson.loads(summary_path.read_bytes()) == orjson.loads(orjson.dumps(summary.to_dict()))


async def test_signals_from_another_thread_are_a_usage_error(
    tmp_path: Path, server: MockServer
) -> None:
    config = make_config(tmp_path, [chat("a")], server)

    def in_a_thread() -> None:
        with pytest.raises(UsageError, match="handle_signals works only in the main thread"):
            anyio.run(lambda: run_async(config, handle_signals=True))

    await anyio.to_thread.run_sync(in_a_thread)
    assert not config.out.exists()


async def test_a_summary_that_cannot_be_written_whole_leaves_the_last_one(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk part-way through the write: a reader (cron's next check, a
    # dashboard) must see the last whole summary, never an empty or cut one.
    summary_path = tmp_path / "s.json"
    summary_path.write_bytes(b'{"ok": 1}\n')
    summary = await run_async(make_config(tmp_path, [chat("a")], server))
    real_write = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:  # type: ignore[override]
        real_write(self, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    write_summary(summary_path, summary)  # warns, keeps the run's exit code
    monkeypatch.undo()

    assert summary_path.read_bytes() == b'{"ok": 1}\n'
    assert [name for name in os.listdir(tmp_path) if "s.json" in name] == ["s.json"]  # no .tmp


@pytest.mark.parametrize("kept", ["out", "input"])
async def test_the_summary_never_writes_over_a_file_named_like_its_temporary(
    tmp_path: Path, server: MockServer, kept: str
) -> None:
    # The summary was written to "SUMMARY.tmp", then renamed over SUMMARY:
    # --summary answers with --out answers.tmp (or the input answers.tmp)
    # wrote the summary over that file, then moved it away.
    named = tmp_path / "answers.tmp"
    settings: dict[str, object] = {"summary": tmp_path / "answers"}
    if kept == "out":
        settings["out"] = named
    else:
        write_jsonl(named, [chat("a"), chat("b")])
        settings["input"] = named
    config = make_config(tmp_path, [chat("a"), chat("b")], server, **settings)

    summary = await run_async(config)

    assert summary.exit_code == 0
    assert len(read_jsonl(named)) == 2  # still the output's answers, or the input's rows
    assert orjson.loads((tmp_path / "answers").read_bytes())["ok"] == 2
