"""The batch API's bounds, against raw loopback servers: an upload the
server stops reading ends in ``write_timeout``, one it reads slowly but
steadily finishes however long it takes; a call whose answer trickles ends
at ``--request-timeout``, and an answer past the size bound is refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from batchrun.batchmode import api as api_module
from batchrun.batchmode.api import BatchApi
from batchrun.batchmode.http import open_http
from batchrun.config import Limits, RetryPolicy, Timeouts
from batchrun.errors import TransientError
from batchrun.providers.openai import OpenAIProvider

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
# Several times what loopback socket buffers take in before the peer reads.
FILE_BYTES = 40 << 20
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 34\r\n\r\n"
    b'{"id": "file-1", "object": "file"}'
)


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """A loopback server running ``handler`` per connection (reading up to
    4 MiB ahead); its port. Each connection is closed when its handler
    ends, and the server waits for every handler before it stops."""
    running = 0
    idle = asyncio.Event()
    idle.set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal running
        running += 1
        idle.clear()
        try:
            with contextlib.suppress(ConnectionError):  # the client gave up first
                await handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            running -= 1
            if not running:
                idle.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=4 << 20)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with anyio.fail_after(5):
            await idle.wait()
        await server.wait_closed()


@asynccontextmanager
async def batch_api(port: int, timeouts: Timeouts) -> AsyncIterator[BatchApi]:
    async with open_http(Limits(), timeouts) as session:
        yield BatchApi(
            session,
            OpenAIProvider(),
            f"http://127.0.0.1:{port}/v1",
            api_key="sk-test",
            retry=RetryPolicy(max_attempts=1),
            timeouts=timeouts,
            sleep=anyio.sleep,
        )


async def upload(port: int, path: Path, write_timeout: float) -> str:
    async with batch_api(port, Timeouts(connect=2, read=2, write=write_timeout)) as api:
        return await api.upload(path, "part-1.jsonl")


def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "part-1.jsonl"
    line = b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions"}\n'
    path.write_bytes(line * (FILE_BYTES // len(line)))
    return path


async def body_length(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


async def test_an_upload_the_provider_stops_reading_fails_with_write_timeout(
    tmp_path: Path,
) -> None:
    stop = anyio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # then reads nothing more
        await stop.wait()

    async with serving(silent) as port:
        with anyio.fail_after(10), pytest.raises(TransientError) as failed:
            await upload(port, big_file(tmp_path), write_timeout=0.5)
        stop.set()
    assert failed.value.code == "write_timeout"
    assert "the provider took no more of it for 0.5 s" in failed.value.message


async def test_a_slow_upload_that_keeps_moving_finishes(tmp_path: Path) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        left = await body_length(reader)
        while left:  # at most 1 MiB every 0.05 s: a second or more in all, no pause of 0.5 s
            chunk = await reader.read(min(left, 1 << 20))
            left -= len(chunk)
            await asyncio.sleep(0.05)
        writer.write(ANSWER)
        await writer.drain()

    started = anyio.current_time()
    async with serving(slow) as port:
        assert await upload(port, big_file(tmp_path), write_timeout=0.5) == "file-1"
    assert anyio.current_time() - started > 1.0  # far longer than the write timeout


async def test_a_call_whose_answer_trickles_ends_at_the_request_timeout() -> None:
    stop = anyio.Event()

    async def trickling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{")
        while not stop.is_set():  # a byte every 0.1 s: each read is quick, the whole never ends
            writer.write(b" ")
            await writer.drain()
            await anyio.sleep(0.1)

    async with serving(trickling) as port, batch_api(port, Timeouts(read=1, request=1)) as api:
        with anyio.fail_after(10), pytest.raises(TransientError) as failed:
            await api.get("batch_1")
        stop.set()
    assert failed.value.code == "request_timeout"
    assert failed.value.message == "GET batches/batch_1: no whole answer within 1 s"


async def test_an_answer_past_the_size_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_module, "_MAX_ANSWER", 1000)

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"id": "batch_1", "status": "completed", "pad": "' + b"x" * 5000 + b'"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async with serving(huge) as port, batch_api(port, Timeouts()) as api:
        with pytest.raises(TransientError) as failed:
            await api.get("batch_1")
    assert failed.value.code == "answer_too_large"
    assert "with over 1,000 bytes" in failed.value.message
