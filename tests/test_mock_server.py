"""Tests of the simulated provider in ``batchrun.mock.server``."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from multidict import CIMultiDictProxy

from batchrun.mock.server import MockServer, parse_directives

KEY = "test-key"
CHAT = "/chat/completions"
DASHSCOPE = "/services/aigc/text-generation/generation"


@pytest_asyncio.fixture
async def server() -> AsyncIterator[MockServer]:
    async with MockServer() as srv:
        yield srv


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": text}], **extra}


def dashscope_body(text: str) -> dict[str, Any]:
    return {"model": "qwen", "input": {"messages": [{"role": "user", "content": text}]}}


async def post_raw(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    key: str | None = KEY,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    """POST ``body`` (bytes as is, anything else as orjson); return status, body, headers."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with session.post(url, data=data, headers=headers, timeout=client_timeout) as resp:
        return resp.status, await resp.read(), resp.headers


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, key: str | None = KEY
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """Like ``post_raw`` but decode the answer as JSON."""
    status, raw, headers = await post_raw(session, url, body, key)
    return status, orjson.loads(raw), headers


def canonical_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def request_id(body: dict[str, Any]) -> str:
    return "req-" + canonical_digest(body)[:16]


@pytest.fixture
def no_server_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Yield caplog; the test checks it saw no aiohttp warnings or tracebacks."""
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    return caplog


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []


@pytest.mark.asyncio
async def test_chat_answer_is_deterministic(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    body = chat_body("hello there world")
    status, first, headers = await post(session, server.base_url + CHAT, body)
    reordered = dict(reversed(body.items()))
    _, second, _ = await post(session, server.base_url + CHAT, reordered)
    digest = canonical_digest(body)
    assert orjson.dumps(reordered) != orjson.dumps(body)
    assert status == 200
    assert first == second  # the same request, whatever the order of its keys
    assert headers["x-request-id"] == request_id(body)
    assert first["id"] == "chatcmpl-" + digest[:12]
    assert first["object"] == "chat.completion"
    assert first["model"] == "m1"
    choice = first["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello there world"}
    assert choice["finish_reason"] == "stop"
    assert first["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert server.stats.by_digest[digest] == 2


@pytest.mark.asyncio
async def test_chat_echoes_last_message_and_list_parts_capped(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    long_text = "x" * 500
    parts = [
        {"type": "text", "text": "see"},
        {"type": "image_url"},
        {"type": "text", "text": long_text},
    ]
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": parts},
        ]
    }
    url = f"http://127.0.0.1:{server.port}/compatible-mode/v1{CHAT}"
    status, answer, _ = await post(session, url, body)
    assert status == 200
    assert answer["model"] == "mock"
    assert answer["choices"][0]["message"]["content"] == "echo: see\n" + "x" * 196
    assert answer["usage"]["prompt_tokens"] == 4


@pytest.mark.asyncio
async def test_completions(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = {"model": "c1", "prompt": ["one two", "three"]}
    status, answer, _ = await post(session, server.base_url + "/completions", body)
    assert status == 200
    assert answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-")
    assert answer["choices"] == [{"index": 0, "text": "echo: three", "finish_reason": "stop"}]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.mark.asyncio
async def test_embeddings(server: MockServer, session: aiohttp.ClientSession) -> None:
    url = server.base_url + "/embeddings"
    status, answer, _ = await post(session, url, {"model": "e1", "input": ["a b", "c"]})
    _, single, _ = await post(session, url, {"input": "c"})
    assert status == 200
    assert answer["object"] == "list"
    assert answer["model"] == "e1"
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [item["index"] for item in answer["data"]] == [0, 1]
    vectors = [item["embedding"] for item in answer["data"]]
    assert all(len(v) == 8 and all(-1.0 <= x <= 1.0 for x in v) for v in vectors)
    assert vectors[0] != vectors[1]
    assert single["data"][0]["embedding"] == vectors[1]


@pytest.mark.asyncio
async def test_dashscope_native(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = dashscope_body("ni hao")
    status, answer, headers = await post(session, server.dashscope_base_url + DASHSCOPE, body)
    assert status == 200
    assert answer["request_id"] == headers["x-request-id"] == request_id(body)
    assert answer["output"]["choices"] == [
        {"finish_reason": "stop", "message": {"role": "assistant", "content": "echo: ni hao"}}
    ]
    assert answer["usage"] == {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}


@pytest.mark.asyncio
async def test_bad_key_is_echoed_in_full(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await post(session, server.base_url + CHAT, chat_body("hi"), key="bad-key")
    assert status == 401
    assert answer["error"]["code"] == "invalid_api_key"
    assert answer["error"]["type"] == "invalid_request_error"
    assert "Incorrect API key provided: bad-key." in answer["error"]["message"]
    url = server.dashscope_base_url + DASHSCOPE
    status, answer, _ = await post(session, url, dashscope_body("hi"), key="bad-key")
    assert status == 401
    assert answer["code"] == "InvalidApiKey"
    assert answer["message"] == "Invalid API-key provided: bad-key"
    assert answer["request_id"] == request_id(dashscope_body("hi"))


@pytest.mark.asyncio
@pytest.mark.parametrize("header", [None, "Bearer ", "Basic abc"])
async def test_missing_auth_is_401(
    server: MockServer, session: aiohttp.ClientSession, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with session.post(server.base_url + CHAT, json=chat_body("hi"), headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"


@pytest.mark.asyncio
async def test_body_not_a_json_object_is_400(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await post(session, server.base_url + CHAT, [1, 2])
    assert status == 400
    assert answer["error"]["code"] == "invalid_request_error"
    url = server.dashscope_base_url + DASHSCOPE
    async with session.post(url, data=b"{nope", headers={"Authorization": "Bearer k"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == "InvalidParameter"


@pytest.mark.asyncio
async def test_fail_twice_then_ok_with_retry_after(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    body = chat_body("row 7 mock:fail=429x2 mock:retry_after=3")
    answers = [await post(session, server.base_url + CHAT, body) for _ in range(3)]
    assert [status for status, _, _ in answers] == [429, 429, 200]
    for _, answer, headers in answers[:2]:
        assert answer["error"]["code"] == "rate_limit_exceeded"
        assert headers["Retry-After"] == "3"
    assert "Retry-After" not in answers[2][2]
    assert server.stats.statuses[429] == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "openai_code", "dashscope_code"),
    [
        (429, "rate_limit_exceeded", "Throttling.RateQuota"),
        (500, "server_error", "InternalError"),
        (400, "invalid_request_error", "InvalidParameter"),
        (403, "invalid_request_error", "AccessDenied"),
    ],
)
async def test_fail_every_attempt_in_both_dialects(
    server: MockServer,
    session: aiohttp.ClientSession,
    code: int,
    openai_code: str,
    dashscope_code: str,
) -> None:
    text = f"mock:fail={code}"
    for _ in range(2):
        status, answer, _ = await post(session, server.base_url + CHAT, chat_body(text))
        assert (status, answer["error"]["code"]) == (code, openai_code)
        url = server.dashscope_base_url + DASHSCOPE
        status, answer, _ = await post(session, url, dashscope_body(text))
        assert (status, answer["code"]) == (code, dashscope_code)


@pytest.mark.asyncio
async def test_quota(server: MockServer, session: aiohttp.ClientSession) -> None:
    status, answer, _ = await post(session, server.base_url + CHAT, chat_body("mock:quota"))
    assert (status, answer["error"]["code"]) == (429, "insufficient_quota")
    url = server.dashscope_base_url + DASHSCOPE
    status, answer, _ = await post(session, url, dashscope_body("mock:quota"))
    assert (status, answer["code"]) == (400, "Arrearage")


@pytest.mark.asyncio
async def test_reset_drops_the_connection_then_recovers(
    server: MockServer, session: aiohttp.ClientSession, no_server_logs: pytest.LogCaptureFixture
) -> None:
    body = chat_body("mock:reset=1")
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, server.base_url + CHAT, body)
    status, _, _ = await post(session, server.base_url + CHAT, body)
    assert status == 200
    assert server.stats.statuses == {0: 1, 200: 1}
    assert_quiet(no_server_logs)


@pytest.mark.asyncio
async def test_truncate_gives_a_payload_error(
    server: MockServer, session: aiohttp.ClientSession, no_server_logs: pytest.LogCaptureFixture
) -> None:
    body = chat_body("mock:truncate=1")
    data, auth = orjson.dumps(body), {"Authorization": f"Bearer {KEY}"}
    async with session.post(server.base_url + CHAT, data=data, headers=auth) as resp:
        assert resp.status == 200
        assert resp.content_length is not None
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    status, answer, _ = await post(session, server.base_url + CHAT, body)
    assert status == 200
    assert answer["choices"][0]["message"]["content"] == "echo: mock:truncate=1"
    assert server.stats.statuses == {0: 1, 200: 1}
    assert_quiet(no_server_logs)


@pytest.mark.asyncio
async def test_badjson(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = chat_body("mock:badjson=1")
    status, raw, headers = await post_raw(session, server.base_url + CHAT, body)
    assert (status, raw) == (200, b'{"choices": [')
    assert headers["Content-Type"] == "application/json"
    status, _, _ = await post(session, server.base_url + CHAT, body)
    assert status == 200


@pytest.mark.asyncio
async def test_delay_overlaps_and_counts_in_flight(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    url = server.base_url + CHAT
    started = time.monotonic()
    answers = await asyncio.gather(
        *(post(session, url, chat_body(f"row {i} mock:delay=0.3")) for i in range(5))
    )
    elapsed = time.monotonic() - started
    assert [status for status, _, _ in answers] == [200] * 5
    assert 0.3 <= elapsed < 1.2
    assert server.stats.max_in_flight == 5
    assert server.stats.in_flight == 0


@pytest.mark.asyncio
async def test_latency_applies_to_every_answer(session: aiohttp.ClientSession) -> None:
    async with MockServer(latency=0.2) as srv:
        started = time.monotonic()
        status, _, _ = await post(session, srv.base_url + CHAT, chat_body("hi"), key=None)
        assert status == 401
        assert time.monotonic() - started >= 0.2


@pytest.mark.asyncio
async def test_client_giving_up_cancels_the_handler(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(asyncio.TimeoutError):
        await post_raw(
            session, server.base_url + CHAT, chat_body("mock:delay=30"), client_timeout=timeout
        )
    for _ in range(100):
        if server.stats.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert server.stats.in_flight == 0
    assert server.stats.statuses == {0: 1}


@pytest.mark.asyncio
async def test_fail_rate_one_is_always_503(session: aiohttp.ClientSession) -> None:
    async with MockServer(fail_rate=1.0) as srv:
        status, answer, _ = await post(session, srv.base_url + CHAT, chat_body("hi"))
        assert (status, answer["error"]["code"]) == (503, "server_error")
        url = srv.dashscope_base_url + DASHSCOPE
        status, answer, _ = await post(session, url, dashscope_body("hi"))
        assert (status, answer["code"]) == (503, "InternalError")


@pytest.mark.asyncio
async def test_fail_rate_is_reproducible_for_a_seed(session: aiohttp.ClientSession) -> None:
    runs = []
    for _ in range(2):
        async with MockServer(fail_rate=0.5, seed=7) as srv:
            url = srv.base_url + CHAT
            runs.append([(await post(session, url, chat_body(f"r{i}")))[0] for i in range(20)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 503}


@pytest.mark.asyncio
async def test_stats_route_and_reset(server: MockServer, session: aiohttp.ClientSession) -> None:
    await post(session, server.base_url + CHAT, chat_body("hi"))
    await post(session, server.base_url + CHAT, chat_body("hi"), key="bad-key")
    async with session.get(f"http://127.0.0.1:{server.port}/_mock/stats") as resp:
        stats = await resp.json()
    assert stats == {
        "requests": 2,
        "in_flight": 0,
        "max_in_flight": 1,
        "statuses": {"200": 1, "401": 1},
    }
    server.stats.reset()
    assert server.stats.requests == 0
    assert not server.stats.statuses
    assert not server.stats.by_digest


def test_parse_directives() -> None:
    rules = parse_directives(
        "a mock:delay=0.5 mock:fail=503x3 b\nmock:reset=2 mock:nope=1 mock:quota"
    )
    assert (rules.delay, rules.fail, rules.fail_times, rules.reset) == (0.5, 503, 3, 2)
    assert rules.quota
    bad = parse_directives("mock:delay=x mock:fail=200 mock:reset=-1 mock:badjson mock:delay=inf")
    assert (bad.delay, bad.fail, bad.reset, bad.badjson) == (0.0, None, 0, 0)
    assert parse_directives("mock:fail=500").fail_times is None
    assert parse_directives("mock:fail=500xz").fail is None
    assert parse_directives("plain text") == parse_directives("")


def test_serve_prints_its_address_and_stops_on_sigterm() -> None:
    code = (
        "from batchrun.mock.server import serve\n"
        "serve(host='127.0.0.1', port=0, latency=0, fail_rate=0)"
    )
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    origin = line.split()[4]
    assert origin.startswith("http://127.0.0.1:")
    assert (
        line
        == f"mock server listening on {origin} (openai: {origin}/v1, dashscope: {origin}/api/v1)"
    )


def test_parse_slow_and_big_directives() -> None:
    rules = parse_directives("mock:trickle=0.5x2 mock:hang102=1 mock:huge=1000 mock:chunked")
    assert (rules.trickle, rules.trickle_times, rules.hang102) == (0.5, 2, 1)
    assert (rules.huge, rules.chunked) == (1000, True)
    always = parse_directives("mock:trickle=1")
    assert (always.trickle, always.trickle_times) == (1.0, None)
    assert parse_directives("mock:trickle=1xq").trickle == 0.0


@pytest.mark.asyncio
async def test_trickle_sends_headers_at_once_then_a_byte_at_a_time(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    body, auth = chat_body("mock:trickle=0.05x1"), {"Authorization": f"Bearer {KEY}"}
    started = time.monotonic()
    async with session.post(server.base_url + CHAT, json=body, headers=auth) as resp:
        headers_after = time.monotonic() - started
        first = await resp.content.read(1)
        rest = await resp.content.read(5)
    assert resp.status == 200
    assert headers_after < 0.5
    assert len(first) == 1
    assert 1 <= len(rest) <= 2  # the next bytes are not there yet
    status, answer, _ = await post(session, server.base_url + CHAT, body)  # attempt 2: at once
    assert status == 200
    assert answer["choices"][0]["message"]["content"] == "echo: mock:trickle=0.05x1"


@pytest.mark.asyncio
async def test_hang102_answers_processing_then_nothing(server: MockServer) -> None:
    request = orjson.dumps(chat_body("mock:hang102=1"))
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = (
        f"POST /v1{CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(request)}\r\n\r\n"
    )
    writer.write(head.encode() + request)
    line = await asyncio.wait_for(reader.readline(), 2)
    assert line == b"HTTP/1.1 102 Processing\r\n"
    assert await asyncio.wait_for(reader.readline(), 2) == b"\r\n"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.5)
    writer.close()
    await writer.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("chunked", [False, True])
async def test_huge_pads_the_answer_to_the_size_asked(
    server: MockServer, session: aiohttp.ClientSession, chunked: bool
) -> None:
    text = "mock:huge=300000" + (" mock:chunked" if chunked else "")
    auth = {"Authorization": f"Bearer {KEY}"}
    async with session.post(server.base_url + CHAT, json=chat_body(text), headers=auth) as resp:
        raw = await resp.read()
        length = resp.content_length
    assert len(raw) == 300_000
    assert length == (None if chunked else 300_000)
    assert orjson.loads(raw)["choices"][0]["message"]["content"].startswith("echo: mock:huge")


@pytest.mark.asyncio
async def test_sliding_window_rate_limit_counts_the_last_second(
    session: aiohttp.ClientSession,
) -> None:
    async with MockServer(rate_limit=3, sliding_window=True) as limited:
        url = limited.base_url + CHAT
        first = [await post(session, url, chat_body(f"row {i}")) for i in range(5)]
        assert [status for status, _, _ in first] == [200, 200, 200, 429, 429]
        assert first[3][2]["Retry-After"] == "1"
        await asyncio.sleep(1.05)  # the first three leave the window together
        again = [await post(session, url, chat_body(f"again {i}")) for i in range(4)]
        assert [status for status, _, _ in again] == [200, 200, 200, 429]
