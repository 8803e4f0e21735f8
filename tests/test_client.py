"""The client: transport failures and HTTP answers become batchrun errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from multidict import CIMultiDict

from batchrun.client import Client, open_session, redact
from batchrun.config import Limits, Timeouts
from batchrun.errors import FatalError, RowError, TransientError
from batchrun.mock.server import MockServer
from batchrun.providers import get_provider
from batchrun.records import Request

pytestmark = pytest.mark.asyncio


def request(text: str = "hi", **body: object) -> Request:
    return Request(
        line=1,
        custom_id="c1",
        kind="chat",
        body={"messages": [{"role": "user", "content": text}], **body},
    )


async def send(
    base_url: str,
    req: Request,
    *,
    key: str = "sk-0123456789",
    write: float = 60.0,
    read: float = 300.0,
) -> object:
    async with open_session(Limits(), Timeouts(read=read, write=write)) as session:
        client = Client(session, get_provider("openai"), base_url=base_url, api_key=key)
        return await client.send(req)


async def test_success_carries_status_request_id_and_body(server: MockServer) -> None:
    response = await send(server.base_url, request("hello"))

    assert response.status_code == 200  # type: ignore[attr-defined]
    assert response.request_id.startswith("req-")  # type: ignore[attr-defined]
    assert response.body["choices"][0]["message"]["content"] == "echo: hello"  # type: ignore[attr-defined]


async def test_pool_reuses_connections(server: MockServer) -> None:
    """Ten sequential calls through one session open one connection."""
    async with open_session(Limits(), Timeouts()) as session:
        client = Client(session, get_provider("openai"), base_url=server.base_url, api_key="k")
        for i in range(10):
            await client.send(request(f"n{i}"))
        assert session.open_connections == 1


async def test_rate_limited_answer_is_transient_with_retry_after(server: MockServer) -> None:
    with pytest.raises(TransientError) as caught:
        await send(server.base_url, request("x mock:fail=429 mock:retry_after=3"))

    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.status == 429
    assert caught.value.retry_after == 3.0


async def test_client_error_is_a_row_error(server: MockServer) -> None:
    with pytest.raises(RowError) as caught:
        await send(server.base_url, request("x mock:fail=400"))
    assert caught.value.status == 400


async def test_bad_key_is_fatal_and_redacted_everywhere(server: MockServer) -> None:
    with pytest.raises(FatalError) as caught:
        await send(server.base_url, request(), key="bad-key")

    error = caught.value
    assert error.status == 401
    assert "bad-key" not in error.message
    assert "bad-key" not in str(error)
    assert "bad-key" not in repr(error.body)
    assert redact("bad-key") in error.message


async def test_a_key_of_a_few_characters_is_no_secret_to_mask_inside_words(
    server: MockServer,
) -> None:
    # The mock's message is "mock fault: HTTP 400": a key "u" masked would make it "fa***lt".
    with pytest.raises(RowError) as placeholder:
        await send(server.base_url, request("x mock:fail=400"), key="u")
    with pytest.raises(RowError) as secret:
        await send(server.base_url, request("x mock:fail=400"), key="faul")

    assert placeholder.value.message == "mock fault: HTTP 400"
    assert "faul" not in secret.value.message


async def test_reset_truncation_and_bad_json_are_transient(server: MockServer) -> None:
    codes = []
    for directive in ("mock:reset=1", "mock:truncate=1", "mock:badjson=1"):
        with pytest.raises(TransientError) as caught:
            await send(server.base_url, request(f"x {directive}"))
        codes.append(caught.value.code)
    assert codes == ["connection_reset", "truncated_body", "invalid_json"]


async def test_one_reset_is_resent_at_once_as_a_stale_connection(server: MockServer) -> None:
    async with open_session(Limits(), Timeouts()) as session:
        client = Client(
            session,
            get_provider("openai"),
            base_url=server.base_url,
            api_key="k",
        )
        await client.send(request("warm"))  # the reset comes on a reused connection
        response = await client.send(request("x mock:reset=1"))
    assert response.status_code == 200
    assert client.stale_retries == 1
    assert server.stats.requests == 3


async def test_a_reset_on_a_new_connection_is_not_resent_behind_the_attempt(
    server: MockServer,
) -> None:
    # A new connection cannot have gone stale in the pool: its close is the
    # server's answer to the attempt (an idle timeout of a load balancer in
    # front of a slow model, say, after the work was done and billed). A
    # silent resend made two requests of one attempt ("attempts": 1).
    async with open_session(Limits(), Timeouts()) as session:
        client = Client(session, get_provider("openai"), base_url=server.base_url, api_key="k")
        with pytest.raises(TransientError) as caught:
            await client.send(request("x mock:reset=1"))
    assert caught.value.code == "connection_reset"
    assert client.stale_retries == 0
    assert server.stats.requests == 1


async def test_read_timeout(server: MockServer) -> None:
    with pytest.raises(TransientError) as caught:
        await send(server.base_url, request("x mock:delay=2"), read=0.2)
    assert caught.value.code == "read_timeout"


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransientError) as caught:
        await send(f"http://127.0.0.1:{port}/v1", request())
    assert caught.value.code == "connect_error"


@pytest_asyncio.fixture
async def deaf_server() -> AsyncIterator[str]:
    """Accepts connections and never reads from them: sending stalls."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for writer in held:
            writer.transport.abort()
        listener.close()
        await listener.wait_closed()


async def test_write_timeout_bounds_a_stalled_send(deaf_server: str) -> None:
    big = request("x" * (64 << 20))  # far beyond loopback socket buffers
    with pytest.raises(TransientError) as caught:
        await send(deaf_server, big, write=0.3, read=30)
    assert caught.value.code == "write_timeout"


async def test_status_mapping_without_a_socket() -> None:
    """The answer-to-error map alone, as a pure function of status, headers, body."""
    async with open_session(Limits(), Timeouts()) as session:  # opens no connection
        client = Client(
            session,
            get_provider("openai"),
            base_url="http://api.invalid/v1",
            api_key="sk-0123456789",
        )
    quota = b'{"error": {"code": "insufficient_quota", "message": "no quota"}}'
    cases = [
        (503, {"Retry-After": "2"}, b"<html>busy</html>"),
        (200, {}, b"not json"),
        (429, {}, quota),
        (404, {}, b'{"error": {"message": "no such model", "code": "model_not_found"}}'),
        (200, {}, b'{"error": "upstream timed out"}'),
    ]
    errors = []
    for status, headers, raw in cases:
        with pytest.raises((TransientError, FatalError, RowError)) as caught:
            client._response(status, CIMultiDict(headers), raw)
        errors.append(caught.value)
    busy, garbled, no_quota, missing, passed_on = errors
    assert isinstance(passed_on, TransientError)
    assert passed_on.code == "error_in_answer"
    assert passed_on.message.endswith(": upstream timed out")
    answer = client._response(200, CIMultiDict(), b'{"choices": [], "error": {"code": "x"}}')
    assert answer.body == {"choices": [], "error": {"code": "x"}}  # a result beside it wins
    assert isinstance(busy, TransientError)
    assert busy.code == "http_503"
    assert busy.retry_after == 2
    assert busy.body is None  # not JSON: nothing to show
    assert isinstance(garbled, TransientError)
    assert garbled.code == "invalid_json"
    assert isinstance(no_quota, FatalError)
    assert no_quota.code == "insufficient_quota"
    assert isinstance(missing, RowError)
    assert missing.code == "model_not_found"


async def test_a_stale_connection_is_resent_on_a_fresh_one_not_another_pooled_one() -> None:
    # Every reused connection loses the race: the pool holds three idle ones,
    # all of them stale, so only a fresh connection can carry the resend.
    async with (
        MockServer(stale_after=0.0) as server,
        open_session(Limits(), Timeouts()) as session,
    ):
        client = Client(session, get_provider("openai"), base_url=server.base_url, api_key="k")
        await asyncio.gather(*(client.send(request(f"warm {i}")) for i in range(3)))
        assert session.open_connections == 3

        response = await client.send(request("after the idle time"))
        # The stale one closed; the new one joined the two still idle: reuse goes on.
        assert session.open_connections == 3

    assert response.status_code == 200
    assert client.stale_retries == 1
    assert server.stats.requests == 5


async def test_a_host_name_the_resolver_refuses_is_a_fatal_invalid_url() -> None:
    """An empty label fails the resolver's IDNA encoding with a UnicodeError:
    mapped like any invalid URL, not a crash (the run's settings refuse such
    a --base-url before this; a Client takes what it is given)."""
    with pytest.raises(FatalError) as caught:
        await send("http://a..b/v1", request())
    assert caught.value.code == "invalid_url"
