"""The rows' requests, and the one place where transport failures and HTTP
statuses become batchrun errors.

Each row's request goes through the run's ``connections.Pool`` of keep-alive
connections (``pool_size`` overall, ``per_host`` per host, idle ones kept for
``idle`` seconds), so connections are reused instead of opened per call. The
one resend after a stale pooled connection goes on a new connection.
"""

from __future__ import annotations

import asyncio
import errno
import math
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson

from batchrun import __version__, connections, crashpoint
from batchrun.config import DEFAULT_MAX_RESPONSE_BYTES, Limits, Timeouts
from batchrun.deadlines import FifoDeadlines
from batchrun.errors import FatalError, RequestError, RowError, TransientError
from batchrun.hosts import HostPool
from batchrun.providers import Provider
from batchrun.providers.base import body_error
from batchrun.rateheaders import pause_hint
from batchrun.records import Request, Response
from batchrun.tls import tls_failure


@asynccontextmanager
async def open_session(
    limits: Limits, timeouts: Timeouts, tls: ssl.SSLContext | None = None
) -> AsyncIterator[connections.Pool]:
    """The run's pool of connections; closed, shielded from cancellation, on
    exit. ``tls`` verifies servers (default: the system's CAs)."""
    pool = connections.Pool(
        limit=limits.pool_size, per_host=limits.per_host, timeouts=timeouts, tls=tls
    )
    try:
        yield pool
    finally:
        with anyio.CancelScope(shield=True):
            await pool.close()


_USER_AGENT = f"batchrun/{__version__}"


class OutOfTime(Exception):
    """An attempt reached the deadline its caller gave (``Client.send``'s ``within``)."""


class Client:
    """Sends one request through the shared session and returns its ``Response``
    or raises a classified ``RequestError``. Never retries: that is the
    caller's policy."""

    def __init__(
        self,
        session: connections.Pool,
        provider: Provider,
        *,
        base_url: str | None = None,
        hosts: HostPool | None = None,
        api_key: str | None,
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
        self._pool = session
        self._targets: dict[str, connections.Target] = {}  # per URL: few, built once
        self._provider = provider
        self.hosts = hosts
        self._headers = provider.headers(api_key)
        self._api_key = api_key
        self._request_timeout = request_timeout
        self._max_response_bytes = max_response_bytes
        self._deadlines = FifoDeadlines(request_timeout)
        self.stale_retries = 0

    async def send(
        self,
        request: Request,
        *,
        within: float = math.inf,
        sending: connections.Sending | None = None,
    ) -> Response:
        """One attempt, to the host the pool picks, cut at ``--request-timeout``
        (``request_timeout`` error) or after ``within`` seconds if sooner
        (``OutOfTime``: the caller's own deadline).

        Connect, send, wait and read run under that one deadline: the
        per-read timeout alone lets a server that trickles bytes (or sends a
        1xx, then nothing) hold the attempt forever. ``--request-timeout``
        is the same for every attempt, so its deadlines share one timer
        (``FifoDeadlines``); a shorter ``within`` takes asyncio's own timeout
        (a cancel scope costs as much as a tenth of a fast row's work).
        ``_post`` turns every TimeoutError of its own into a RequestError.
        ``sending`` is called just before a byte of the request is written
        (see ``Pool.post``)."""
        host = self.hosts.pick()
        host_failed = False
        try:  # from the pick on: the host is told ``finished`` whatever happens
            url = self._provider.url(request, host.base_url)
            data = orjson.dumps(self._provider.body(request))
            if within < self._request_timeout:
                async with asyncio.timeout(within):
                    return await self._exchange(url, data, sending)
            deadline = self._deadlines.start()
            try:
                return await self._exchange(url, data, sending)
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

    async def _exchange(
        self, url: str, data: bytes, sending: connections.Sending | None
    ) -> Response:
        """A pooled connection the server had already closed (its keep-alive
        timeout ran out as we reused it) is not the provider's answer: the
        request goes once more at once, on a new connection (``_resend``).
        Only a close before any byte of an answer counts."""
        try:
            return await self._post(url, data, sending=sending)
        except _StaleConnection:
            self.stale_retries += 1
        return await self._resend(url, data, sending)

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

    async def _resend(self, url: str, data: bytes, sending: connections.Sending | None) -> Response:
        """The one resend after a stale pooled connection, on a new
        connection. A second close before any answer is the answer."""
        try:
            return await self._post(url, data, fresh=True, sending=sending)
        except _StaleConnection as exc:
            raise self._redacted(transport_error(exc.cause)) from exc.cause

    async def _post(
        self,
        url: str,
        data: bytes,
        *,
        fresh: bool = False,
        sending: connections.Sending | None = None,
    ) -> Response:
        to = self._targets.get(url) or self._target(url)
        if crashpoint.SIGNALS_ARMED:
            crashpoint.signal_at("request")
        try:
            status, headers, raw = await self._pool.post(
                to, data, max_bytes=self._max_response_bytes, fresh=fresh, sending=sending
            )
        except connections.TooLarge as exc:
            raise _too_large(exc, self._max_response_bytes) from None
        except connections.ClosedEarly as exc:
            if not exc.reused:  # a new connection cannot be stale: the close is the answer
                raise self._redacted(transport_error(exc)) from exc
            raise _StaleConnection(exc) from exc
        except connections.WireError as exc:
            raise self._redacted(transport_error(exc)) from exc
        return self._response(status, headers, raw)

    def _target(self, url: str) -> connections.Target:
        try:
            to = connections.target(url, self._headers, _USER_AGENT)
        except connections.InvalidTarget as exc:
            raise self._redacted(transport_error(exc)) from exc
        if len(self._targets) < 64:  # URLs come from a few hosts and endpoints
            self._targets[url] = to
        return to

    def _response(self, status: int, headers: Any, raw: bytes) -> Response:
        body = _parse_json(raw)
        request_id = _request_id(headers, body)
        if 200 <= status < 300:
            failed = _answer_error(status, headers, raw, body, request_id)
            if failed is not None:
                raise self._redacted(failed)
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


def _answer_error(
    status: int, headers: Any, raw: bytes, body: Any, request_id: str | None
) -> RequestError | None:
    """The row's error for a 2xx answer whose body is not a JSON object with
    a result (None when it is one)."""
    if body is _UNPARSABLE and _is_stream(headers):
        return RowError(
            "streamed_answer",
            f"HTTP {status} with a streamed answer (text/event-stream), which batchrun"
            ' does not read: drop "stream": true from the request',
            status=status,
            request_id=request_id,
        )
    if body is _UNPARSABLE:
        return TransientError(
            "invalid_json",
            f"HTTP {status} with a body that is not JSON ({len(raw)} bytes)",
            status=status,
            request_id=request_id,
        )
    failed = body_error(status, body)
    if failed is None:
        return None
    return TransientError(
        failed.code, failed.message, status=status, body=body, request_id=request_id
    )


def _redirect_error(status: int, headers: Mapping[str, str], request_id: str | None) -> RowError:
    """Redirects are not followed for a POST: HTTP clients turn a 301/302 into
    a GET, and a 307/308 would resend a paid request to an address the user
    never chose."""
    where = headers.get("location") or "no Location given"  # names are lower-case
    return RowError(
        "redirect",
        f"HTTP {status} redirect to {where}: batchrun does not follow redirects of a POST;"
        " set --base-url to the address the API answers at",
        status=status,
        request_id=request_id,
    )


def _too_large(exc: connections.TooLarge, limit: int) -> RowError:
    length = exc.length
    return RowError(
        "response_too_large",
        f"the response body is larger than --max-response-bytes ({limit:,} bytes)"
        + (f": Content-Length {length:,}" if length is not None else ""),
        status=exc.status,
        request_id=_request_id(exc.headers, None),
    )


class _StaleConnection(Exception):
    """The connection closed before any answer: maybe a stale pooled one."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


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


def _is_stream(headers: Any) -> bool:
    """Whether an answer is server-sent events: not retried, since every
    attempt would be paid and come back the same."""
    return str(headers.get("content-type") or "").startswith("text/event-stream")


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


# The pool's failures without an answer, as batchrun errors (code, message prefix).
_WIRE_ERRORS: dict[type[connections.WireError], tuple[str, str]] = {
    connections.ConnectTimeout: ("connect_timeout", "connecting timed out"),
    connections.WriteTimeout: ("write_timeout", "sending the request body timed out"),
    connections.ReadTimeout: ("read_timeout", "waiting for the response timed out"),
    connections.ClosedEarly: ("server_disconnected", "the server closed the connection"),
    connections.CutShort: ("truncated_body", "the response body was cut short"),
    connections.BadAnswer: ("connection_error", "the answer could not be read"),
}


def transport_error(exc: BaseException) -> RequestError:
    """The batchrun error for a failure without an HTTP answer: the pool's or
    a socket's (batch mode's API maps aiohttp's own first)."""
    text = str(exc) or type(exc).__name__
    tls = tls_failure(exc)
    if tls is not None:
        return tls
    if isinstance(exc, connections.WireError):
        return _wire_error(exc, text)
    if isinstance(exc, TimeoutError):
        return TransientError("read_timeout", f"waiting for the response timed out: {text}")
    if isinstance(exc, UnicodeError):  # the resolver's IDNA encoding refused the host name
        return FatalError("invalid_url", f"the host name cannot be looked up: {text}")
    return socket_error(exc, text)


def _wire_error(exc: connections.WireError, text: str) -> RequestError:
    if isinstance(exc, connections.BadHeader):  # the API key, say, holds a line break
        return FatalError("invalid_header", f"the request cannot be sent: {text}")
    if isinstance(exc, connections.InvalidTarget):
        return FatalError("invalid_url", f"invalid URL: {text}")
    if isinstance(exc, connections.ConnectFailed):
        if isinstance(exc.cause, UnicodeError):  # IDNA refused the host name
            return FatalError("invalid_url", f"the host name cannot be looked up: {text}")
        return TransientError("connect_error", f"cannot connect: {text}")
    if isinstance(exc.__cause__, ConnectionResetError | BrokenPipeError):
        return socket_error(exc.__cause__, text)
    code, what = _WIRE_ERRORS.get(type(exc), ("connection_error", "connection failed"))
    return TransientError(code, f"{what}: {text}")


def socket_error(exc: BaseException, text: str) -> RequestError:
    """A reset or other socket failure, described by ``text``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return TransientError("connection_reset", f"the connection was reset: {text}")
    return TransientError("connection_error", f"connection failed: {text}")
