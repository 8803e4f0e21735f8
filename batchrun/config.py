"""Run configuration: frozen, keyword-only, validated at construction.

Settings come from three layers, later ones winning: built-in defaults, a TOML
job file (``--job``), and command-line flags. ``build_config`` merges the
layers; every dataclass checks its own invariants in ``__post_init__`` and
raises ``UsageError`` with a message that names the setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchrun.errors import UsageError
from batchrun.records import Defaults
from batchrun.schema import ResponseSchema, response_format
from batchrun.settings import (
    FALLBACKS,
    FSYNC_POLICIES,
    LOOPS,
    MODES,
    PROVIDERS,
    Fallback,
    FsyncPolicy,
    LoopName,
    Mode,
    ProviderName,
    default,
    flag,
)

# A body past max_response_bytes fails its row (response_too_large) instead of exhausting memory.
DEFAULT_MAX_RESPONSE_BYTES: int = default("max_response_bytes")
DEFAULT_POOL_SIZE: int = default("connection_pool_size")
DEFAULT_MAX_ASYNC: int = default("max_async_requests")
DEFAULT_ADAPTIVE: bool = default("adaptive_concurrency")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _is_count(value: object) -> bool:
    """A whole number >= 1 (a TOML ``true`` is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# The slowest rates taken, per minute: one request per 100 minutes, one
# token a minute. Below them a run would wait for ages and look hung.
MIN_RPM = 0.01
MIN_TPM = 1.0


def _check_params(params: Mapping[str, Any]) -> None:
    """``[params]``: a table (a job file may hold anything there) of values
    JSON carries as given, and no streaming."""
    require(isinstance(params, Mapping), "[params] in a job file must be a table")
    for key, value in params.items():
        require(
            isinstance(key, str) and is_utf8(key),
            f"parameter {key!r}: a parameter's name must be text (UTF-8)",
        )
        problem = _json_problem(value)
        require(problem is None, f"parameter {key} is {value!r}: {problem}")
    require(
        not params.get("stream"),
        "parameter stream asks for streamed answers; batchrun reads whole answers: drop it",
    )


def _check_base_url(url: str) -> None:
    """An http(s) URL with a host, to which endpoint paths can be added, and
    without credentials (the key goes in its environment variable)."""
    require(
        _is_http_url(url),
        f"--base-url must be an http:// or https:// URL such as https://host/v1, got {url!r}",
    )
    require(
        not any(c in "?#" or c.isspace() for c in url),
        "--base-url must be a base URL without a query (?), a fragment (#) or spaces:"
        f" paths such as /chat/completions are added to its end; got {url!r}",
    )
    require(
        urlsplit(url).username is None,
        "--base-url must not hold a user name or password: the API key goes in"
        " the provider's key variable (OPENAI_API_KEY, DASHSCOPE_API_KEY)",
    )


def _json_problem(value: Any) -> str | None:
    """Why ``value`` (a parameter, at any depth) cannot be sent as JSON as
    given, or None: a NaN or infinity (JSON has none), or an integer past 64
    bits (JSON parsers round it; the run could not record it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "JSON has no NaN or infinity to send"
    if isinstance(value, str) and not is_utf8(value):
        return "text with a lone surrogate (\\ud800 to \\udfff), which UTF-8 cannot carry"
    if isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
        return "an integer past 64 bits, which JSON parsers round: give it as a string"
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) and is_utf8(key) for key in value):
            return "an object whose keys are not all text, which JSON cannot carry"
        value = list(value.values())
    if isinstance(value, list):
        return next(filter(None, map(_json_problem, value)), None)
    return None


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: it holds no lone surrogate
    (as an argument's byte that is no UTF-8 becomes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_http_url(url: object) -> bool:
    """An absolute http or https URL with a host name that can be looked up,
    and a port of 1-65535 if it names one: nothing else can be sent to."""
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError:  # a malformed port or IPv6 address
        return False
    host = parts.hostname
    return parts.scheme in ("http", "https") and _is_host(host) and port != 0


# What a host name may hold once IDNA-encoded: DNS names (underscores too, as
# container names have them), IPv4 and IPv6 addresses with a zone.
_HOST_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_:%")


def _is_host(host: str | None) -> bool:
    """A host name the resolver can take: IDNA-encodable (no empty label, none
    over 63 characters) and without spaces or other stray characters."""
    if not host:
        return False
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return set(encoded.lower()) <= _HOST_CHARACTERS


def _is_seconds(value: object, *, minimum_exclusive: bool) -> bool:
    """A finite number > 0 (or >= 0): ``inf`` and ``nan`` bound nothing."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > 0 if minimum_exclusive else value >= 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Concurrency caps. Invariant: per_host <= max_async <= pool_size.

    ``pool_size`` is the connection pool's limit (open connections, busy or
    idle), ``max_async`` the requests in flight over all hosts, ``per_host``
    those in flight to one host (also the pool's per-host connection limit).
    """

    pool_size: int = DEFAULT_POOL_SIZE
    max_async: int = DEFAULT_MAX_ASYNC
    per_host: int = default("max_async_requests_per_host")
    rpm: float | None = None  # requests per minute, client-side
    tpm: float | None = None  # tokens per minute, client-side (estimated, then corrected)
    adaptive: bool = DEFAULT_ADAPTIVE  # AIMD on the in-flight limit, up to max_async
    # redis:// or rediss:// URL: rpm, tpm and pauses shared by every process using it.
    shared_limits: str | None = None
    limits_key: str | None = None  # which shared budget; None: provider, host and model

    def __post_init__(self) -> None:
        for name in ("pool_size", "max_async", "per_host"):
            value = getattr(self, name)
            require(
                _is_count(value),
                f"{flag(f'limits.{name}')} must be a whole number >= 1, got {value!r}",
            )
        for name, least in (("rpm", MIN_RPM), ("tpm", MIN_TPM)):
            value = getattr(self, name)
            require(
                value is None or (_is_seconds(value, minimum_exclusive=True) and value >= least),
                f"--{name} must be a finite number >= {least:g}, got {value!r}",
            )
        require(isinstance(self.adaptive, bool), "adaptive_concurrency must be true or false")
        self._check_shared()
        require(
            self.per_host <= self.max_async <= self.pool_size,
            "limits must satisfy --max-async-requests-per-host <= --max-async-requests"
            f" <= --connection-pool-size, got {self.per_host} <= {self.max_async}"
            f" <= {self.pool_size}",
        )

    def _check_shared(self) -> None:
        url = self.shared_limits
        if url is None:
            require(self.limits_key is None, "--limits-key needs --shared-limits")
            return
        require(
            isinstance(url, str) and url.startswith(("redis://", "rediss://")),
            f"--shared-limits must be a redis:// or rediss:// URL, got {url!r}",
        )
        problem = _redis_url_problem(url)
        require(problem is None, f"--shared-limits {redact_url(url)}: {problem}")
        require(
            self.rpm is not None or self.tpm is not None,
            "--shared-limits shares --rpm and --tpm: set at least one of them",
        )
        require(
            self.limits_key is None or (isinstance(self.limits_key, str) and self.limits_key != ""),
            f"--limits-key must be non-empty text, got {self.limits_key!r}",
        )


def _redis_url_problem(url: str) -> str | None:
    """What keeps a redis:// URL from naming one server and database, or None.
    Redis's own parser reads a missing host as localhost and a database
    that is no number as 0: another server's, or another budget's, limits."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return "the port must be a number from 1 to 65535 (redis://HOST:PORT/DB)"
    if not parts.hostname:
        return "name the host: redis://HOST:PORT/DB"
    if port == 0:
        return "the port must be a number from 1 to 65535 (redis://HOST:PORT/DB)"
    database = parts.path.lstrip("/")
    if database and not (database.isascii() and database.isdigit()):
        return f"the database must be a number (redis://HOST:PORT/DB), got {database!r}"
    return None


def redact_url(url: str) -> str:
    """``url`` without its password, for messages (whatever else is wrong with it)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    credentials, _, host = parts.netloc.rpartition("@")
    user = credentials.partition(":")[0]
    return parts._replace(netloc=f"{user}@{host}" if user else host).geturl()


def resolve_limits(
    *,
    pool_size: int | None = None,
    max_async: int | None = None,
    per_host: int | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    adaptive: bool = DEFAULT_ADAPTIVE,
    shared_limits: str | None = None,
    limits_key: str | None = None,
) -> Limits:
    """Fill unset knobs from the set ones, then validate.

    Unset knobs follow the set ones so that one flag is enough: raising
    ``max_async`` raises the per-host cap and the pool with it; lowering it
    lowers the per-host cap. Values the user set are never changed, so a
    combination that breaks the invariant is reported, not silently fixed.
    """
    given = {"pool_size": pool_size, "max_async": max_async, "per_host": per_host}
    for name, value in given.items():
        if value is not None:
            require(
                _is_count(value),
                f"{flag(f'limits.{name}')} must be a whole number >= 1, got {value!r}",
            )
    if max_async is None:
        max_async = max(DEFAULT_MAX_ASYNC, per_host or 0)
        if pool_size is not None:
            max_async = min(max_async, pool_size)
    if per_host is None:
        per_host = max_async
    if pool_size is None:
        pool_size = max(DEFAULT_POOL_SIZE, max_async)
    return Limits(
        pool_size=pool_size,
        max_async=max_async,
        per_host=per_host,
        rpm=rpm,
        tpm=tpm,
        adaptive=adaptive,
        shared_limits=shared_limits,
        limits_key=limits_key,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Timeouts in seconds (DashScope SDK defaults).

    ``read`` bounds each wait for response bytes (not the whole answer: a
    server trickling one byte at a time never trips it), ``write`` the sending
    of the request body, ``request`` one whole attempt (connect, send, wait,
    read), ``idle`` how long an unused pooled connection is kept.
    """

    connect: float = default("connect_timeout")
    read: float = default("read_timeout")
    write: float = default("write_timeout")
    request: float = default("request_timeout")
    idle: float = default("connection_idle_timeout")

    def __post_init__(self) -> None:
        for name in ("connect", "read", "write", "request", "idle"):
            value = getattr(self, name)
            require(
                _is_seconds(value, minimum_exclusive=True),
                f"{flag(f'timeouts.{name}')} must be a finite number of seconds > 0, got {value!r}",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Bounds on retrying one row.

    At most ``max_attempts`` attempts, and at most ``budget`` seconds from the
    first attempt's start to the row's outcome: an attempt still in flight
    then is cancelled, and a wait that would end past it is not begun. Backoff is exponential
    with full jitter from ``backoff_initial`` up to ``backoff_max`` seconds; a
    server's Retry-After wins when longer, up to ``budget``.
    """

    max_attempts: int = default("max_attempts")
    budget: float = default("retry_budget")
    backoff_initial: float = default("backoff_initial")
    backoff_max: float = default("backoff_max")

    def __post_init__(self) -> None:
        require(
            _is_count(self.max_attempts),
            f"--max-attempts must be a whole number >= 1, got {self.max_attempts!r}",
        )
        # A row's budget of 0 would cut every attempt as it is sent (and
        # maybe billed); waits of 0 are fine.
        for name, exclusive in (
            ("budget", True),
            ("backoff_initial", False),
            ("backoff_max", False),
        ):
            value = getattr(self, name)
            require(
                _is_seconds(value, minimum_exclusive=exclusive),
                f"{flag(f'retry.{name}')} must be a finite number of seconds"
                f" {'>' if exclusive else '>='} 0, got {value!r}",
            )


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count``: input rows ``r`` (0-based) with
    ``r % count == index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        require(
            _is_count(self.count) and isinstance(self.index, int) and 0 <= self.index < self.count,
            f"--shard must be I/N with 0 <= I < N, got {self.index}/{self.count}",
        )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` to a shard."""
        index, sep, count = text.partition("/")
        require(
            bool(sep) and index.strip().isdigit() and count.strip().isdigit(),
            f"--shard must be I/N (for example 0/4), got {text!r}",
        )
        return cls(int(index), int(count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, row: int) -> bool:
        """Whether input row ``row`` (0-based) is this shard's."""
        return row % self.count == self.index

    def seq(self, row: int) -> int:
        """The place (0-based) of an owned input row in this shard's output."""
        return row // self.count

    def rows_before(self, row: int) -> int:
        """How many of this shard's rows come before input row ``row``."""
        return max(0, (row - self.index + self.count - 1) // self.count)

    def line_of(self, place: int) -> int:
        """The input line (1-based) of this shard's output row ``place`` (0-based)."""
        return place * self.count + self.index + 1


# The whole input: what a run without --shard processes.
WHOLE = Shard(0, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Costs:
    """What the job's model costs and holds, and what the job may spend.

    Prices are per million tokens in the provider's currency, real-time;
    ``batch_price_share`` is the share of them an answer from a batch costs
    (the providers' Batch APIs charge half); ``context_limit`` is the model's
    context window in tokens; ``max_cost`` caps the spend of all runs on one
    output (in the same currency; needs both prices).
    """

    price_input_per_million: float | None = None
    price_output_per_million: float | None = None
    batch_price_share: float = default("batch_price_share")
    context_limit: int | None = None
    max_cost: float | None = None

    @property
    def priced(self) -> bool:
        """Whether both prices are known, so rows can be costed."""
        prices = (self.price_input_per_million, self.price_output_per_million)
        return None not in prices

    def price(self, tokens_in: int, tokens_out: int) -> float:
        """The cost of ``tokens_in`` prompt and ``tokens_out`` output tokens (0 unpriced)."""
        per_in = self.price_input_per_million or 0.0
        per_out = self.price_output_per_million or 0.0
        return (tokens_in * per_in + tokens_out * per_out) / 1_000_000

    def batch_price(self, tokens_in: int, tokens_out: int) -> float:
        """``price`` of an answer from a batch: ``batch_price_share`` of it."""
        return self.price(tokens_in, tokens_out) * self.batch_price_share

    def __post_init__(self) -> None:
        for name in ("price_input_per_million", "price_output_per_million"):
            value = getattr(self, name)
            require(
                value is None or _is_seconds(value, minimum_exclusive=False),
                f"{name} must be a number >= 0, got {value!r}",
            )
        share = self.batch_price_share
        require(
            _is_seconds(share, minimum_exclusive=False) and share <= 1,
            f"batch_price_share must be a number from 0 to 1, got {share!r}",
        )
        require(
            self.context_limit is None or _is_count(self.context_limit),
            f"context_limit must be a whole number of tokens >= 1, got {self.context_limit!r}",
        )
        require(
            self.max_cost is None or _is_seconds(self.max_cost, minimum_exclusive=False),
            f"--max-cost must be an amount >= 0, got {self.max_cost!r}",
        )
        require(
            self.max_cost is None or self.priced,
            "--max-cost needs the prices: --price-input-per-million and"
            " --price-output-per-million (or the job file's [costs])",
        )


# The longest poll interval taken, in seconds: a batch ends within the
# providers' 24 h window, and a longer wait (1e300 passes as finite) would
# leave a run asleep, silent, long after its batches had ended.
MAX_POLL_INTERVAL = 86_400.0


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSettings:
    """Settings of ``--mode batch``.

    A file holds at most ``rows`` requests and ``bytes`` bytes (None: the
    provider's own cap); running batches are polled every ``poll_interval``
    seconds (jittered); ``keep_files`` keeps the uploaded and result files on
    the provider; ``fallback`` "online" sends the rows of an expired or
    cancelled batch online instead of in a new batch.
    """

    rows: int = default("batch_rows")
    bytes: int | None = None
    poll_interval: float = default("poll_interval")
    keep_files: bool = default("keep_files")
    fallback: Fallback = default("fallback")

    def __post_init__(self) -> None:
        require(
            _is_count(self.rows) and self.rows <= 50_000,
            f"--batch-rows must be a whole number from 1 to 50000, got {self.rows!r}",
        )
        require(
            self.bytes is None or (_is_count(self.bytes) and self.bytes >= 1024),
            f"--batch-bytes must be a whole number >= 1024, got {self.bytes!r}",
        )
        require(
            _is_seconds(self.poll_interval, minimum_exclusive=True)
            and self.poll_interval <= MAX_POLL_INTERVAL,
            f"--poll-interval must be a number of seconds > 0 and at most {MAX_POLL_INTERVAL:.0f}"
            f" (a day: the providers' window for a batch), got {self.poll_interval!r}",
        )
        require(isinstance(self.keep_files, bool), "keep_files must be true or false")
        require(
            self.fallback in FALLBACKS,
            f"--fallback must be {' or '.join(FALLBACKS)}, got {self.fallback!r}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything one run needs. Paths are as given (relative to the cwd)."""

    input: Path
    out: Path
    provider: ProviderName = default("provider")
    base_urls: tuple[str, ...] = ()  # empty: the provider's default
    model: str | None = None
    api_key_env: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reorder_window: int = default("reorder_window")
    # Bytes of finished results kept in memory while an earlier row is unfinished; past it, in
    # the journal.
    reorder_bytes: int = default("reorder_bytes")
    progress: bool = default("progress")
    summary_path: Path | None = None
    fsync: FsyncPolicy = default("fsync")
    loop: LoopName = default("loop")  # the event loop (batchrun.eventloop)
    grace: float = default("grace")
    restart: bool = default("restart")
    retry_failed: bool = default("retry_failed")
    shard: Shard | None = None
    metrics_file: Path | None = None
    costs: Costs = field(default_factory=lambda: Costs())
    cache: Path | None = None  # a result store shared by jobs (--cache DIR)
    mode: Mode = default("mode")
    batch: BatchSettings = field(default_factory=lambda: BatchSettings())
    ca_bundle: Path | None = None  # PEM CA certificates trusted besides the system's
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    response_schema: ResponseSchema | None = None  # loaded and checked by build_config
    job: Path | None = None  # the job file the settings came from (--job): read, never written

    def __post_init__(self) -> None:
        self._check_values()
        self._check_combinations()

    def _check_values(self) -> None:
        """Each setting alone is in its range."""
        require(
            _is_count(self.max_response_bytes),
            f"--max-response-bytes must be a whole number >= 1, got {self.max_response_bytes!r}",
        )
        require(
            self.mode in MODES,
            f"--mode must be {' or '.join(MODES)}, got {self.mode!r}",
        )
        require(
            self.provider in PROVIDERS,
            f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}",
        )
        require(
            _is_count(self.reorder_window),
            f"--reorder-window must be a whole number >= 1, got {self.reorder_window!r}",
        )
        require(
            _is_count(self.reorder_bytes),
            f"--reorder-bytes must be a whole number of bytes >= 1, got {self.reorder_bytes!r}",
        )
        require(
            self.reorder_window >= self.limits.max_async,
            f"--reorder-window ({self.reorder_window}) must be at least"
            f" --max-async-requests ({self.limits.max_async})",
        )

    def _check_combinations(self) -> None:
        """The run-level settings, and the ones that only go together some ways."""
        _check_params(self.params)
        require(
            self.fsync in FSYNC_POLICIES,
            f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, got {self.fsync!r}",
        )
        require(
            self.loop in LOOPS,
            f"--loop must be one of {', '.join(LOOPS)}, got {self.loop!r}",
        )
        require(
            _is_seconds(self.grace, minimum_exclusive=False),
            f"--grace must be a finite number of seconds >= 0, got {self.grace!r}",
        )
        for url in self.base_urls:
            _check_base_url(url)
        require(
            not (self.mode == "batch" and self.retry_failed),
            "--retry-failed sends rows online: run it without --mode batch",
        )
        require(
            not (self.mode == "batch" and self.costs.max_cost is not None),
            "--max-cost stops a run before the row that would pass it, and a batch is"
            " submitted whole: leave --max-cost out of a --mode batch run (batchrun"
            " validate estimates a job's cost before it is sent)",
        )
        require(
            not (self.restart and self.retry_failed),
            "--restart and --retry-failed do not go together: --restart discards the output",
        )

    def request_defaults(self) -> Defaults:
        """What every line gets unless it says otherwise: ``model``, ``params``
        and, with a response schema, the request for JSON answers."""
        chat = {}
        if self.response_schema is not None:
            chat["response_format"] = response_format(self.provider, self.response_schema)
        return Defaults(model=self.model, params=self.params, chat_params=chat)
