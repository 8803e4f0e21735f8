"""--response-schema against the real mock: JSON asked for, answers checked,
paid retries counted, truncated answers failed at once, bad schemas refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from batchrun.errors import UsageError
from batchrun.export import export
from batchrun.jobfile import build_config
from batchrun.mock.batches import BatchFaults
from batchrun.mock.server import MockServer
from batchrun.records import Request, parse_line
from batchrun.runner import Clock, run_async
from tests.conftest import chat, make_config, read_jsonl, write_jsonl
from tests.test_cli import abatchrun, batchrun

pytestmark = pytest.mark.timeout(30)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"echo": {"type": "string"}, "words": {"type": "integer"}},
    "required": ["echo", "words"],
}


def _schema_file(tmp_path: Path, schema: Any = SCHEMA) -> Path:
    path = tmp_path / "schema.json"
    path.write_bytes(orjson.dumps(schema))
    return path


async def _run(
    tmp_path: Path, server: MockServer, clock: Clock, rows: list[dict[str, Any]], **settings: Any
) -> tuple[Any, list[dict[str, Any]]]:
    config = make_config(tmp_path, rows, server, response_schema=_schema_file(tmp_path), **settings)
    summary = await run_async(config, clock=clock)
    return summary, read_jsonl(config.out)


@pytest.mark.asyncio
async def test_good_answers_carry_the_parsed_object(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("first question", custom_id="a"), chat("the second one", custom_id="b")]

    summary, records = await _run(tmp_path, server, fake_clock, rows)

    assert summary.exit_code == 0
    assert server.stats.requests == 2
    assert [r["parsed"] for r in records] == [
        {"echo": "first question", "words": 2},
        {"echo": "the second one", "words": 3},
    ]
    assert summary.extra["answers not JSON (paid)"] == 0
    export(tmp_path / "out.jsonl", tmp_path / "t.parquet")
    parsed = pq.read_table(tmp_path / "t.parquet").column("parsed").to_pylist()
    assert [orjson.loads(text) for text in parsed] == [r["parsed"] for r in records]


@pytest.mark.asyncio
async def test_not_json_then_good_is_retried_and_counted(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("prose twice mock:notjson=2"), chat("fine at once")]

    summary, records = await _run(tmp_path, server, fake_clock, rows, max_attempts=4)

    assert summary.exit_code == 0
    assert server.stats.requests == 4  # 3 for the first row, 1 for the second
    assert records[0]["attempts"] == 3
    assert records[0]["parsed"]["echo"] == "prose twice mock:notjson=2"
    assert summary.extra["answers not JSON (paid)"] == 2
    assert summary.extra["answers off the schema (paid)"] == 0


@pytest.mark.asyncio
async def test_always_the_wrong_shape_fails_after_max_attempts(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("never right mock:wrongshape")]

    summary, (record,) = await _run(tmp_path, server, fake_clock, rows, max_attempts=3)

    assert summary.exit_code == 1
    assert server.stats.requests == 3
    assert record["attempts"] == 3
    assert record["error"]["code"] == "schema_mismatch"
    assert "'echo' is a required property" in record["error"]["message"]
    raw = record["response"]["body"]["choices"][0]["message"]["content"]
    assert orjson.loads(raw) == {"unexpected": True}  # the raw answer is kept
    assert "parsed" not in record
    assert summary.extra["answers off the schema (paid)"] == 3
    assert summary.to_dict()["failed_by_code"] == {"schema_mismatch": 1}


@pytest.mark.asyncio
async def test_answers_off_the_schema_are_paid_for_in_cost_and_budget(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    # Every answer is billed, the ones the schema refuses too: the record's
    # cost, the summary and --max-cost count each of them.
    prices = {"price_input_per_million": 1_000_000, "price_output_per_million": 1_000_000}
    rows = [chat("never right mock:wrongshape"), chat("twice off mock:wrongshape=2")]
    summary, records = await _run(tmp_path, server, fake_clock, rows, max_attempts=3, **prices)
    per_answer = [
        r["response"]["body"]["usage"]["prompt_tokens"]
        + r["response"]["body"]["usage"]["completion_tokens"]
        for r in records
    ]
    assert records[0]["cost"] == 3 * per_answer[0]  # three answers, all off the schema
    assert records[1]["cost"] > per_answer[1]  # the good answer, and the two before it
    assert summary.cost == sum(r["cost"] for r in records)
    assert summary.tokens_in + summary.tokens_out == summary.cost
    capped = make_config(
        tmp_path,
        [chat(f"row {i} mock:wrongshape") for i in range(40)],
        server,
        out=tmp_path / "capped.jsonl",
        response_schema=_schema_file(tmp_path),
        max_attempts=3,
        max_cost=200,
        max_async_requests=1,
        **prices,
    )
    sent = server.stats.requests
    stopped = await run_async(capped, clock=fake_clock)
    assert stopped.exit_code == 5
    paid = (server.stats.requests - sent) * per_answer[0]
    assert stopped.cost == paid <= 200 + 3 * per_answer[0]  # the cap, past it by one row at most


@pytest.mark.asyncio
async def test_a_truncated_answer_fails_at_once(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("cut short mock:length")]

    summary, (record,) = await _run(tmp_path, server, fake_clock, rows, max_attempts=5)

    assert server.stats.requests == 1
    assert record["error"]["code"] == "truncated"
    assert record["error"]["retryable"] is False
    assert record["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert summary.extra["answers cut off (paid)"] == 1


@pytest.mark.asyncio
async def test_dashscope_native_asks_for_a_json_object(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    native = {"custom_id": "n", "input": {"messages": [{"role": "user", "content": "native q"}]}}
    rows = [chat("translated q mock:notjson=1", custom_id="t"), native]

    summary, records = await _run(
        tmp_path,
        server,
        fake_clock,
        rows,
        provider="dashscope",
        base_url=server.dashscope_base_url,
    )

    # The mock answers JSON only to a request whose parameters ask for it.
    assert summary.exit_code == 0
    assert [r["parsed"] for r in records] == [
        {"echo": "translated q mock:notjson=1", "words": 3},
        {"echo": "native q", "words": 2},
    ]
    assert server.stats.requests == 3


def test_the_request_shape_per_dialect(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("q")])
    schema = _schema_file(tmp_path)

    def defaults(provider: str) -> Any:
        return build_config(
            {
                "input": source,
                "out": tmp_path / "o",
                "provider": provider,
                "response_schema": schema,
            }
        ).request_defaults()

    openai_chat = parse_line(orjson.dumps(chat("q")), 1, defaults("openai"))
    embedding = parse_line(b'{"input": "x"}', 2, defaults("openai"))
    native = parse_line(
        b'{"input": {"messages": [{"role": "user", "content": "q"}]}}', 3, defaults("dashscope")
    )

    assert isinstance(openai_chat, Request)
    assert openai_chat.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": SCHEMA},
    }
    assert isinstance(embedding, Request)
    assert "response_format" not in embedding.body
    assert isinstance(native, Request)
    assert native.body["parameters"]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"type": "nope"}', "not a valid JSON Schema"),
        (b"{not json", "is not JSON"),
        (b"[1, 2]", "must hold a JSON object"),
    ],
)
def test_a_bad_schema_is_a_usage_error(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "schema.json"
    path.write_bytes(content)

    with pytest.raises(UsageError, match=why):
        build_config({"input": "in.jsonl", "out": "out.jsonl", "response_schema": path})
    checked = batchrun("validate", "--response-schema", path)

    assert checked.returncode == 2
    assert why in checked.stderr


def test_validate_accepts_a_good_schema(tmp_path: Path) -> None:
    checked = batchrun("validate", "--response-schema", _schema_file(tmp_path))

    assert checked.returncode == 0
    assert "valid JSON Schema" in checked.stdout


BATCH = {"mode": "batch", "poll_interval": 0.05}


@pytest.mark.asyncio
async def test_batch_mode_checks_each_answer_as_online_mode_does(tmp_path: Path) -> None:
    rows = [
        chat("first question", custom_id="a"),
        chat("off the shape mock:wrongshape", custom_id="b"),
        chat("prose mock:notjson", custom_id="c"),
        chat("cut short mock:length", custom_id="d"),
        {"custom_id": "e", "input": "embed this", "model": "emb"},
    ]
    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as batches:
        config = make_config(
            tmp_path, rows, batches, response_schema=_schema_file(tmp_path), **BATCH
        )
        summary = await run_async(config)
        assert batches.stats.requests == 0  # all in batches
    records = read_jsonl(config.out)

    assert summary.exit_code == 1
    good, wrong, prose, cut, embedded = records
    assert good["parsed"] == {"echo": "first question", "words": 2}
    assert embedded["error"] is None
    assert embedded["parsed"] is None  # an answer without text passes as null
    # A failed check is the row's error, with the paid answer kept; it is not
    # sent again in a batch: retryable, for --retry-failed to resend online.
    assert (wrong["error"]["code"], wrong["error"]["retryable"]) == ("schema_mismatch", True)
    assert (prose["error"]["code"], prose["error"]["retryable"]) == ("invalid_json", True)
    assert (cut["error"]["code"], cut["error"]["retryable"]) == ("truncated", False)
    assert orjson.loads(wrong["response"]["body"]["choices"][0]["message"]["content"]) == {
        "unexpected": True
    }
    assert summary.extra["answers off the schema (paid)"] == 1
    assert summary.extra["answers not JSON (paid)"] == 1
    assert summary.extra["answers cut off (paid)"] == 1
    assert summary.to_dict()["failed_by_code"] == {
        "schema_mismatch": 1,
        "invalid_json": 1,
        "truncated": 1,
    }


@pytest.mark.asyncio
async def test_batch_lines_ask_for_json_and_good_answers_equal_online_modes(
    tmp_path: Path,
) -> None:
    rows = [chat(f"question {i}", custom_id=f"q{i}") for i in range(4)]
    schema = _schema_file(tmp_path)
    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as batches:
        batch = make_config(
            tmp_path, rows, batches, response_schema=schema, keep_files=True, **BATCH
        )
        assert (await run_async(batch)).exit_code == 0
        (sent,) = [
            orjson.loads(line)
            for batch_file in batches.batches.batches.values()
            for line in batches.batches.contents[batch_file.info["input_file_id"]].splitlines()
        ][:1]
    assert sent["body"]["response_format"]["json_schema"]["schema"] == SCHEMA
    async with MockServer() as online_server:
        online = make_config(
            tmp_path, rows, online_server, response_schema=schema, out=tmp_path / "online.jsonl"
        )
        assert (await run_async(online)).exit_code == 0
    assert batch.out.read_bytes() == online.out.read_bytes()


@pytest.mark.asyncio
async def test_a_batch_answer_off_the_schema_is_resent_online_by_retry_failed(
    tmp_path: Path,
) -> None:
    rows = [chat("fine", custom_id="a"), chat("off the shape mock:wrongshape=1", custom_id="b")]
    schema = _schema_file(tmp_path)
    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as server:
        first = make_config(tmp_path, rows, server, response_schema=schema, **BATCH)
        assert (await run_async(first)).exit_code == 1
        again = make_config(tmp_path, rows, server, response_schema=schema, retry_failed=True)
        summary = await run_async(again)
        assert server.stats.requests == 1  # only the failed row, online
    assert summary.exit_code == 0
    assert [r["parsed"]["echo"] for r in read_jsonl(again.out)] == [
        "fine",
        "off the shape mock:wrongshape=1",
    ]


@pytest.mark.asyncio
async def test_an_invalid_schema_exits_2_before_any_request(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("q")])
    bad = _schema_file(tmp_path, {"type": "object", "required": "echo"})

    done = await abatchrun(
        "run", source, "--out", tmp_path / "o.jsonl", "--provider", "mock",
        "--base-url", server.base_url, "--response-schema", bad, "--no-progress",
    )  # fmt: skip

    assert done.returncode == 2
    assert b"not a valid JSON Schema" in done.stderr
    assert server.stats.requests == 0


@pytest.mark.asyncio
async def test_a_stored_answer_keeps_its_parsed_object(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("kept answer")]
    cache = tmp_path / "cache"
    await _run(tmp_path, server, fake_clock, rows, cache=cache)

    summary, (record,) = await _run(
        tmp_path, server, fake_clock, rows, cache=cache, out=tmp_path / "again.jsonl"
    )

    assert server.stats.requests == 1  # the second run took the stored answer
    assert summary.exit_code == 0
    assert record["parsed"] == {"echo": "kept answer", "words": 2}


OTHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}


@pytest.mark.asyncio
async def test_a_stored_answer_off_this_runs_schema_is_sent_again(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DashScope's native request asks for a JSON object whatever the schema:
    # the content key is the same under either schema, the check is not.
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    native = {"custom_id": "n", "input": {"messages": [{"role": "user", "content": "native q"}]}}
    cache, dialect = tmp_path / "cache", {"provider": "dashscope"}
    first, _ = await _run(
        tmp_path, server, fake_clock, [native], cache=cache, **dialect,
        base_url=server.dashscope_base_url,
    )  # fmt: skip
    assert first.exit_code == 0
    other = tmp_path / "other.json"
    other.write_bytes(orjson.dumps(OTHER_SCHEMA))
    config = make_config(
        tmp_path, [native], server, response_schema=other, cache=cache,
        out=tmp_path / "other.jsonl", base_url=server.dashscope_base_url,
        max_attempts=1, **dialect,
    )  # fmt: skip
    summary = await run_async(config, clock=fake_clock)
    (record,) = read_jsonl(config.out)
    assert server.stats.requests == 2  # sent again: the stored answer fails this schema
    assert record["error"]["code"] == "schema_mismatch"
    assert "reused" not in record
    assert summary.extra["answers off the schema (paid)"] == 1  # the fresh answer only
    # Under the first schema the stored answer is still good.
    again, (kept,) = await _run(
        tmp_path, server, fake_clock, [native], cache=cache, out=tmp_path / "again.jsonl",
        base_url=server.dashscope_base_url, **dialect,
    )  # fmt: skip
    assert server.stats.requests == 2
    assert (again.exit_code, kept["reused"]) == (0, True)
    assert kept["parsed"] == {"echo": "native q", "words": 2}


async def _stored_then_checked(
    tmp_path: Path, server: MockServer, clock: Clock, row: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """``row`` answered by a run without a schema into a cache, then run again
    with the schema and that cache: the second run's summary and record."""
    plain = make_config(tmp_path, [row], server, cache=tmp_path / "cache")
    assert (await run_async(plain, clock=clock)).exit_code == 0
    assert "parsed" not in read_jsonl(plain.out)[0]
    summary, (record,) = await _run(
        tmp_path, server, clock, [row], cache=tmp_path / "cache", out=tmp_path / "b.jsonl"
    )
    return summary, record


@pytest.mark.asyncio
async def test_a_stored_answer_gets_parsed_under_a_schema_it_was_not_checked_by(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    # The line asks for JSON itself, so the body is the same with and without
    # --response-schema; the first run checked nothing.
    row = chat("own format", response_format={"type": "json_object"})
    summary, record = await _stored_then_checked(tmp_path, server, fake_clock, row)
    assert server.stats.requests == 1
    assert (summary.exit_code, record["reused"]) == (0, True)
    assert record["parsed"] == {"echo": "own format", "words": 2}


@pytest.mark.asyncio
async def test_batch_mode_plans_a_row_whose_stored_answer_fails_the_schema(
    tmp_path: Path,
) -> None:
    row = chat("own format", response_format={"type": "json_object"})
    other = tmp_path / "other.json"
    other.write_bytes(orjson.dumps(OTHER_SCHEMA))
    cache = tmp_path / "cache"
    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as batches:
        plain = make_config(tmp_path, [row, chat("plain")], batches, cache=cache)
        assert (await run_async(plain)).exit_code == 0
        config = make_config(
            tmp_path, [row, chat("plain")], batches, response_schema=other, cache=cache,
            out=tmp_path / "b.jsonl", **BATCH,
        )  # fmt: skip
        summary = await run_async(config)
        # The stored answer to row 1 fails this schema: it goes in a batch.
        # Row 2's body now asks for the schema: a new request, batched too.
        assert (batches.stats.requests, batches.stats.batch_rows) == (2, 2)
    assert summary.extra["answered in batches"] == 2
    assert [r.get("reused") for r in read_jsonl(config.out)] == [None, None]


@pytest.mark.parametrize(
    ("text", "huge"),
    [
        ('{"id": 123456789012345678901}', True),
        ('{"id": -9223372036854775809}', True),
        ('{"id": 18446744073709551615, "n": -9223372036854775808}', False),
        ('{"id": "123456789012345678901"}', False),  # a string keeps its digits
        ('{"x": 1.23456789012345678901}', False),  # a float is a float
        ('{"id": ' + "9" * 300 + "}", True),
    ],
)
def test_an_integer_past_64_bits_in_an_answer_fails_the_check(
    tmp_path: Path, text: str, huge: bool
) -> None:
    from batchrun.errors import TransientError
    from batchrun.records import Response
    from batchrun.schema import AnswerCheck, load_response_schema

    check = AnswerCheck(load_response_schema(_schema_file(tmp_path, {})))
    body = {"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}
    answer = Response(status_code=200, request_id="r", body=body)
    if not huge:
        assert check.classify(answer) == orjson.loads(text)
        return
    with pytest.raises(TransientError, match="an integer past 64 bits") as caught:
        check.classify(answer)
    assert caught.value.code == "invalid_json"
    assert check.failures["invalid_json"] == 1  # a paid answer


@pytest.mark.asyncio
async def test_batch_answers_off_the_schema_are_paid_for_in_cost(tmp_path: Path) -> None:
    prices = {"price_input_per_million": 1_000_000, "price_output_per_million": 1_000_000}
    rows = [chat("good one"), chat("off mock:wrongshape"), chat("prose mock:notjson")]
    async with MockServer(batch_faults=BatchFaults(seconds=0.1)) as batches:
        config = make_config(
            tmp_path, rows, batches, response_schema=_schema_file(tmp_path), **BATCH, **prices
        )
        summary = await run_async(config)
    records = read_jsonl(config.out)
    assert [r["error"] and r["error"]["code"] for r in records] == [
        None,
        "schema_mismatch",
        "invalid_json",
    ]
    for record in records:  # each answer paid at the batch price (half)
        usage = record["response"]["body"]["usage"]
        assert record["cost"] == (usage["prompt_tokens"] + usage["completion_tokens"]) / 2
    assert summary.cost == sum(r["cost"] for r in records)
    assert summary.tokens_in + summary.tokens_out == 2 * summary.cost


@pytest.mark.asyncio
async def test_a_stored_answer_cut_off_is_reused_as_the_cut_not_paid_again(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    # Stored by a run without a schema; this run's check fails it for good
    # (a resend would pay for the same cut), so it is reused as that error.
    row = chat("cut mock:length", response_format={"type": "json_object"})
    summary, record = await _stored_then_checked(tmp_path, server, fake_clock, row)
    assert server.stats.requests == 1
    assert summary.exit_code == 1
    assert (record["error"]["code"], record["error"]["retryable"]) == ("truncated", False)
    assert record["reused"] is True
    assert record["response"]["body"]["choices"][0]["finish_reason"] == "length"
