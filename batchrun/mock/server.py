"""A deterministic simulated model provider on loopback, with scriptable faults.

``MockServer`` is a real ``aiohttp.web`` server. OpenAI dialect: ``POST``
``/v1/{chat/completions,completions,embeddings}``, also under
``/compatible-mode/v1`` and ``/v1beta/openai`` (a base path without ``/v1``
at its end, as Gemini's), with the files and batches API there too (see
``batchrun.mock.batches``: a fast clock and batch faults, ``batch_faults``).
DashScope native dialect: ``POST
/api/v1/services/aigc/text-generation/generation`` and, for embeddings
(``input.texts``), ``/api/v1/services/embeddings/text-embedding/text-embedding``.
``GET /_mock/stats`` returns ``MockServer.stats`` as JSON.

Answers are pure functions of the request body: the sha256 hex ``digest`` of
its canonical JSON (sorted keys; the raw bytes when it is no JSON object, see
``script.digest_of``) names the request (``x-request-id: req-<digest[:16]>``)
and seeds the content, so the same request gets the same answer online and
in a batch file, whatever the order of its keys.
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
* ``mock:errbody=N``: attempts ``n <= N`` get a 200 whose body is an error
  (``{"error": {"code": "overloaded", ...}}``), as some gateways answer;
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
import math
import random
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from batchrun.errors import UsageError
from batchrun.mock.batches import BatchFaults, MockBatches
from batchrun.mock.faults import (
    JSON_TYPE,
    auth_error,
    error_answer,
    reset_connection,
    scripted_answer,
)
from batchrun.mock.script import NO_DIRECTIVES, Call, digest_of, parse_directives, prompt_parts
from batchrun.records import BATCH_URLS, Kind

DASHSCOPE_PATH: Final = "/api/v1/services/aigc/text-generation/generation"
DASHSCOPE_EMBEDDING_PATH: Final = "/api/v1/services/embeddings/text-embedding/text-embedding"
# The batch urls' paths under /v1/ ("chat/completions", ...), served under every prefix.
_OPENAI_ROUTES: Final[dict[str, Kind]] = {
    url.removeprefix("/v1/"): kind for url, kind in BATCH_URLS.items()
}
_BAD_KEY: Final = "bad-key"
# Gemini's OpenAI-compatible base path: a base URL that does not end in /v1.
GATEWAY_PREFIX: Final = "/v1beta/openai"
# Seconds stop() waits for a running handler, twice (aiohttp waits, cancels, waits).
_SHUTDOWN_GRACE: Final = 0.25
_MAX_UPLOAD: Final = 512 << 20


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
        self.batch_rows = 0  # rows answered in batches (see batchrun.mock.batches)

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


def _check_settings(latency: float, fail_rate: float, faults: BatchFaults) -> None:
    """Refuse (``ValueError``, ``serve`` makes it a ``UsageError``) what the
    command line's ranges let through: NaN, which no comparison refuses, and
    infinite seconds (no answer, no batch would ever end)."""
    seconds = {"--latency": latency, "--batch-seconds": faults.seconds}
    for flag, value in seconds.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} must be a finite number of seconds >= 0, got {value}")
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError(f"--fail-rate must be a number in [0, 1], got {fail_rate}")


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
        _check_settings(latency, fail_rate, batch_faults or BatchFaults())
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
        # Called with the count of requests so far as each one arrives, before
        # it is answered: a test can act at an exact request (kill the client
        # at its Nth), which a loop watching the count overshoots by as many
        # requests as arrive between two looks.
        self.on_request: Callable[[int], None] | None = None

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
        for path in (DASHSCOPE_PATH, DASHSCOPE_EMBEDDING_PATH):  # the body tells them apart
            app.router.add_post(path, self._handler("dashscope"))
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
            if self.on_request is not None:
                self.on_request(stats.requests)
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
            return reset_connection(request)
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
        body = _json_object(raw)
        digest = digest_of(raw, body)
        self.stats.by_digest[digest] += 1
        self._digests[id(request)] = digest
        overloaded = self.fail_rate > 0 and self._rng.random() < self.fail_rate
        call = Call(kind, digest, self.stats.by_digest[digest], {}, [])
        key = _bearer_key(request)
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
            return error_answer(kind, headers, 429, "Requests rate limit exceeded, slow down.")
        pause = self.latency + rules.delay
        if pause > 0:
            await asyncio.sleep(pause)
        if not key or key == _BAD_KEY:
            return auth_error(kind, headers, key)
        if body is None:
            return error_answer(kind, headers, 400, "The request body is not a JSON object.")
        return await scripted_answer(request, call, rules, overloaded)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_json()), content_type=JSON_TYPE)


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
        await _listen(server)
        try:
            origin = f"http://{server.host}:{server.port}"
            line = f"{origin} (openai: {origin}/v1, dashscope: {origin}/api/v1)"
            print("mock server listening on", line, flush=True)
            await stopping.wait()
        finally:
            await server.stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _listen(server: MockServer) -> None:
    """Start ``server``; an address it cannot listen on (in use, not this
    machine's, a port out of range) is a ``UsageError`` naming it."""
    try:
        await server.start()
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot listen on {server.host}:{server.port}: {reason}") from None


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
    """Blocking: serve until SIGINT or SIGTERM, then shut down cleanly;
    ``UsageError`` when it cannot listen on ``host``:``port``, or for a
    setting out of range.

    Once listening, prints one flushed line to stdout:
    ``mock server listening on http://HOST:PORT (openai: http://HOST:PORT/v1,
    dashscope: http://HOST:PORT/api/v1)``.
    """
    try:
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
    except ValueError as exc:  # a setting out of range: one line and exit 2
        raise UsageError(str(exc)) from None
    asyncio.run(_serve_until_signal(server))
