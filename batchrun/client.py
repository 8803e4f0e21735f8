"""The pooled HTTP session, and the one place where aiohttp exceptions and HTTP
statuses become batchrun errors.

One ``aiohttp.ClientSession`` over one ``TCPConnector`` serves a whole run, so
connections are reused instead of opened per call. The connector caps
connections (``pool_size`` overall, ``per_host`` per host) and keeps idle ones
for ``idle`` seconds. The one resend after a stale pooled connection goes on a
new connection (see ``_Connector``).
"""

from __future__ import annotations

import asyncio
import errno
import math
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import aiohttp
import anyio
import orjson
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.payload import Payload
from aiohttp.tracing import Trace

from batchrun import crashpoint
from batchrun.config import DEFAULT_MAX_RESPONSE_BYTES, Limits, Timeouts
from batchrun.deadlines import FifoDeadlines
from batchrun.errors import FatalError, RequestError, RowError, TransientError
from batchrun.hosts import HostPool
from batchrun.providers import Provider
from batchrun.rateheaders import pause_hint
from batchrun.records import Request, Response, json_type
from batchrun.tls import tls_failure


@asynccontextmanager
async def open_session(
    limits: Limits, timeouts: Timeouts, tls: ssl.SSLContext | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """The run's single session; closed, shielded from cancellation, on exit.
    ``tls`` verifies servers (default: the system's CAs)."""
    connector = _Connector(
        ssl=tls if tls is not None else True,
        limit=limits.pool_size,
        limit_per_host=limits.per_host,
        keepalive_timeout=timeouts.idle,
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
    )
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, raise_for_status=False
    ) as session:
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True):
                await session.close()


# Set while a task resends after a stale connection: the pooled connections
# idle as long as the stale one are likely stale too (the pool hands out its
# oldest first), so the resend must not draw one of them.
_NEW_CONNECTION: ContextVar[bool] = ContextVar("batchrun_new_connection", default=False)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's pooled connector, except that a task with ``_NEW_CONNECTION``
    set gets a new connection, never an idle pooled one. The new connection
    counts against the same limits and joins the pool once answered, so reuse
    goes on as before."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        if _NEW_CONNECTION.get():
            return None  # nothing reusable: ``connect`` opens a connection
        return await super()._get(key, traces)


# aiohttp's body writer waits for the transport to drain only past this many
# buffered bytes; smaller bodies are handed to the kernel without waiting.
_WRITE_CAN_BLOCK = 1 << 16


class _WriteStalled(Exception):
    """Raised inside aiohttp's body writer when the peer stops reading."""


class _TimedBody(Payload):
    """A JSON body whose sending is bounded by the write timeout.

    aiohttp has no write timeout of its own; its body writer awaits the
    transport's flow control, so a peer that stops reading would stall it.
    Only for bodies of at least ``_WRITE_CAN_BLOCK`` bytes (``Client._post``
    sends smaller ones as plain bytes: they never wait).
    """

    def __init__(self, value: bytes, write_timeout: float) -> None:
        super().__init__(value, content_type="application/json")
        self._size = len(value)
        self._body = value
        self._write_timeout = write_timeout

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._body.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        data = self._body if content_length is None else self._body[:content_length]
        try:
            async with asyncio.timeout(self._write_timeout):
                await writer.write(data)
        except TimeoutError as exc:
            raise _WriteStalled from exc


class OutOfTime(Exception):
    """An attempt reached the deadline its caller gave (``Client.send``'s ``within``)."""


class Client:
    """Sends one request through the shared session and returns its ``Response``
    or raises a classified ``RequestError``. Never retries: that is the
    caller's policy."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        provider: Provider,
        *,
        base_url: str | None = None,
        hosts: HostPool | None = None,
        api_key: str | None,
        write_timeout: float,
        request_timeout: float = 600.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        """``hosts`` spreads requests over several base URLs; ``base_url``
        alone is a pool of one. ``request_timeout`` (seconds) bounds one whole
        attempt, the stale-connection resend included; a body larger than
        ``max_response_bytes`` fails the row (``response_too_large``)."""
        if hosts is None:
            if base_url is None:
                raise ValueError("a base_url or hosts")
            hosts = HostPool((base_url,), clock=time.monotonic)
        self._session = session
        self._provider = provider
        self.hosts = hosts
        self._headers = provider.headers(api_key)
        self._api_key = api_key
        self._write_timeout = write_timeout
        self._request_timeout = request_timeout
        self._max_response_bytes = max_response_bytes
        self._deadlines = FifoDeadlines(request_timeout)
        self.stale_retries = 0

    async def send(self, request: Request, *, within: float = math.inf) -> Response:
        """One attempt, to the host the pool picks, cut at ``--request-timeout``
        (``request_timeout`` error) or after ``within`` seconds if sooner
        (``OutOfTime``: the caller's own deadline).

        Connect, send, wait and read run under that one deadline: the
        per-read timeout alone lets a server that trickles bytes (or sends a
        1xx, then nothing) hold the attempt forever. ``--request-timeout``
        is the same for every attempt, so its deadlines share one timer
        (``FifoDeadlines``); a shorter ``within`` takes asyncio's own timeout
        (a cancel scope costs as much as a tenth of a fast row's work).
        ``_post`` turns every TimeoutError of its own into a RequestError."""
        host = self.hosts.pick()
        host_failed = False
        try:  # from the pick on: the host is told ``finished`` whatever happens
            url = self._provider.url(request, host.base_url)
            data = orjson.dumps(self._provider.body(request))
            if within < self._request_timeout:
                async with asyncio.timeout(within):
                    return await self._exchange(url, data)
            deadline = self._deadlines.start()
            try:
                return await self._exchange(url, data)
            except asyncio.CancelledError:
                if self._deadlines.timed_out(deadline):
                    raise TimeoutError from None
                raise
            finally:
                self._deadlines.finish(deadline)
        except TimeoutError:
            error = self._out_of_time(within)
            host_failed = isinstance(error, RequestError)
            raise error from None
        except RequestError as exc:
            host_failed = exc.status is None or exc.status >= 500
            raise
        finally:
            self.hosts.finished(host, host_failed=host_failed)

    async def _exchange(self, url: str, data: bytes) -> Response:
        """A pooled connection the server had already closed (its keep-alive
        timeout ran out as we reused it) is not the provider's answer: the
        request goes once more at once, on a new connection (``_resend``).
        Only a close before any answer counts (``_closed_before_answer``)."""
        try:
            return await self._post(url, data)
        except _StaleConnection:
            self.stale_retries += 1
        return await self._resend(url, data)

    def _out_of_time(self, within: float) -> Exception:
        """What an attempt cut by the deadline raises: ``OutOfTime`` when it
        was the caller's, else a ``request_timeout`` error (which, as any
        failure without an HTTP answer, marks the host failed)."""
        if within < self._request_timeout:
            return OutOfTime()
        return TransientError(
            "request_timeout",
            f"the attempt took longer than --request-timeout ({self._request_timeout:g} s)",
        )

    async def _resend(self, url: str, data: bytes) -> Response:
        """The one resend after a stale pooled connection, on a new connection
        (with a session from ``open_session``; other sessions may hand out a
        pooled one). A second close before any answer is the answer."""
        token = _NEW_CONNECTION.set(True)
        try:
            return await self._post(url, data)
        except _StaleConnection as exc:
            raise self._redacted(transport_error(exc.cause)) from exc.cause
        finally:
            _NEW_CONNECTION.reset(token)

    async def _post(self, url: str, data: bytes) -> Response:
        # A small body goes to the kernel with the headers and cannot stall;
        # only a larger one needs the write timeout (and costs its payload).
        body = data if len(data) < _WRITE_CAN_BLOCK else _TimedBody(data, self._write_timeout)
        if crashpoint.SIGNALS_ARMED:
            crashpoint.signal_at("request")
        try:
            async with self._session.post(
                url, data=body, headers=self._headers, allow_redirects=False
            ) as answer:
                raw = await read_bounded(answer, self._max_response_bytes)
                return self._response(answer.status, answer.headers, raw)
        except RequestError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if _closed_before_answer(exc):
                raise _StaleConnection(exc) from exc
            raise self._redacted(transport_error(exc)) from exc
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeError) as exc:
            raise self._redacted(transport_error(exc)) from exc

    def _response(self, status: int, headers: Any, raw: bytes) -> Response:
        body = _parse_json(raw)
        request_id = _request_id(headers, body)
        if 200 <= status < 300:
            if body is _UNPARSABLE:
                raise TransientError(
                    "invalid_json",
                    f"HTTP {status} with a body that is not JSON ({len(raw)} bytes)",
                    status=status,
                    request_id=request_id,
                )
            if not isinstance(body, dict):  # null, [], "text": not an answer
                raise self._redacted(
                    TransientError(
                        "invalid_body",
                        f"HTTP {status} with a JSON {json_type(body)} body, not an object",
                        status=status,
                        body=body,
                        request_id=request_id,
                    )
                )
            return Response(status_code=status, request_id=request_id, body=body)
        if 300 <= status < 400:
            raise self._redacted(_redirect_error(status, headers, request_id))
        shown = None if body is _UNPARSABLE else body
        verdict = self._provider.classify(status, shown)
        error_type = {"transient": TransientError, "row": RowError, "fatal": FatalError}[
            verdict.verdict
        ]
        raise self._redacted(
            error_type(
                verdict.code,
                verdict.message,
                status=status,
                body=shown,
                request_id=request_id,
                retry_after=pause_hint(headers, status=status),
            )
        )

    def _redacted(self, error: RequestError) -> RequestError:
        """The error with every trace of the API key masked (providers echo it)."""
        key = self._api_key
        # A key of a few characters is no secret (a placeholder such as "x"),
        # and masking it would mangle every word that holds those letters.
        if key and len(key) >= _SECRET_CHARS:
            error.message = error.message.replace(key, redact(key))
            if error.body is not None:
                text = orjson.dumps(error.body).decode()
                if key in text:
                    error.body = orjson.loads(text.replace(key, redact(key)))
            error.args = (error.message,)
        return error


def _redirect_error(status: int, headers: Any, request_id: str | None) -> RowError:
    """Redirects are not followed for a POST: HTTP clients turn a 301/302 into
    a GET, and a 307/308 would resend a paid request to an address the user
    never chose."""
    where = headers.get("Location") or "no Location given"
    return RowError(
        "redirect",
        f"HTTP {status} redirect to {where}: batchrun does not follow redirects of a POST;"
        " set --base-url to the address the API answers at",
        status=status,
        request_id=request_id,
    )


async def read_bounded(answer: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ``RowError("response_too_large")`` as soon as it is
    known to pass ``limit`` bytes: from its ``Content-Length`` before reading
    anything, or while reading one without a length (chunked)."""
    length = answer.content_length
    if length is not None and length <= limit:
        return await answer.read()  # the parser stops at the length: bounded
    if length is None:
        body = bytearray()
        async for piece in answer.content.iter_any():
            body += piece
            if len(body) > limit:
                break
        else:
            return bytes(body)
    raise RowError(
        "response_too_large",
        f"the response body is larger than --max-response-bytes ({limit:,} bytes)"
        + (f": Content-Length {length:,}" if length is not None else ""),
        status=answer.status,
        request_id=_request_id(answer.headers, None),
    )


class _StaleConnection(Exception):
    """The connection closed before any answer: maybe a stale pooled one."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _closed_before_answer(exc: Exception) -> bool:
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in (
        errno.ECONNRESET,
        errno.EPIPE,
    )


_SECRET_CHARS = 4


def redact(key: str) -> str:
    """A key shown safely: its first three characters at most, then stars."""
    return key[: min(3, len(key) // 4)] + "***"


_UNPARSABLE = object()


def _parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _UNPARSABLE


def _request_id(headers: Any, body: Any) -> str | None:
    for name in ("x-request-id", "x-dashscope-request-id", "request-id"):
        value = headers.get(name)
        if value:
            return str(value)
    if isinstance(body, dict):
        value = body.get("request_id") or body.get("id")
        if isinstance(value, str):
            return value
    return None


def transport_error(exc: BaseException) -> RequestError:
    """The batchrun error for an aiohttp or socket failure (no HTTP answer)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectionError) and isinstance(exc.__cause__, _WriteStalled):
        return TransientError("write_timeout", "sending the request body timed out")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TransientError("connect_timeout", f"connecting timed out: {text}")
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return TransientError("read_timeout", f"waiting for the response timed out: {text}")
    tls = tls_failure(exc)
    if tls is not None:
        return tls
    if isinstance(exc, aiohttp.InvalidURL):
        return FatalError("invalid_url", f"invalid URL: {text}")
    if isinstance(exc, UnicodeError):  # the resolver's IDNA encoding refused the host name
        return FatalError("invalid_url", f"the host name cannot be looked up: {text}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransientError("truncated_body", f"the response body was cut short: {text}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransientError("server_disconnected", f"the server closed the connection: {text}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransientError("connect_error", f"cannot connect: {text}")
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return TransientError("connection_reset", f"the connection was reset: {text}")
    return TransientError("connection_error", f"connection failed: {text}")
