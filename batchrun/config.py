"""Run configuration: frozen, keyword-only, validated at construction.

Settings come from three layers, later ones winning: built-in defaults, a TOML
job file (``--job``), and command-line flags. ``build_config`` merges the
layers; every dataclass checks its own invariants in ``__post_init__`` and
raises ``UsageError`` with a message that names the setting.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from batchrun.errors import UsageError

ProviderName = Literal["openai", "dashscope", "mock"]
PROVIDERS: tuple[ProviderName, ...] = ("openai", "dashscope", "mock")

# DashScope's own SDK defaults: the knobs batchrun is modelled on.
DEFAULT_POOL_SIZE = 32
DEFAULT_MAX_ASYNC = 32


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _is_count(value: object) -> bool:
    """A whole number >= 1 (a TOML ``true`` is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_seconds(value: object, *, minimum_exclusive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value > 0 if minimum_exclusive else value >= 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Concurrency caps. Invariant: per_host <= max_async <= pool_size.

    ``pool_size`` is the connector's connection limit, ``max_async`` the
    requests in flight over all hosts, ``per_host`` those in flight to one
    host (also the connector's per-host connection limit).
    """

    pool_size: int = DEFAULT_POOL_SIZE
    max_async: int = DEFAULT_MAX_ASYNC
    per_host: int = DEFAULT_MAX_ASYNC
    rpm: float | None = None  # requests per minute, client-side
    tpm: float | None = None  # tokens per minute, client-side (estimated, then corrected)
    adaptive: bool = True  # AIMD on the in-flight limit, up to max_async

    def __post_init__(self) -> None:
        for name in ("pool_size", "max_async", "per_host"):
            value = getattr(self, name)
            _require(_is_count(value), f"{_flag(name)} must be a whole number >= 1, got {value!r}")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            _require(
                value is None or _is_seconds(value, minimum_exclusive=True),
                f"--{name} must be a number > 0, got {value!r}",
            )
        _require(isinstance(self.adaptive, bool), "adaptive_concurrency must be true or false")
        _require(
            self.per_host <= self.max_async <= self.pool_size,
            "limits must satisfy --max-async-requests-per-host <= --max-async-requests"
            f" <= --connection-pool-size, got {self.per_host} <= {self.max_async}"
            f" <= {self.pool_size}",
        )


def resolve_limits(
    *,
    pool_size: int | None,
    max_async: int | None,
    per_host: int | None,
    rpm: float | None = None,
    tpm: float | None = None,
    adaptive: bool = True,
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
            _require(_is_count(value), f"{_flag(name)} must be a whole number >= 1, got {value!r}")
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
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Timeouts in seconds (DashScope SDK defaults).

    ``read`` bounds each wait for response bytes, ``write`` the sending of the
    request body, ``idle`` how long an unused pooled connection is kept.
    """

    connect: float = 120.0
    read: float = 300.0
    write: float = 60.0
    idle: float = 300.0

    def __post_init__(self) -> None:
        for name in ("connect", "read", "write", "idle"):
            value = getattr(self, name)
            _require(
                _is_seconds(value, minimum_exclusive=True),
                f"{_flag(name)} must be a number of seconds > 0, got {value!r}",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Bounds on retrying one row.

    At most ``max_attempts`` attempts, and no new attempt starts once
    ``budget`` seconds have passed since the first. Backoff is exponential
    with full jitter from ``backoff_initial`` up to ``backoff_max`` seconds; a
    server's Retry-After wins when longer, up to ``budget``.
    """

    max_attempts: int = 6
    budget: float = 900.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0

    def __post_init__(self) -> None:
        _require(
            _is_count(self.max_attempts),
            f"--max-attempts must be a whole number >= 1, got {self.max_attempts!r}",
        )
        for name in ("budget", "backoff_initial", "backoff_max"):
            value = getattr(self, name)
            _require(
                _is_seconds(value, minimum_exclusive=False),
                f"{_flag(name)} must be a number of seconds >= 0, got {value!r}",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything one run needs. Paths are as given (relative to the cwd)."""

    input: Path
    out: Path
    provider: ProviderName = "mock"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reorder_window: int = 10_000
    progress: bool = True
    summary_path: Path | None = None
    fsync: Literal["off", "batch", "always"] = "off"
    grace: float = 3.0
    restart: bool = False
    retry_failed: bool = False

    def __post_init__(self) -> None:
        _require(
            self.provider in PROVIDERS,
            f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}",
        )
        _require(
            _is_count(self.reorder_window),
            f"--reorder-window must be a whole number >= 1, got {self.reorder_window!r}",
        )
        _require(
            self.reorder_window >= self.limits.max_async,
            f"--reorder-window ({self.reorder_window}) must be at least"
            f" --max-async-requests ({self.limits.max_async})",
        )
        _require(isinstance(self.params, Mapping), "[params] in a job file must be a table")
        _require(
            self.fsync in ("off", "batch", "always"),
            f"--fsync must be one of off, batch, always, got {self.fsync!r}",
        )
        _require(
            _is_seconds(self.grace, minimum_exclusive=False),
            f"--grace must be a number of seconds >= 0, got {self.grace!r}",
        )
        _require(
            not (self.restart and self.retry_failed),
            "--restart and --retry-failed do not go together: --restart discards the output",
        )


_FLAGS = {
    "pool_size": "--connection-pool-size",
    "max_async": "--max-async-requests",
    "per_host": "--max-async-requests-per-host",
    "connect": "--connect-timeout",
    "read": "--read-timeout",
    "write": "--write-timeout",
    "idle": "--connection-idle-timeout",
    "budget": "--retry-budget",
    "backoff_initial": "--backoff-initial",
    "backoff_max": "--backoff-max",
    "rpm": "--rpm",
    "tpm": "--tpm",
}


def _flag(name: str) -> str:
    return _FLAGS.get(name, name)


# Job-file keys (flat, named like the flags) and the section they belong to.
_JOB_KEYS: dict[str, str] = {
    "input": "run",
    "out": "run",
    "provider": "run",
    "base_url": "run",
    "model": "run",
    "api_key_env": "run",
    "reorder_window": "run",
    "progress": "run",
    "summary": "run",
    "params": "run",
    "fsync": "run",
    "grace": "run",
    "connection_pool_size": "limits",
    "max_async_requests": "limits",
    "max_async_requests_per_host": "limits",
    "rpm": "limits",
    "tpm": "limits",
    "adaptive_concurrency": "limits",
    "connect_timeout": "timeouts",
    "read_timeout": "timeouts",
    "write_timeout": "timeouts",
    "connection_idle_timeout": "timeouts",
    "max_attempts": "retry",
    "retry_budget": "retry",
    "backoff_initial": "retry",
    "backoff_max": "retry",
}


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into flat settings keyed like ``_JOB_KEYS``.

    Top-level keys and the optional tables ``[limits]``, ``[timeouts]`` and
    ``[retry]`` are accepted; ``[params]`` holds default request parameters.
    Unknown keys are an error, so a typo never silently does nothing.
    """
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"job file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("limits", "timeouts", "retry") and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _check_job_key(path, sub_key, section=key)
                flat[sub_key] = sub_value
        else:
            _check_job_key(path, key, section=None)
            flat[key] = value
    return flat


def _check_job_key(path: Path, key: str, *, section: str | None) -> None:
    expected = _JOB_KEYS.get(key)
    if expected is None:
        allowed = ", ".join(sorted(_JOB_KEYS))
        raise UsageError(f"job file {path}: unknown key {key!r}; allowed keys: {allowed}")
    if section is not None and expected != section:
        raise UsageError(f"job file {path}: key {key!r} belongs in [{expected}], not [{section}]")


def build_config(settings: Mapping[str, Any]) -> RunConfig:
    """Make a ``RunConfig`` from flat settings (job file merged with flags).

    Keys are those of ``_JOB_KEYS``; a ``None`` value means "not set".
    """
    s = {key: value for key, value in settings.items() if value is not None}
    for required in ("input", "out"):
        _require(
            required in s, f"no {required} given: pass it on the command line or in the job file"
        )
    limits = resolve_limits(
        pool_size=s.get("connection_pool_size"),
        max_async=s.get("max_async_requests"),
        per_host=s.get("max_async_requests_per_host"),
        rpm=s.get("rpm"),
        tpm=s.get("tpm"),
        adaptive=s.get("adaptive_concurrency", True),
    )
    timeouts = _build(
        Timeouts,
        s,
        connect="connect_timeout",
        read="read_timeout",
        write="write_timeout",
        idle="connection_idle_timeout",
    )
    retry = _build(
        RetryPolicy,
        s,
        max_attempts="max_attempts",
        budget="retry_budget",
        backoff_initial="backoff_initial",
        backoff_max="backoff_max",
    )
    run_keys = _pick(
        s,
        input="input",
        out="out",
        provider="provider",
        base_url="base_url",
        model="model",
        api_key_env="api_key_env",
        params="params",
        reorder_window="reorder_window",
        progress="progress",
        summary_path="summary",
        fsync="fsync",
        grace="grace",
        restart="restart",
        retry_failed="retry_failed",
    )
    for key in ("input", "out", "summary_path"):
        if key in run_keys:
            run_keys[key] = Path(run_keys[key])
    run_keys.setdefault("reorder_window", max(10_000, 4 * limits.max_async))
    return RunConfig(limits=limits, timeouts=timeouts, retry=retry, **run_keys)


def _pick(settings: Mapping[str, Any], **names: str) -> dict[str, Any]:
    return {field_name: settings[key] for field_name, key in names.items() if key in settings}


def _build(cls: Any, settings: Mapping[str, Any], **names: str) -> Any:
    return cls(**_pick(settings, **names))


def replace(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``config`` with ``changes`` applied (and validated again)."""
    return dataclasses.replace(config, **changes)
