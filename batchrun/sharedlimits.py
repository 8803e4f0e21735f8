"""One account's ``--rpm``, ``--tpm`` and Retry-After pauses shared through Redis.

Every process started with the same ``--shared-limits redis://HOST:PORT/DB``
and the same ``--limits-key`` draws from one budget, whatever the number of
processes: none needs to know it.

- **GCRA on the Redis server's clock.** One Lua script per call keeps, per
  limit key, the theoretical arrival time (TAT) of the requests limit and of
  the tokens limit, and the shared ``pause_until``. A call asks for a *lease*
  (a block of requests and tokens); the script grants it from ``max(now,
  TATs, pause_until)`` onwards and moves the TATs past it, so grants never
  overlap and the account never sees more than its rate.
- **Leases, spent locally.** A lease is about a third of a second of the
  account's rate (``LEASE_REQUESTS`` requests, within ``LEASE_MIN_S`` to
  ``LEASE_MAX_S``), spent by a local ``RateBudget`` paced at the full rate
  from the lease's start: about one Redis call per ``LEASE_REQUESTS`` requests.
- **Corrections in batches.** Tokens used beyond the estimate are summed and
  sent with the next call; a refund stays with the process's own lease.
- **Shared pauses.** A 429's Retry-After sets ``pause_until`` for every
  process; no lease starts before it, so the pause ends at the steady rate.
- **Faults.** Unreachable or refusing at start: ``UsageError`` (exit 2) before
  any request, the URL named without its password. Lost mid-run: a warning,
  then a local budget of the limits divided by the processes last seen, and a
  new try every ``RECONNECT_S`` until Redis answers again.

``LeaseStore`` is the thin I/O shell (redis.asyncio, from the ``redis`` extra);
``SharedBudget`` is the throttle's budget, on injected time.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio

from batchrun.config import redact_url
from batchrun.errors import UsageError
from batchrun.ratelimit import RateBudget
from batchrun.timing import Monotonic, Sleep

__all__ = [
    "Grant",
    "LeaseStore",
    "RedisUnavailable",
    "SharedBudget",
    "default_limits_key",
    "open_lease_store",
    "redact_url",
]

log = logging.getLogger("batchrun")

PASSWORD_ENV = "BATCHRUN_REDIS_PASSWORD"
# A lease holds about this many requests of the account's rate, but lasts
# between LEASE_MIN_S and LEASE_MAX_S seconds of it.
LEASE_REQUESTS = 12
LEASE_MIN_S = 0.25
LEASE_MAX_S = 0.5
# A grant starting further ahead than this is refused (retry later): it bounds
# what a process that dies holding a lease can waste.
HORIZON_S = 5.0
# A process not heard from for this long after it was due to call again (its
# lease used up, its wait or the pause over) no longer counts among the sharers.
PROCESS_TTL_S = 5.0
# While Redis is away, try it again this often (seconds).
RECONNECT_S = 1.0
# Each Redis call gives up after this long (seconds): a lost server is noticed fast.
CALL_TIMEOUT_S = 0.5
# Keys of an idle limit expire after this long (seconds).
KEY_TTL_S = 3600

# KEYS[1]: the limit's hash (tat_r, tat_t, pause_until: server seconds);
# KEYS[2]: sorted set of the processes seen, each scored by when it is due to
# call again plus the process TTL: at a low rate a process calls once per
# lease, many seconds apart, and must still count while it waits.
# ARGV: process id, requests asked, seconds per request (0: no --rpm), tokens
# asked, seconds per token (0: no --tpm), tokens of debt, seconds of pause to
# set, horizon, process TTL, key TTL.
# Returns {verdict, seconds, processes}: "ok" and when the lease starts from
# now; "pause" and how long it lasts; "wait" and when to ask again.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local req, req_iv = tonumber(ARGV[2]), tonumber(ARGV[3])
local tok, tok_iv = tonumber(ARGV[4]), tonumber(ARGV[5])
local debt, pause = tonumber(ARGV[6]), tonumber(ARGV[7])
local horizon, ttl, key_ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local s = redis.call('HMGET', KEYS[1], 'tat_r', 'tat_t', 'pause_until')
local tat_r, tat_t, pause_until = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if debt > 0 then tat_t = math.max(tat_t, now) + debt * tok_iv end
if pause > 0 then pause_until = math.max(pause_until, now + pause) end
local verdict, seconds, due = 'ok', 0, now
if req > 0 or tok > 0 then
  local start = math.max(now, tat_r, tat_t, pause_until)
  if pause_until > now then
    verdict, seconds = 'pause', pause_until - now
  elseif start - now > horizon then
    verdict, seconds = 'wait', start - now - horizon
  else
    tat_r = start + req * req_iv
    tat_t = start + tok * tok_iv
    seconds = start - now
  end
  -- When this process calls again: its lease used up, or its wait or pause over.
  due = verdict == 'ok' and math.max(tat_r, tat_t) or now + seconds
end
-- Due times only grow: a call asking no lease (a pause to share) keeps a later one.
local score = due + ttl
local held = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if held and held > score then score = held end
redis.call('ZADD', KEYS[2], score, ARGV[1])
redis.call('EXPIRE', KEYS[2], key_ttl)
local procs = redis.call('ZCARD', KEYS[2])
redis.call('HSET', KEYS[1], 'tat_r', string.format('%.6f', tat_r),
  'tat_t', string.format('%.6f', tat_t), 'pause_until', string.format('%.6f', pause_until))
redis.call('EXPIRE', KEYS[1], key_ttl)
return {verdict, string.format('%.6f', seconds), procs}
"""


class RedisUnavailable(Exception):
    """Redis did not answer a call (lost connection, timeout)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """The script's answer: ``verdict`` "ok" (a lease starting ``seconds`` from
    now), "pause" (a shared pause lasting ``seconds`` more) or "wait" (ask again
    in ``seconds``); ``processes`` sharing the key lately, this one included."""

    verdict: str
    seconds: float
    processes: int


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """One call's arguments: a lease (``requests`` at ``request_s`` seconds each,
    ``tokens`` at ``token_s`` each; zero intervals for unset limits), token
    ``debt`` to add and a ``pause`` (seconds) to share."""

    requests: float = 0.0
    request_s: float = 0.0
    tokens: float = 0.0
    token_s: float = 0.0
    debt: float = 0.0
    pause: float = 0.0


class LeaseStore(Protocol):
    """Where the shared state lives; ``call`` raises ``RedisUnavailable``."""

    url: str

    async def call(self, ask: LeaseAsk) -> Grant: ...


def default_limits_key(provider: str, base_url: str, model: str | None) -> str:
    """The limit key of a provider account: provider, host and model."""
    host = urlsplit(base_url).netloc or base_url or "embedded"
    return f"{provider}:{host}:{model or 'any-model'}"


class _RedisStore:
    """``LeaseStore`` on redis.asyncio: one EVALSHA per call."""

    def __init__(self, client: Any, url: str, key: str) -> None:
        self.url = url
        self._script = client.register_script(_SCRIPT)
        self._keys = [f"batchrun:limits:{key}", f"batchrun:limits:{key}:processes"]
        self._process = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def call(self, ask: LeaseAsk) -> Grant:
        """One script call; any failure of Redis mid-run (lost, timed out,
        refusing, out of memory) is ``RedisUnavailable``: the run falls back."""
        from redis.exceptions import RedisError

        try:
            return await self.raw_call(ask)
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

    async def raw_call(self, ask: LeaseAsk) -> Grant:
        """One script call; redis-py's own exceptions propagate."""
        args = [self._process, ask.requests, ask.request_s, ask.tokens, ask.token_s]
        args += [ask.debt, ask.pause, HORIZON_S, PROCESS_TTL_S, KEY_TTL_S]
        verdict, seconds, processes = await self._script(keys=self._keys, args=args)
        text = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        return Grant(text, float(seconds), int(processes))


@asynccontextmanager
async def open_lease_store(url: str, key: str) -> AsyncIterator[LeaseStore]:
    """Connect to ``url`` and check it answers; ``UsageError`` (exit 2) when the
    extra is missing, Redis is unreachable or refuses the password. The password
    comes from the URL or else ``BATCHRUN_REDIS_PASSWORD``."""
    try:
        import redis.asyncio as redis_asyncio
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise UsageError(
            "--shared-limits needs the redis extra: pip install 'batchrun[redis]'"
        ) from None
    shown = redact_url(url)
    options: dict[str, Any] = {
        "socket_timeout": CALL_TIMEOUT_S,
        "socket_connect_timeout": CALL_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),  # no hidden retries: a lost server shows at once
    }
    if urlsplit(url).password is None and os.environ.get(PASSWORD_ENV):
        options["password"] = os.environ[PASSWORD_ENV]
    try:
        client = redis_asyncio.Redis.from_url(url, **options)
    except (ValueError, TypeError, IndexError) as exc:  # the URL's options, say
        raise UsageError(f"--shared-limits {shown}: {exc}") from None
    try:
        store = _RedisStore(client, shown, key)
        given = urlsplit(url).password is not None or "password" in options
        await _first_call(store, shown, password_given=given)
        yield store
    finally:
        await client.aclose()


async def _first_call(store: _RedisStore, shown: str, *, password_given: bool) -> None:
    """One call, to check Redis answers; each way it can fail is a
    ``UsageError`` naming ``shown`` (the URL without its password)."""
    from redis.exceptions import (
        AuthenticationError,
        ConnectionError,
        RedisError,
        ResponseError,
        TimeoutError,
    )

    try:
        await store.raw_call(LeaseAsk())
    except (ValueError, TypeError, IndexError) as exc:  # options read at connect
        raise UsageError(f"--shared-limits {shown}: {exc}") from None
    except (AuthenticationError, ResponseError) as exc:
        if isinstance(exc, AuthenticationError) or "AUTH" in str(exc).upper():
            if not password_given:
                raise UsageError(
                    f"Redis at {shown} needs a password: put it in the URL"
                    f" (redis://:PASSWORD@host:port/db) or in {PASSWORD_ENV}"
                ) from None
            raise UsageError(f"Redis at {shown} refused the password: {exc}") from None
        raise UsageError(f"Redis at {shown} failed: {exc}") from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise UsageError(f"cannot reach Redis at {shown} (--shared-limits): {exc}") from None
    except RedisError as exc:
        raise UsageError(f"Redis at {shown} failed: {exc}") from None


class SharedBudget:
    """The run's rate budget when ``--shared-limits`` is set (see the module doc).

    Same contract as ``RateBudget``: ``acquire`` waits for one request and
    ``tokens`` tokens, ``settle`` corrects the estimate, ``hold`` is a
    server-requested pause, here also set for every process. Acquirers are
    served in arrival order. Use ``async with budget.running():`` around the
    run: it sends shared pauses as soon as they are known.
    """

    def __init__(
        self,
        store: LeaseStore,
        *,
        rpm: float | None,
        tpm: float | None,
        clock: Monotonic,
        sleep: Sleep,
    ) -> None:
        if rpm is None and tpm is None:
            raise ValueError("a shared budget needs rpm or tpm")
        self._store, self._rpm, self._tpm = store, rpm, tpm
        self._clock, self._sleep = clock, sleep
        # Paces the leased units at the full rate from each lease's start.
        self._local = RateBudget(rpm=rpm, tpm=tpm, clock=clock, sleep=sleep)
        self._lock = anyio.Lock()
        self._requests_left = 0.0
        self._tokens_left = 0.0
        self._debt = 0.0  # tokens used beyond the estimates, not yet sent
        self._pause = 0.0  # seconds of pause to share, not yet sent
        self._wake = anyio.Event()
        self._fallback: RateBudget | None = None
        self._returning = _Returning(clock)
        self._retry_at = -math.inf
        self.processes = 1
        self.calls = 0
        self.shared_pauses = 0
        self.outages = 0

    enabled = True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SharedBudget]:
        """Run the sender of shared pauses until the block ends."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._send_pauses)
            try:
                yield self
            finally:
                tasks.cancel_scope.cancel()

    async def acquire(self, tokens: int) -> None:
        """Wait until one request and ``tokens`` tokens may go, then take them."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens!r}")
        async with self._lock:
            while not self._lease_fits(tokens):
                if not await self._renew(tokens):
                    assert self._fallback is not None
                    await self._fallback.acquire(tokens)
                    return
            await self._local.acquire(tokens)
            if (share := self._returning.share) is not None:
                await share.acquire(tokens)
            self._requests_left -= 1
            self._tokens_left -= tokens

    def settle(self, estimated: int, actual: int) -> None:
        """Usage above the estimate is sent with the next call; a refund goes
        back to this process's lease and its local pacing. No-op without ``--tpm``."""
        if self._tpm is None:
            return
        if self._fallback is not None:
            self._fallback.settle(estimated, actual)
            return
        if (share := self._returning.share) is not None:
            share.settle(estimated, actual)
        if actual > estimated:
            self._debt += actual - estimated
        else:
            self._tokens_left += estimated - actual
            # The local pacing took the estimate: give it back there too, or
            # answers shorter than estimated pace the run below the lease.
            self._local.settle(estimated, actual)

    def hold(self, until: float) -> None:
        """A server asked to pause until ``until`` (monotonic seconds): bank
        nothing here, and tell every process (sent at once, in the background)."""
        self._local.hold(until)
        for local in (self._fallback, self._returning.share):
            if local is not None:
                local.hold(until)
        self._pause = max(self._pause, until - self._clock())
        self._wake.set()

    def report(self) -> dict[str, object]:
        """Figures for the summary."""
        return {
            "redis calls": self.calls,
            "shared pauses seen": self.shared_pauses,
            "redis outages": self.outages,
            "processes sharing": self.processes,
        }

    def _lease_fits(self, tokens: int) -> bool:
        if self._rpm is not None and self._requests_left < 1 - 1e-9:
            return False
        return self._tpm is None or self._tokens_left >= tokens

    def _ask(self, tokens: int) -> LeaseAsk:
        """The next lease: about LEASE_REQUESTS requests of the account's rate,
        and the tokens of as long, or at least what ``tokens`` still lacks."""
        rate = (self._rpm or 0.0) / 60.0
        token_rate = (self._tpm or 0.0) / 60.0
        seconds = min(LEASE_MAX_S, max(LEASE_MIN_S, LEASE_REQUESTS / rate)) if rate else LEASE_MIN_S
        lacking = max(0.0, tokens - max(0.0, self._tokens_left))
        return LeaseAsk(
            requests=max(1.0, rate * seconds) if rate else 0.0,
            request_s=1 / rate if rate else 0.0,
            tokens=max(token_rate * seconds, lacking) if token_rate else 0.0,
            token_s=1 / token_rate if token_rate else 0.0,
            debt=self._debt,
            pause=self._pause,
        )

    async def _renew(self, tokens: int) -> bool:
        """One call for a new lease; sleeps through a shared pause or a refusal.
        False while Redis is away: the caller then uses the fallback budget."""
        if self._fallback is not None and self._clock() < self._retry_at:
            return False
        ask = self._ask(tokens)
        try:
            grant = await self._call(ask)
        except RedisUnavailable as exc:
            self._lost(exc)
            return False
        self._debt -= ask.debt
        if grant.verdict == "pause":
            self.shared_pauses += 1
            self._local.hold(self._clock() + grant.seconds)
            await self._sleep(grant.seconds)
        elif grant.verdict == "wait":
            await self._sleep(grant.seconds)
        else:
            self._local.hold(self._clock() + grant.seconds)
            self._requests_left = max(0.0, self._requests_left) + ask.requests
            self._tokens_left = self._tokens_left + ask.tokens
        return True

    async def _call(self, ask: LeaseAsk) -> Grant:
        self.calls += 1
        grant = await self._store.call(ask)
        if self._pause == ask.pause:
            self._pause = 0.0  # sent; a longer one that came meanwhile goes next
        self.processes = max(1, grant.processes)
        if self._fallback is not None:
            log.warning("Redis at %s is back: the shared limits apply again", self._store.url)
            self._returning.start(self._fallback)
            self._fallback = None
        return grant

    def _lost(self, exc: RedisUnavailable) -> None:
        """Switch to (or stay on) the conservative local share."""
        self._retry_at = self._clock() + RECONNECT_S
        if self._fallback is not None:
            return
        self.outages += 1
        share = self.processes
        log.warning(
            "lost Redis at %s (%s): keeping to 1/%d of the limits locally until it returns",
            self._store.url,
            exc,
            share,
        )
        self._fallback = _share(self._rpm, self._tpm, share, self._clock, self._sleep)
        self._requests_left = self._tokens_left = 0.0

    async def _send_pauses(self) -> None:
        """Send each new pause at once, so other processes stop before their next lease."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if self._pause <= 0:
                continue
            try:
                await self._call(LeaseAsk(pause=self._pause))
            except RedisUnavailable as exc:
                self._lost(exc)


class _Returning:
    """A process's local share, kept for a reconnect period once Redis is
    back: every other process finds it back within its next reconnect try,
    and until then sends at its own share, which a Redis restarted without
    its data does not see."""

    def __init__(self, clock: Monotonic) -> None:
        self._clock = clock
        self._share: RateBudget | None = None
        self._until = -math.inf

    def start(self, share: RateBudget) -> None:
        share.hold(self._clock())  # nothing banked while it was idle
        self._share, self._until = share, self._clock() + RECONNECT_S

    @property
    def share(self) -> RateBudget | None:
        """The share while it still applies, else None."""
        if self._share is not None and self._clock() >= self._until:
            self._share = None
        return self._share


def _share(
    rpm: float | None, tpm: float | None, processes: int, clock: Monotonic, sleep: Sleep
) -> RateBudget:
    """A local budget of 1/``processes`` of the limits, starting empty (no burst)."""
    fallback = RateBudget(
        rpm=None if rpm is None else rpm / processes,
        tpm=None if tpm is None else tpm / processes,
        clock=clock,
        sleep=sleep,
    )
    fallback.hold(clock())
    return fallback
