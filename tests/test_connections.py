"""The rows' connection pool against a raw loopback server scripted byte by
byte: framings, encodings, interim answers, limits, reuse and its ends."""

from __future__ import annotations

import asyncio
import gzip
import random
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from batchrun.config import Timeouts
from batchrun.connections import (
    Answer,
    BadAnswer,
    ClosedEarly,
    CutShort,
    InvalidTarget,
    Pool,
    ReadTimeout,
    Target,
    TooLarge,
    target,
)

pytestmark = pytest.mark.asyncio

# What the server sends for one request: the bytes, in pieces (a number: seconds
# to wait first), then whether it closes.
Reply = Callable[[bytes], tuple[list[bytes | float], bool]]


@dataclass
class RawServer:
    """Answers the n-th request on any connection with ``replies[n]``."""

    replies: list[Reply]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    handlers: list[tuple[asyncio.Task[Any], asyncio.StreamWriter]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append((task, writer))
        try:
            while len(self.requests) < len(self.replies):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                pieces, close = self.replies[len(self.requests) - 1](request)
                for piece in pieces:
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                        continue
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
                if close:
                    return
            await reader.read()  # holds the connection open until the client closes it
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


Serve = Callable[[list[Reply]], Awaitable[RawServer]]


@pytest_asyncio.fixture
async def raw() -> AsyncIterator[Serve]:
    """Starts scripted servers; stops them after the test."""
    made: list[tuple[asyncio.Server, RawServer]] = []

    async def serve(replies: list[Reply]) -> RawServer:
        script = RawServer(replies)
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        script.port = server.sockets[0].getsockname()[1]
        made.append((server, script))
        return script

    yield serve
    for server, script in made:
        server.close()
        for task, writer in script.handlers:  # one may still sleep before a reply
            task.cancel()
            writer.transport.abort()
        await asyncio.gather(*(task for task, _ in script.handlers), return_exceptions=True)
        await server.wait_closed()
    await asyncio.sleep(0)  # the aborted sockets close


def answer(
    body: bytes = b'{"ok": true}', *, headers: str = "", status: str = "200 OK", close: bool = False
) -> Reply:
    def reply(_: bytes) -> tuple[list[bytes | float], bool]:
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode()
        return [head + body], close

    return reply


def raw_reply(*pieces: bytes | float, close: bool = False) -> Reply:
    return lambda _: (list(pieces), close)


def pool(limit: int = 4, per_host: int = 4, **timeouts: float) -> Pool:
    return Pool(limit=limit, per_host=per_host, timeouts=Timeouts(**timeouts), tls=None)


def to(server: RawServer) -> Target:
    return target(server.url, {"Content-Type": "application/json"}, "batchrun/test")


async def post(p: Pool, server: RawServer, body: bytes = b"{}", max_bytes: int = 1 << 20) -> Answer:
    return await p.post(to(server), body, max_bytes=max_bytes)


async def test_the_request_head_and_a_reused_connection(raw: Serve) -> None:
    server = await raw([answer(), answer(b'{"n": 2}')])
    p = pool()
    try:
        first = await post(p, server, b'{"a": 1}')
        second = await post(p, server)
    finally:
        await p.close()
    assert first == (200, {"content-length": "12"}, b'{"ok": true}')
    assert second.body == b'{"n": 2}'
    assert server.connections == 1
    head = server.requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert head.endswith(b'Content-Length: 8\r\n\r\n{"a": 1}')


@pytest.mark.parametrize("piece", [1, 2, 7, 1000])
async def test_a_chunked_answer_in_pieces_of_any_size(raw: Serve, piece: int) -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: r1\r\n\r\n"
        b'5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n'
    )
    pieces = [wire[i : i + piece] for i in range(0, len(wire), piece)]
    server = await raw([raw_reply(*pieces), answer()])
    p = pool()
    try:
        got = await post(p, server)
        again = await post(p, server)
    finally:
        await p.close()
    assert got == (200, {"transfer-encoding": "chunked", "x-request-id": "r1"}, b'{"a": 1}')
    assert again.status == 200
    assert server.connections == 1


async def test_gzip_and_both_deflates_are_decoded(raw: Serve) -> None:
    text = b'{"answer": "' + b"x" * 5000 + b'"}'
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    bodies = [
        (gzip.compress(text), "gzip"),
        (zlib.compress(text), "deflate"),
        (raw_deflate.compress(text) + raw_deflate.flush(), "deflate"),
    ]
    server = await raw([answer(b, headers=f"Content-Encoding: {e}\r\n") for b, e in bodies])
    p = pool()
    try:
        got = [await post(p, server) for _ in bodies]
    finally:
        await p.close()
    assert [g.body for g in got] == [text] * 3
    assert b"\r\nAccept-Encoding: gzip, deflate\r\n" in server.requests[0]


async def test_a_compressed_body_is_bounded_once_decoded(raw: Serve) -> None:
    bomb = gzip.compress(b"0" * (4 << 20))  # 4 MiB from about 4 KiB
    server = await raw([answer(bomb, headers="Content-Encoding: gzip\r\n")])
    p = pool()
    try:
        with pytest.raises(TooLarge) as caught:
            await post(p, server, max_bytes=1 << 20)
    finally:
        await p.close()
    assert caught.value.status == 200
    assert caught.value.length is None


async def test_an_unknown_encoding_or_garbage_is_a_bad_answer(raw: Serve) -> None:
    server = await raw([answer(b"xx", headers="Content-Encoding: br\r\n")])
    other = await raw([raw_reply(b"SSH-2.0-OpenSSH\r\n\r\n")])
    p = pool()
    try:
        with pytest.raises(BadAnswer, match="'br' encoding"):
            await post(p, server)
        with pytest.raises(BadAnswer, match="not HTTP"):
            await post(p, other)
    finally:
        await p.close()


async def test_interim_answers_are_skipped(raw: Serve) -> None:
    server = await raw(
        [
            raw_reply(
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 102 Processing\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            )
        ]
    )
    p = pool()
    try:
        got = await post(p, server)
    finally:
        await p.close()
    assert got == (200, {"content-length": "2"}, b"{}")


async def test_a_body_that_ends_with_the_connection(raw: Serve) -> None:
    server = await raw(
        [raw_reply(b"HTTP/1.1 200 OK\r\n\r\n", b'{"until": ', b'"close"}', close=True), answer()]
    )
    p = pool()
    try:
        got = await post(p, server)
        await post(p, server)  # the closed connection is not reused
    finally:
        await p.close()
    assert got.body == b'{"until": "close"}'
    assert server.connections == 2


async def test_connection_close_is_not_reused(raw: Serve) -> None:
    server = await raw([answer(headers="Connection: close\r\n"), answer()])
    p = pool()
    try:
        await post(p, server)
        await post(p, server)
    finally:
        await p.close()
    assert server.connections == 2


async def test_closes_before_and_during_an_answer(raw: Serve) -> None:
    early = await raw([raw_reply(close=True)])
    cut = await raw([raw_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{", close=True)])
    p = pool()
    try:
        with pytest.raises(ClosedEarly):
            await post(p, early)
        with pytest.raises(CutShort):
            await post(p, cut)
        assert p.open_connections == 0  # neither went back to the pool
    finally:
        await p.close()


async def test_a_chunked_body_past_the_bound_stops_the_read(raw: Serve) -> None:
    chunk = b"%x\r\n" % 4096 + b"x" * 4096 + b"\r\n"
    server = await raw(
        [raw_reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", *[chunk] * 8)]
    )
    p = pool()
    try:
        with pytest.raises(TooLarge):
            await post(p, server, max_bytes=10_000)
        assert p.open_connections == 0
    finally:
        await p.close()


async def test_silence_after_the_headers_is_a_read_timeout(raw: Serve) -> None:
    server = await raw([raw_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{")])
    p = pool(read=0.2)
    try:
        with pytest.raises(ReadTimeout):
            await post(p, server)
    finally:
        await p.close()


async def test_the_limit_queues_requests_on_one_connection(raw: Serve) -> None:
    server = await raw([answer(b'{"n": %d}' % i) for i in range(6)])
    p = pool(limit=1, per_host=1)
    try:
        got = await asyncio.gather(*(post(p, server) for _ in range(6)))
        assert p.open_connections == 1
    finally:
        await p.close()
    assert sorted(g.body for g in got) == sorted(b'{"n": %d}' % i for i in range(6))
    assert server.connections == 1


async def test_a_freed_place_serves_any_waiting_host(raw: Serve) -> None:
    # Two hosts, one connection each. A's first request never gets an answer,
    # so a second request to A waits for good; a second request to B must
    # still take B's connection as soon as B's first answer frees it.
    a = await raw([raw_reply(), answer()])
    late = b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{"b": 1}'
    b = await raw([raw_reply(0.2, late), answer(b'{"b": 2}')])
    p = pool(limit=2, per_host=1)
    try:
        stuck = asyncio.ensure_future(post(p, a))
        first_b = asyncio.ensure_future(post(p, b))
        await asyncio.sleep(0.05)
        waiting_a = asyncio.ensure_future(post(p, a))  # waits first: A's one place is taken
        await asyncio.sleep(0.01)
        second_b = await asyncio.wait_for(post(p, b), 2)  # waits for B's place
        assert (await first_b).body == b'{"b": 1}'
        assert second_b.body == b'{"b": 2}'
        assert not waiting_a.done()
        for task in (stuck, waiting_a):
            task.cancel()
        await asyncio.gather(stuck, waiting_a, return_exceptions=True)
    finally:
        await p.close()
    assert b.connections == 1


async def test_a_cancelled_request_frees_its_place(raw: Serve) -> None:
    server = await raw([raw_reply(), answer()])  # the first request never gets an answer
    p = pool(limit=1, per_host=1)
    try:
        stuck = asyncio.ensure_future(post(p, server))
        await asyncio.sleep(0.05)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        got = await asyncio.wait_for(post(p, server), 5)
    finally:
        await p.close()
    assert got.status == 200


async def test_idle_connections_past_the_idle_time_are_closed(raw: Serve) -> None:
    server = await raw([answer(), answer()])
    p = pool(idle=0.05)
    try:
        await post(p, server)
        await asyncio.sleep(0.1)
        await post(p, server)
        assert p.open_connections == 1
    finally:
        await p.close()
    assert server.connections == 2


async def test_a_fresh_request_makes_room_by_closing_an_idle_connection(raw: Serve) -> None:
    server = await raw([answer(), answer()])
    p = pool(limit=1, per_host=1)
    try:
        await post(p, server)
        await p.post(to(server), b"{}", max_bytes=100, fresh=True)
        assert p.open_connections == 1
    finally:
        await p.close()
    assert server.connections == 2


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("ftp://h/x", {}),
        ("http:///x", {}),
        ("http://h/x", {"Authorization": "Bearer a\r\nX-Injected: 1"}),
        ("http://h/x", {"Authorization": "Bearer \u20ac"}),
    ],
)
async def test_targets_that_cannot_make_a_request(url: str, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidTarget):
        target(url, headers, "batchrun/test")


async def test_a_target_quotes_its_path_and_brackets_an_ipv6_host() -> None:
    made = target("http://[::1]:8080/v1/a b?x=1", {}, "ua")
    assert made.head.startswith(b"POST /v1/a%20b?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\n")
    assert (made.host, made.port, made.tls) == ("::1", 8080, False)
    assert target("https://api.example/v1", {}, "ua").head.split(b"\r\n")[1] == b"Host: api.example"


def _random_reply(rng: random.Random) -> Reply:
    body = b'{"ok": true}'
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    return rng.choice(
        [
            raw_reply(whole),
            raw_reply(rng.uniform(0.001, 0.03), whole),
            raw_reply(close=True),  # closed before answering
            raw_reply(whole[:30], close=True),  # cut short
            answer(headers="Connection: close\r\n"),
        ]
    )


@pytest.mark.parametrize("seed", range(12))
async def test_random_traffic_keeps_the_bounds_and_ends(raw: Serve, seed: int) -> None:
    """Answers, early closes, cut bodies, delays and cancellations in any mix
    over two hosts: every connection opens within both limits, every request
    ends (none waits for a place that never frees), and the pool is left
    within its limit."""
    rng = random.Random(seed)
    limit = rng.randint(1, 4)
    per_host = rng.randint(1, limit)
    servers = [await raw([_random_reply(rng) for _ in range(200)]) for _ in range(2)]
    p = pool(limit=limit, per_host=per_host)
    opened: list[tuple[int, int]] = []  # (all open, most open to one host) at each connect
    connect = p._connect

    async def watched(to: Target) -> Any:
        conn = await connect(to)
        opened.append((p.open_connections, max(p._open.values())))
        return conn

    p._connect = watched  # type: ignore[method-assign]
    try:
        tasks = [asyncio.ensure_future(post(p, rng.choice(servers))) for _ in range(40)]
        for task in rng.sample(tasks, 8):
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.05), task.cancel)
        done, pending = await asyncio.wait(tasks, timeout=10)
        assert not pending
        assert p.open_connections <= limit
    finally:
        await p.close()
    assert opened
    assert all(total <= limit and one <= per_host for total, one in opened)
    outcomes = {
        type(t.exception()).__name__ if not t.cancelled() and t.exception() else "ok" for t in done
    }
    assert outcomes <= {"ok", "ClosedEarly", "CutShort"}


async def test_a_switch_of_protocols_is_a_bad_answer_not_a_protocol_crash(
    raw: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    # httptools raises HttpParserUpgrade, no HttpParserError, for a 101: out of
    # data_received it logged "Fatal error on transport" with a traceback.
    server = await raw(
        [
            raw_reply(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
            )
        ]
    )
    p = pool(read=5)
    try:
        with pytest.raises(BadAnswer, match="101"):
            await post(p, server)
    finally:
        await p.close()
    assert "Traceback" not in caplog.text
    assert "Fatal error" not in caplog.text


async def test_headers_that_never_end_are_bounded(raw: Serve) -> None:
    # The body's bound does not cover the head: httptools buffers a header
    # value whole, so one that never ends grew memory until --request-timeout.
    endless = [b"HTTP/1.1 200 OK\r\nX-Big: "] + [b"a" * 65536] * 40  # 2.5 MiB of one header
    server = await raw([raw_reply(*endless)])
    p = pool(read=5)
    try:
        with pytest.raises(BadAnswer, match="headers pass"):
            await post(p, server, max_bytes=1 << 20)
    finally:
        await p.close()


async def test_a_close_on_a_new_connection_is_not_taken_for_a_stale_one(raw: Serve) -> None:
    server = await raw([raw_reply(close=True), answer(), raw_reply(close=True)])
    p = pool()
    try:
        with pytest.raises(ClosedEarly) as new:
            await post(p, server)
        await post(p, server)  # this connection answered once: it goes back to the pool
        with pytest.raises(ClosedEarly) as reused:
            await post(p, server)
    finally:
        await p.close()
    assert not new.value.reused
    assert reused.value.reused
