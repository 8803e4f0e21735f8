"""A deterministic simulated model provider on loopback, with scriptable faults.

``MockServer`` is a real ``aiohttp.web`` server. OpenAI dialect: ``POST``
``/v1/{chat/completions,completions,embeddings}``, also under
``/compatible-mode/v1`` and ``/v1beta/openai`` (a base path without ``/v1``
at its end, as Gemini's), with the files and batches API there too (see
``batchrun.mock_batches``: a fast clock and batch faults, ``batch_faults``).
DashScope native dialect: ``POST
/api/v1/services/aigc/text-generation/generation``. ``GET /_mock/stats``
returns ``MockServer.stats`` as JSON.

Answers are pure functions of the raw request body: its sha256 hex ``digest``
names the request (``x-request-id: req-<digest[:16]>``) and seeds the content.
A row scripts its own faults with whitespace-separated ``mock:NAME[=VALUE]``
tokens anywhere in its prompt text; attempt ``n`` counts the receipts of this
digest, this one included. The first of these that fires decides the answer:

* ``mock:reset=N``: attempts ``n <= N`` get the TCP connection reset (RST);
* ``mock:quota``: always the "no quota" error (OpenAI 429, DashScope 400);
* ``mock:fail=CODE`` (always) / ``mock:fail=CODExN`` (attempts ``n <= N``):
  HTTP ``CODE``, 400-599, with an error body in the dialect;
* the server-wide ``fail_rate``: 503 "overloaded";
* ``mock:truncate=N``: attempts ``n <= N`` get a 200 whose body stops short of
  its ``Content-Length``, then the connection closes;
* ``mock:redirect=CODE``: every attempt gets HTTP ``CODE`` (300-399) with a
  ``Location`` elsewhere on this server, which serves nothing there;
* ``mock:badjson=N``: attempts ``n <= N`` get a 200 JSON body that won't parse;
* ``mock:oddbody=N``: attempts ``n <= N`` get a 200 whose JSON body is not an
  object: ``null``, ``[]`` and a string in turn;
* ``mock:hang102=N``: attempts ``n <= N`` get ``HTTP/1.1 102 Processing``,
  then nothing until the client gives up;
* ``mock:trickle=S`` (always) / ``mock:trickle=SxN`` (attempts ``n <= N``):
  the 200's headers at once, then its body one byte every ``S`` seconds;
* ``mock:huge=BYTES``: a 200 whose JSON body is padded to ``BYTES`` bytes,
  sent in 64 KiB pieces with its ``Content-Length`` (chunked, without one, when
  ``mock:chunked`` is given too).

``mock:size=N`` pads a chat or completion answer's content to ``N``
characters (large answers).

A request that asks for JSON (``response_format`` of type ``json_object`` or
``json_schema``; DashScope: in ``parameters``) is answered with the text
``{"echo": ..., "words": N}`` (N: the prompt's words), unless
``mock:notjson[=N]`` (prose instead) or ``mock:wrongshape[=N]``
(``{"unexpected": true}``) fire: attempts ``n <= N``, every attempt without a
value. ``mock:length`` cuts any answer's text in half with finish_reason
``length``.

``mock:delay=S`` sleeps ``S`` seconds before every answer to the row, and
``mock:retry_after=S`` adds ``Retry-After: S`` (verbatim) to its quota, fail
and overloaded answers. Malformed and unknown tokens are ignored; for a
repeated name the last wins.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import random
import signal
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from batchrun.mock_batches import BatchFaults, MockBatches
from batchrun.mock_script import (
    NO_DIRECTIVES,
    Call,
    Directives,
    Kind,
    openai_error,
    parse_directives,
    prompt_parts,
    success_body,
)

DASHSCOPE_PATH: Final = "/api/v1/services/aigc/text-generation/generation"
_OPENAI_ROUTES: Final[dict[str, Kind]] = {
    "chat/completions": "chat",
    "completions": "completion",
    "embeddings": "embedding",
}
_BAD_KEY: Final = "bad-key"
_BAD_JSON: Final = b'{"choices": ['
_ODD_BODIES: Final[tuple[Any, ...]] = (None, [], "fine, thanks")
# Gemini's OpenAI-compatible base path: a base URL that does not end in /v1.
GATEWAY_PREFIX: Final = "/v1beta/openai"
_JSON: Final = "application/json"
# Seconds stop() waits for a running handler, twice (aiohttp waits, cancels, waits).
_SHUTDOWN_GRACE: Final = 0.25
# SO_LINGER on with a zero timeout makes close() send an RST instead of a FIN.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# How long a hang102 answer stays silent: longer than any test's timeout.
_SILENCE: Final = 3600.0
_HUGE_PIECE: Final = 1 << 16
_MAX_UPLOAD: Final = 512 << 20
_DASHSCOPE_CODES: Final = {401: "InvalidApiKey", 403: "AccessDenied", 429: "Throttling.RateQuota"}


class MockStats:
    """Plain mutable counters, updated by the server and read by tests.

    ``requests`` counts requests to the model routes; ``in_flight`` and
    ``max_in_flight`` count those inside a handler, sleeps included;
    ``by_digest`` counts them per sha256 hex of the raw body; ``statuses``
    counts answers per HTTP status, 0 standing for no complete answer (reset,
    truncated, or the client gave up first); ``ok_by_digest`` counts the
    complete 200 answers per digest: what a provider would bill.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_digest: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.ok_by_digest: collections.Counter[str] = collections.Counter()
        # Per whole second of the server's monotonic clock, with a rate limit set.
        self.received_per_second: collections.Counter[int] = collections.Counter()
        self.accepted_per_second: collections.Counter[int] = collections.Counter()
        self.batch_rows = 0  # rows answered in batches (see mock_batches)

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` keeps tracking the live handlers."""
        self.requests = 0
        self.max_in_flight = self.in_flight
        self.by_digest.clear()
        self.statuses.clear()
        self.ok_by_digest.clear()

    def as_json(self) -> dict[str, Any]:
        """The counters but ``by_digest``, JSON-ready (status keys as strings)."""
        statuses = {str(code): n for code, n in sorted(self.statuses.items())}
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "statuses": statuses,
        }


def _json(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


def _error(
    kind: Kind, headers: dict[str, str], status: int, message: str, code: str | None = None
) -> web.Response:
    """An error answer in the dialect of ``kind``; ``code`` overrides the default."""
    if kind == "dashscope":
        default = "InternalError" if status >= 500 else "InvalidParameter"
        code = code or _DASHSCOPE_CODES.get(status, default)
        body = {"code": code, "message": message, "request_id": headers["x-request-id"]}
        return _json(status, body, headers)
    return _json(status, openai_error(status, message, code), headers)


def _auth_error(kind: Kind, headers: dict[str, str], key: str) -> web.Response:
    # Real providers echo (part of) a rejected key; the full echo tests redaction.
    if kind == "dashscope":
        message = f"Invalid API-key provided: {key}" if key else "No API-key provided."
        return _error(kind, headers, 401, message, "InvalidApiKey")
    message = (
        f"Incorrect API key provided: {key}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
        if key
        else "You didn't provide an API key: send 'Authorization: Bearer KEY'."
    )
    return _error(kind, headers, 401, message, "invalid_api_key")


def _fault(call: Call, rules: Directives, overloaded: bool) -> web.Response | None:
    """The error answer a row's directives or the fail rate force, if any."""
    headers = {"x-request-id": call.request_id}
    if rules.retry_after:
        headers["Retry-After"] = rules.retry_after
    if rules.quota and call.kind == "dashscope":
        return _error(call.kind, headers, 400, "Access denied: account in arrears.", "Arrearage")
    if rules.quota:
        message = "You exceeded your current quota, please check your plan and billing details."
        return _error(call.kind, headers, 429, message, "insufficient_quota")
    if rules.fail is not None and (rules.fail_times is None or call.attempt <= rules.fail_times):
        return _error(call.kind, headers, rules.fail, f"mock fault: HTTP {rules.fail}")
    if overloaded:
        return _error(call.kind, headers, 503, "The server is overloaded, please retry later.")
    return None


def _reset_connection(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()
    # Never sent: aiohttp finds the transport closing and drops the answer quietly.
    return web.Response(status=204)


async def _truncated(request: web.Request, call: Call) -> web.StreamResponse:
    full = orjson.dumps(success_body(call))
    response = web.StreamResponse(headers={"x-request-id": call.request_id})
    response.content_type = _JSON
    response.content_length = len(full)
    response.force_close()
    await response.prepare(request)
    await response.write(full[: len(full) // 2])
    # close(), not abort(): the partial body must reach the client before the FIN.
    if request.transport is not None:
        request.transport.close()
    return response


async def _hang_after_102(request: web.Request) -> web.StreamResponse:
    """An informational answer, then silence until the client gives up."""
    if request.transport is not None:
        request.transport.write(b"HTTP/1.1 102 Processing\r\n\r\n")
    await asyncio.sleep(_SILENCE)
    return _reset_connection(request)


async def _streamed(
    request: web.Request, call: Call, body: bytes, *, pace: float, piece: int, length: bool
) -> web.StreamResponse:
    """A 200 sent ``piece`` bytes at a time, ``pace`` seconds apart."""
    response = web.StreamResponse(headers={"x-request-id": call.request_id})
    response.content_type = _JSON
    if length:
        response.content_length = len(body)
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(body), piece):
        if pace:
            await asyncio.sleep(pace)
        await response.write(body[start : start + piece])
    await response.write_eof()
    return response


def _padded(call: Call, size: int) -> bytes:
    """The success body grown to ``size`` bytes with a padding field."""
    answer = success_body(call)
    bare = len(orjson.dumps({**answer, "padding": ""}))
    return orjson.dumps({**answer, "padding": "x" * max(0, size - bare)})


async def _slow_or_big(
    request: web.Request, call: Call, rules: Directives
) -> web.StreamResponse | None:
    """A trickled or huge success answer, when the row asks for one."""
    if rules.trickle and (rules.trickle_times is None or call.attempt <= rules.trickle_times):
        body = orjson.dumps(success_body(call, rules))
        return await _streamed(request, call, body, pace=rules.trickle, piece=1, length=True)
    if rules.huge:
        body = _padded(call, rules.huge)
        length = not rules.chunked
        return await _streamed(request, call, body, pace=0, piece=_HUGE_PIECE, length=length)
    return None


async def _scripted(
    request: web.Request, call: Call, rules: Directives, overloaded: bool
) -> web.StreamResponse:
    """Answer an authorised request whose body is a JSON object."""
    if call.attempt <= rules.reset:
        return _reset_connection(request)
    if call.attempt <= rules.hang102:
        return await _hang_after_102(request)
    fault = _fault(call, rules, overloaded)
    if fault is not None:
        return fault
    if call.attempt <= rules.truncate:
        return await _truncated(request, call)
    headers = {"x-request-id": call.request_id}
    if rules.redirect is not None:
        headers["Location"] = "/moved" + request.path
        return web.Response(status=rules.redirect, headers=headers)
    if call.attempt <= rules.badjson:
        return web.Response(body=_BAD_JSON, content_type=_JSON, headers=headers)
    if call.attempt <= rules.oddbody:
        return _json(200, _ODD_BODIES[(call.attempt - 1) % len(_ODD_BODIES)], headers)
    special = await _slow_or_big(request, call, rules)
    if special is not None:
        return special
    return _json(200, success_body(call, rules), headers)


class _Quota:
    """A provider's requests-per-second quota: ``limit`` per fixed one-second
    window, or over the last second (``sliding``); None: no quota. Counts
    what it received and accepted per second into ``stats``."""

    def __init__(self, limit: int | None, stats: MockStats, *, sliding: bool) -> None:
        self.limit = limit
        self.stats = stats
        self.sliding = sliding
        # Arrival times of the requests accepted in the last second (sliding window).
        self._accepted: collections.deque[float] = collections.deque()

    def over(self) -> float | None:
        """Seconds to wait when this request is over the quota; None when it is not."""
        if self.limit is None:
            return None
        now = time.monotonic()
        second = int(now)
        self.stats.received_per_second[second] += 1
        if self.sliding:
            return self._over_sliding(now, self.limit)
        if self.stats.accepted_per_second[second] >= self.limit:
            return second + 1 - now
        self.stats.accepted_per_second[second] += 1
        return None

    def _over_sliding(self, now: float, limit: int) -> float | None:
        """Seconds until a place frees when ``limit`` were accepted in the last second."""
        accepted = self._accepted
        while accepted and accepted[0] <= now - 1.0:
            accepted.popleft()
        if len(accepted) >= limit:
            return accepted[0] + 1.0 - now
        accepted.append(now)
        self.stats.accepted_per_second[int(now)] += 1
        return None


class MockServer:
    """The simulated provider; use ``async with MockServer() as server``.

    ``latency`` (seconds) is slept before every answer, on top of any
    ``mock:delay``. ``fail_rate`` in [0, 1] is the chance, drawn on arrival
    from ``random.Random(seed)``, that a valid request gets a 503.
    ``keepalive_timeout`` (seconds) closes idle client connections. ``port``
    0 binds an ephemeral port; ``port`` holds the real one after ``start()``.

    ``rate_limit`` (requests per second, fixed one-second windows) answers
    429 with ``Retry-After`` to requests beyond it, as a provider's quota
    would; with ``sliding_window`` it counts over the last second instead,
    the stricter way many providers do. ``stale_after`` (seconds) resets a request that arrives on a
    connection idle at least that long, without answering: the race a server
    with a short keep-alive timeout loses against a client reusing the
    connection (0: every reused connection). ``tls`` (a server context)
    serves https instead of http.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        fail_rate: float = 0.0,
        seed: int = 0,
        keepalive_timeout: float = 75.0,
        rate_limit: int | None = None,
        sliding_window: bool = False,
        stale_after: float | None = None,
        batch_faults: BatchFaults | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {fail_rate}")
        self.host = host
        self.port = port
        self.latency = latency
        self.fail_rate = fail_rate
        self.keepalive_timeout = keepalive_timeout
        self.stats = MockStats()
        self._rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self.rate_limit = rate_limit
        self.sliding_window = sliding_window
        self._quota = _Quota(rate_limit, self.stats, sliding=sliding_window)
        self.stale_after = stale_after
        self._idle_since: dict[int, float] = {}  # connection -> end of its last answer
        self.batches = MockBatches(self.stats, batch_faults)
        self.tls = tls
        self._digests: dict[int, str] = {}  # live request -> its body's digest

    @property
    def base_url(self) -> str:
        """OpenAI-dialect base URL: ``http://HOST:PORT/v1`` (https with ``tls``)."""
        return f"{self.origin}/v1"

    @property
    def origin(self) -> str:
        """``http://HOST:PORT``, or ``https://`` with ``tls``."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def dashscope_base_url(self) -> str:
        """DashScope-native base URL: ``http://HOST:PORT/api/v1``."""
        return f"{self.origin}/api/v1"

    async def start(self) -> None:
        """Bind and serve; ``RuntimeError`` if already started."""
        if self._runner is not None:
            raise RuntimeError("MockServer already started")
        # Batch input files are uploaded whole: up to a provider's 500 MB cap.
        app = web.Application(client_max_size=_MAX_UPLOAD)
        for prefix in ("/v1/", "/compatible-mode/v1/"):
            self.batches.add_routes(app, prefix)
            for path, kind in _OPENAI_ROUTES.items():
                app.router.add_post(prefix + path, self._handler(kind))
        for path, kind in _OPENAI_ROUTES.items():
            app.router.add_post(f"{GATEWAY_PREFIX}/{path}", self._handler(kind))
        app.router.add_post(DASHSCOPE_PATH, self._handler("dashscope"))
        app.router.add_get("/_mock/stats", self._get_stats)
        # handler_cancellation: a client that gives up must not leave a sleeper behind.
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=self.keepalive_timeout,
            shutdown_timeout=_SHUTDOWN_GRACE,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self.tls).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Close the listener and every connection; a no-op when not started."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _handler(self, kind: Kind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            stats = self.stats
            stats.requests += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            status = 0  # stays 0 if the client gives up and the handler is cancelled
            try:
                response = await self._answer(request, kind)
                transport = request.transport
                # A reset or truncated answer leaves the connection closing.
                if transport is not None and not transport.is_closing():
                    status = response.status
                digest = self._digests.get(id(request))
                if status == 200 and digest is not None:
                    stats.ok_by_digest[digest] += 1
                return response
            finally:
                self._digests.pop(id(request), None)
                stats.in_flight -= 1
                stats.statuses[status] += 1

        return handle

    async def _answer(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        if self._lost_race(request):
            return _reset_connection(request)
        try:
            return await self._answer_fresh(request, kind)
        finally:
            if self.stale_after is not None:
                self._idle_since[id(request.protocol)] = time.monotonic()

    def _lost_race(self, request: web.Request) -> bool:
        """Whether this request arrived on a connection idle past ``stale_after``."""
        if self.stale_after is None:
            return False
        idle_since = self._idle_since.pop(id(request.protocol), None)
        return idle_since is not None and time.monotonic() - idle_since >= self.stale_after

    async def _answer_fresh(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        raw = await request.read()
        digest = hashlib.sha256(raw).hexdigest()
        self.stats.by_digest[digest] += 1
        self._digests[id(request)] = digest
        overloaded = self.fail_rate > 0 and self._rng.random() < self.fail_rate
        call = Call(kind, digest, self.stats.by_digest[digest], {}, [])
        key = _bearer_key(request)
        body = _json_object(raw)
        rules = NO_DIRECTIVES
        valid = bool(key) and key != _BAD_KEY and body is not None
        if valid and body is not None:
            call.body, call.parts = body, prompt_parts(kind, body)
            rules = parse_directives("\n".join(call.parts))
        headers = {"x-request-id": call.request_id}
        # A quota is checked on arrival and answered at once, as providers do.
        wait = self._quota.over() if valid else None
        if wait is not None:
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return _error(kind, headers, 429, "Requests rate limit exceeded, slow down.")
        pause = self.latency + rules.delay
        if pause > 0:
            await asyncio.sleep(pause)
        if not key or key == _BAD_KEY:
            return _auth_error(kind, headers, key)
        if body is None:
            return _error(kind, headers, 400, "The request body is not a JSON object.")
        return await _scripted(request, call, rules, overloaded)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_json()), content_type=_JSON)


def _bearer_key(request: web.Request) -> str:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


async def _serve_until_signal(server: MockServer) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        async with server:
            origin = f"http://{server.host}:{server.port}"
            line = f"{origin} (openai: {origin}/v1, dashscope: {origin}/api/v1)"
            print("mock server listening on", line, flush=True)
            await stopping.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def serve(
    *,
    host: str,
    port: int,
    latency: float,
    fail_rate: float,
    seed: int = 0,
    rate_limit: int | None = None,
    sliding_window: bool = False,
    batch_faults: BatchFaults | None = None,
) -> None:
    """Blocking: serve until SIGINT or SIGTERM, then shut down cleanly.

    Once listening, prints one flushed line to stdout:
    ``mock server listening on http://HOST:PORT (openai: http://HOST:PORT/v1,
    dashscope: http://HOST:PORT/api/v1)``.
    """
    server = MockServer(
        host=host,
        port=port,
        latency=latency,
        fail_rate=fail_rate,
        seed=seed,
        rate_limit=rate_limit,
        sliding_window=sliding_window,
        batch_faults=batch_faults,
    )
    asyncio.run(_serve_until_signal(server))
