"""Keep-alive HTTP/1.1 connections for the per-row JSON POSTs, and their pool.

Why not aiohttp for these: a request through its ``ClientSession`` costs
about 400,000 instructions of Python on top of the socket work (URL objects,
header multidicts, traces, timers), twice what the rest of a row costs in
batchrun. Every row is one shape, a JSON POST answered by JSON, so this
module does only that: a request head built once per URL, answers read by
httptools (llhttp, a C parser), one timer per request. aiohttp still serves
batch mode's files and batches API.

Invariants:
- a connection carries one request at a time (no pipelining);
- connections open, opening or idle never outnumber ``limit`` overall nor
  ``per_host`` for one host: to open one past either, an idle one is closed;
- a connection goes back to the pool only after a whole answer that the
  server lets keep alive, with the request sent in full; any other end
  closes it.

Failures without a whole answer raise a ``WireError``; ``client`` maps them
to batchrun errors, in one place.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, cast

import aiohappyeyeballs
import httptools
import yarl

from batchrun.config import Timeouts

__all__ = [
    "Answer",
    "BadAnswer",
    "BadHeader",
    "ClosedEarly",
    "ConnectFailed",
    "ConnectTimeout",
    "CutShort",
    "InvalidTarget",
    "Pool",
    "ReadTimeout",
    "Sending",
    "Target",
    "TooLarge",
    "WireError",
    "WriteTimeout",
    "target",
]

# Called just before a request's first byte is written (``Pool.post``).
Sending = Callable[[], None]


class WireError(Exception):
    """A request that got no whole HTTP answer."""


class InvalidTarget(WireError):
    """A URL or header that cannot make a request."""


class BadHeader(InvalidTarget):
    """A request header that would break the request's head."""


class ConnectFailed(WireError):
    """No connection to ``host:port``; ``__cause__`` is the socket's or TLS's error."""

    def __init__(self, host: str, port: int, cause: BaseException) -> None:
        super().__init__(f"{host}:{port}: {cause}")
        self.host, self.port, self.cause = host, port, cause


class ConnectTimeout(WireError):
    """Connecting (TLS handshake included) took longer than the connect timeout."""


class WriteTimeout(WireError):
    """The peer stopped reading the request body for the write timeout."""


class ReadTimeout(WireError):
    """No byte of the answer arrived for the read timeout."""


class ClosedEarly(WireError):
    """The connection closed before any byte of an answer (a pooled one may
    have been closed by the server's keep-alive timeout as it was reused).
    ``reused``: the connection had carried an answer before, so the close
    may be that race; a new connection's close is the server's answer."""

    def __init__(self, message: str, *, reused: bool = True) -> None:
        super().__init__(message)
        self.reused = reused


class CutShort(WireError):
    """The connection closed or broke part-way through the answer."""


class BadAnswer(WireError):
    """Bytes that are not an HTTP answer, or a body in an unknown encoding."""


class TooLarge(Exception):
    """An answer whose body passes the size bound; ``length`` is its
    Content-Length when it gave one."""

    def __init__(self, status: int, headers: Mapping[str, str], length: int | None) -> None:
        super().__init__(f"HTTP {status} body over the bound")
        self.status, self.headers, self.length = status, headers, length


class Answer(NamedTuple):
    """An HTTP answer: status, headers (names lower-cased), decoded body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL's requests go, and their head up to the body's length."""

    key: tuple[str, str, int]  # scheme, host, port: connections are pooled per key
    host: str
    port: int
    tls: bool
    head: bytes  # request line and headers, ending in "Content-Length: "


def target(url: str, headers: Mapping[str, str], user_agent: str) -> Target:
    """The target of POSTs to ``url`` with ``headers``; ``InvalidTarget`` when
    the URL is not http(s) with a host, or a header would break the head."""
    try:
        parsed = yarl.URL(url)  # percent-encodes the path and IDNA-encodes the host
        host, port = parsed.raw_host, parsed.port
    except (ValueError, UnicodeError) as exc:
        raise InvalidTarget(f"{url}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not host or port is None:
        raise InvalidTarget(f"{url}: not an http(s) URL with a host")
    shown = f"[{host}]" if ":" in host else host
    if not parsed.is_default_port():
        shown += f":{port}"
    lines = [f"POST {parsed.raw_path_qs} HTTP/1.1", f"Host: {shown}"]
    lines += [f"User-Agent: {user_agent}", "Accept: */*", "Accept-Encoding: gzip, deflate"]
    for name, value in headers.items():
        if "\r" in name + value or "\n" in name + value:  # would smuggle in a header
            raise BadHeader(f"the request header {name.strip()!r} holds a line break")
        lines.append(f"{name}: {value}")
    head = "\r\n".join(lines)
    try:
        encoded = (head + "\r\nContent-Length: ").encode("latin-1")
    except UnicodeEncodeError as exc:
        raise BadHeader(f"a request header holds a character HTTP cannot carry: {exc}") from exc
    return Target((parsed.scheme, host, port), host, port, parsed.scheme == "https", encoded)


class Pool:
    """Connections shared by a run's requests, bounded by ``limit`` and
    ``per_host``; idle ones are reused newest first and closed once idle
    for ``timeouts.idle`` seconds. ``tls`` verifies https hosts (default:
    the system's CAs)."""

    def __init__(
        self, *, limit: int, per_host: int, timeouts: Timeouts, tls: ssl.SSLContext | None
    ) -> None:
        self._limit, self._per_host = limit, per_host
        self._timeouts = timeouts
        self._tls = tls  # made on the first https connection when not given
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: dict[tuple[str, str, int], int] = {}  # open or opening, per host
        self._all: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def post(
        self,
        to: Target,
        body: bytes,
        *,
        max_bytes: int,
        fresh: bool = False,
        sending: Sending | None = None,
    ) -> Answer:
        """``body`` POSTed to ``to``; its answer, with a body of at most
        ``max_bytes`` bytes once decoded (else ``TooLarge``). ``fresh`` asks
        for a new connection, not an idle pooled one. ``sending`` is called
        once a connection is ready, just before the request's first byte is
        written: a failure before it (no connection, a failed TLS handshake)
        sent nothing."""
        conn = (None if fresh else self._pop_idle(to.key)) or await self._acquire(to, fresh)
        try:
            answer = await conn.exchange(to.head, body, max_bytes, self._timeouts, sending)
        except BaseException:
            self._discard(conn)
            raise
        if conn.reusable:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(to.key, []).append(conn)
            if self._waiters:
                self._wake()
        else:
            self._discard(conn)
        return answer

    async def close(self) -> None:
        """Closes every connection; the pool is not used after."""
        for conn in list(self._all):
            self._discard(conn)
        await asyncio.sleep(0)  # lets the transports finish closing their sockets

    @property
    def open_connections(self) -> int:
        """Connections open or opening, busy or idle."""
        return sum(self._open.values())

    def _pop_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_allowed = asyncio.get_running_loop().time() - self._timeouts.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since >= oldest_allowed:
                return conn
            self._discard(conn)  # closed by the server, or idle too long
        return None

    async def _acquire(self, to: Target, fresh: bool) -> _Connection:
        while True:
            if not fresh:
                conn = self._pop_idle(to.key)
                if conn is not None:
                    return conn
            if self._make_room(to.key):
                return await self._connect(to)
            await self._wait()

    def _make_room(self, key: tuple[str, str, int]) -> bool:
        """Whether one more connection to ``key`` may open, closing an idle
        one (of ``key`` first, else the oldest) when that is what it takes."""
        if self._open.get(key, 0) >= self._per_host and not self._close_idle(key):
            return False
        if sum(self._open.values()) < self._limit:
            return True
        oldest = min(
            (conns[0] for conns in self._idle.values() if conns),
            key=lambda conn: conn.idle_since,
            default=None,
        )
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        self._discard(oldest)
        return True

    def _close_idle(self, key: tuple[str, str, int]) -> bool:
        idle = self._idle.get(key)
        if not idle:
            return False
        self._discard(idle.pop(0))
        return True

    async def _connect(self, to: Target) -> _Connection:
        self._open[to.key] = self._open.get(to.key, 0) + 1
        try:
            conn = await _open_connection(to, self._context() if to.tls else None, self._timeouts)
        except BaseException:
            self._open[to.key] -= 1
            self._wake()
            raise
        conn.key = to.key
        self._all.add(conn)
        return conn

    def _context(self) -> ssl.SSLContext:
        # The system's CAs take tens of milliseconds to load: not for plain HTTP.
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _discard(self, conn: _Connection) -> None:
        """Closes ``conn`` and frees its place; a second call does nothing."""
        if conn in self._all:
            self._all.discard(conn)
            self._open[conn.key] -= 1
            conn.abort()
            self._wake()

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self._waiters:  # cancelled before any wake
                self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        """Wakes every waiting request to look again: a place freed for one
        host, or an idle connection, may serve any one of them, and the
        others wait again (they are few: at most the requests in flight)."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


async def _open_connection(
    to: Target, tls: ssl.SSLContext | None, timeouts: Timeouts
) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeouts.connect):
            infos = await loop.getaddrinfo(to.host, to.port, type=socket.SOCK_STREAM)
            # A host's addresses raced a quarter second apart (RFC 8305): a
            # dead IPv6 route costs 0.25 s, not the connect timeout. The
            # library closes every socket it opened when cancelled (asyncio's
            # own race leaks one on Python 3.11).
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=0.25, interleave=1
            )
            transport, conn = await _wrap(loop, sock, to, tls, timeouts)
    except TimeoutError:
        raise ConnectTimeout(
            f"connecting to {to.host}:{to.port} took over {timeouts.connect:g} s"
        ) from None
    except (OSError, ssl.SSLError, UnicodeError) as exc:  # UnicodeError: IDNA refused the name
        raise ConnectFailed(to.host, to.port, exc) from exc
    conn.connection_made(transport)  # uvloop may call it only after the connection is returned
    return conn


async def _wrap(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    to: Target,
    tls: ssl.SSLContext | None,
    timeouts: Timeouts,
) -> tuple[asyncio.Transport, _Connection]:
    """The connected ``sock`` as a transport (TLS on it when ``tls``); the
    socket is closed if that fails."""
    try:
        if tls is None:
            return await loop.create_connection(_Connection, sock=sock)
        return await loop.create_connection(
            _Connection, sock=sock, ssl=tls, server_hostname=to.host,
            ssl_handshake_timeout=timeouts.connect,
        )  # fmt: skip
    except BaseException:
        sock.close()
        raise


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` sends a request and returns
    its answer. httptools calls the ``on_*`` methods while parsing."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._max = 0
        self._began = False  # a byte of the answer arrived
        self._answered = False  # a whole answer came on this connection
        self._head_bytes = 0  # bytes of the answer before its headers ended
        self._headed = False  # the answer's headers are complete
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self.key: tuple[str, str, int] = ("", "", 0)
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0

    async def exchange(
        self,
        head: bytes,
        body: bytes,
        max_bytes: int,
        timeouts: Timeouts,
        sending: Sending | None = None,
    ) -> Answer:
        """One request and its whole answer (see the module's invariants);
        ``sending`` is called just before the request's first byte is written."""
        transport = self._transport
        if transport is None or self.closed:
            raise ClosedEarly("the connection is closed")
        if sending is not None:
            sending()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        self._answer = answer
        self._headers, self._chunks, self._size, self._max = {}, [], 0, max_bytes
        self._began = self._headed = self.reusable = False
        self._head_bytes = 0
        try:
            if len(body) < 1 << 16:  # one write, one packet for a small request
                transport.write(head + b"%d\r\n\r\n" % len(body) + body)
            else:
                transport.writelines((head, b"%d\r\n\r\n" % len(body), body))
                if self._paused:
                    await self._drain(timeouts.write)
            self._last_read = loop.time()
            read = timeouts.read
            self._timer = loop.call_at(self._last_read + read, self._check_read, read)
            return await answer
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._answer = None  # a failure from now on concerns no request

    async def _drain(self, seconds: float) -> None:
        self._drained = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(seconds):
                await self._drained
        except TimeoutError:
            raise WriteTimeout(f"the server read none of the request for {seconds:g} s") from None
        finally:
            self._drained = None

    def _check_read(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_read
        if quiet < seconds:
            self._timer = loop.call_at(self._last_read + seconds, self._check_read, seconds)
            return
        self._fail(ReadTimeout(f"no byte of the answer came for {seconds:g} s"))

    def _fail(self, error: Exception) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(error)
        self.abort()

    def abort(self) -> None:
        """Closes at once, dropping what is unsent."""
        self.closed, self.reusable = True, False
        if self._transport is not None:
            self._transport.abort()

    # asyncio's protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or answer.done():  # bytes nobody asked for: unusable
            self.abort()
            return
        self._began = True
        self._last_read = asyncio.get_running_loop().time()
        if not self._headed:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_BYTES:  # httptools buffers a header whole
                self._fail(BadAnswer(f"the answer's headers pass {_MAX_HEAD_BYTES:,} bytes"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101: not an answer to a POST
            self._fail(BadAnswer("the server switched protocols (HTTP 101) instead of answering"))
        except httptools.HttpParserError as exc:
            self._fail(BadAnswer(f"the server's answer is not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed, self.reusable = True, False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # the answer (or its absence) says what happened
        answer = self._answer
        if answer is None or answer.done():
            return
        if self._headed and self._until_close():
            self._complete(keep_alive=False)
            return
        error: WireError
        if self._began:
            error = CutShort(_why(exc, "part-way through the answer"))
        else:
            error = ClosedEarly(_why(exc, "before answering"), reused=self._answered)
        error.__cause__ = exc
        answer.set_exception(error)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools' parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._headers = {}  # an interim answer (1xx): the real one follows
            self._head_bytes = 0
            return
        self._headed = True
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max:
            self._too_large(int(length))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max:
            self._too_large(None)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._headed:
            self._complete(keep_alive=self._parser.should_keep_alive())

    def _until_close(self) -> bool:
        """Whether the answer's body ends where the connection does (no
        length, not chunked)."""
        headers = self._headers
        return "content-length" not in headers and "transfer-encoding" not in headers

    def _complete(self, *, keep_alive: bool) -> None:
        answer = self._answer
        if answer is None or answer.done():
            return
        status, headers = self._parser.get_status_code(), self._headers
        try:
            body = _decoded(b"".join(self._chunks), headers.get("content-encoding"), self._max)
        except TooLarge:
            self._too_large(None)
            return
        except WireError as exc:
            self._fail(exc)
            return
        transport = self._transport
        self.reusable = (
            keep_alive and transport is not None and not transport.get_write_buffer_size()
        )
        self._answered = True
        answer.set_result(Answer(status, headers, body))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # answered before reading it all: stop writing

    def _too_large(self, length: int | None) -> None:
        self._fail(TooLarge(self._parser.get_status_code(), self._headers, length))


# Headers of a real answer take a few KiB; servers refuse requests past 8-64 KiB.
_MAX_HEAD_BYTES = 1 << 20


def _why(exc: Exception | None, when: str) -> str:
    return f"the server closed the connection {when}" + (f" ({exc})" if exc else "")


def _decoded(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """``body`` decoded from its Content-Encoding; ``TooLarge`` past
    ``max_bytes`` decoded, ``BadAnswer`` for an encoding not asked for."""
    if encoding is None:
        return body
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    if name not in ("gzip", "x-gzip", "deflate"):
        raise BadAnswer(
            f"the answer came in the {encoding!r} encoding, which batchrun does not ask for"
        )
    # gzip, or deflate in its zlib wrapper (the header tells which); raw deflate as a fallback
    for wbits in (32 + zlib.MAX_WBITS, -zlib.MAX_WBITS):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, max_bytes + 1)
        except zlib.error:
            continue
        if len(out) > max_bytes or inflater.unconsumed_tail:
            raise TooLarge(0, {}, None)
        if not inflater.eof:
            raise CutShort(f"the {name} body was cut short")
        return out
    raise BadAnswer(f"the {name} body cannot be decoded")
