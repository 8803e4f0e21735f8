"""Job files and the merge of settings into a ``RunConfig``.

Settings come in three layers, later ones winning: built-in defaults, a TOML
job file (``--job``), and command-line flags. Keys are flat and named like
the flags with underscores; in a job file they may also stand in the tables
``[limits]``, ``[timeouts]``, ``[retry]``, ``[costs]`` and ``[batch]``, and ``[params]``
holds default request parameters.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from batchrun.config import (
    BatchSettings,
    Costs,
    Limits,
    RetryPolicy,
    RunConfig,
    Shard,
    Timeouts,
    require,
    resolve_limits,
)
from batchrun.errors import UsageError
from batchrun.schema import ResponseSchema, load_response_schema

# Job-file keys (flat, named like the flags) and the section they belong to.
_JOB_KEYS: dict[str, str] = {
    "input": "run",
    "out": "run",
    "provider": "run",
    "base_url": "run",
    "base_urls": "run",
    "shard": "run",
    "metrics_file": "run",
    "model": "run",
    "api_key_env": "run",
    "reorder_window": "run",
    "reorder_bytes": "run",
    "progress": "run",
    "summary": "run",
    "params": "run",
    "fsync": "run",
    "loop": "run",
    "grace": "run",
    "mode": "run",
    "response_schema": "run",
    "batch_rows": "batch",
    "batch_bytes": "batch",
    "poll_interval": "batch",
    "keep_files": "batch",
    "fallback": "batch",
    "ca_bundle": "run",
    "max_response_bytes": "limits",
    "connection_pool_size": "limits",
    "max_async_requests": "limits",
    "max_async_requests_per_host": "limits",
    "rpm": "limits",
    "tpm": "limits",
    "adaptive_concurrency": "limits",
    "shared_limits": "limits",
    "limits_key": "limits",
    "connect_timeout": "timeouts",
    "read_timeout": "timeouts",
    "write_timeout": "timeouts",
    "request_timeout": "timeouts",
    "connection_idle_timeout": "timeouts",
    "max_attempts": "retry",
    "retry_budget": "retry",
    "backoff_initial": "retry",
    "backoff_max": "retry",
    "price_input_per_million": "costs",
    "price_output_per_million": "costs",
    "context_limit": "costs",
    "max_cost": "costs",
    "cache": "run",
}
_TABLES = ("limits", "timeouts", "retry", "costs", "batch")


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into flat settings keyed like ``_JOB_KEYS``.

    Top-level keys and the optional tables ``[limits]``, ``[timeouts]``,
    ``[retry]``, ``[costs]`` and ``[batch]`` are accepted; ``[params]`` holds default
    request parameters. Unknown keys are an error, naming the allowed ones, so
    a typo never silently does nothing.
    """
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"job file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    params = data.get("params")
    if params is not None and not isinstance(params, dict):
        raise UsageError(
            f"job file {path}: params must be a table ([params]) of request parameters,"
            f" got {params!r}"
        )
    for key, value in data.items():
        if key in _TABLES and isinstance(value, dict):
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
    _check_types(s)
    for required in ("input", "out"):
        require(
            required in s, f"no {required} given: pass it on the command line or in the job file"
        )
    limits = _limits(s)
    return RunConfig(
        response_schema=_response_schema(s.get("response_schema")),
        batch=_batch(s),
        limits=limits,
        timeouts=_timeouts(s),
        retry=_retry(s),
        costs=_costs(s),
        base_urls=_base_urls(s),
        shard=_shard(s.get("shard")),
        **_run_keys(s, limits),
    )


def _limits(s: Mapping[str, Any]) -> Limits:
    return resolve_limits(
        pool_size=s.get("connection_pool_size"),
        max_async=s.get("max_async_requests"),
        per_host=s.get("max_async_requests_per_host"),
        rpm=s.get("rpm"),
        tpm=s.get("tpm"),
        adaptive=s.get("adaptive_concurrency", True),
        shared_limits=s.get("shared_limits"),
        limits_key=s.get("limits_key"),
    )


def _timeouts(s: Mapping[str, Any]) -> Timeouts:
    return _build(
        Timeouts,
        s,
        connect="connect_timeout",
        read="read_timeout",
        write="write_timeout",
        request="request_timeout",
        idle="connection_idle_timeout",
    )


def _retry(s: Mapping[str, Any]) -> RetryPolicy:
    return _build(
        RetryPolicy,
        s,
        max_attempts="max_attempts",
        budget="retry_budget",
        backoff_initial="backoff_initial",
        backoff_max="backoff_max",
    )


def _run_keys(s: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """The run-level settings, by their ``RunConfig`` field names."""
    run_keys = _pick(
        s,
        input="input",
        out="out",
        provider="provider",
        model="model",
        api_key_env="api_key_env",
        params="params",
        reorder_window="reorder_window",
        reorder_bytes="reorder_bytes",
        progress="progress",
        summary_path="summary",
        fsync="fsync",
        loop="loop",
        grace="grace",
        restart="restart",
        retry_failed="retry_failed",
        metrics_file="metrics_file",
        cache="cache",
        mode="mode",
        ca_bundle="ca_bundle",
        max_response_bytes="max_response_bytes",
    )
    require(
        isinstance(run_keys.get("ca_bundle", ""), str | Path),
        f"ca_bundle must be a path to a PEM file, got {run_keys.get('ca_bundle')!r}",
    )
    for key in ("input", "out", "summary_path", "metrics_file", "cache", "ca_bundle"):
        if key in run_keys:
            run_keys[key] = Path(run_keys[key])
    run_keys.setdefault("reorder_window", max(10_000, 4 * limits.max_async))
    return run_keys


def _costs(s: Mapping[str, Any]) -> Costs:
    return _build(
        Costs,
        s,
        price_input_per_million="price_input_per_million",
        price_output_per_million="price_output_per_million",
        context_limit="context_limit",
        max_cost="max_cost",
    )


def _batch(s: Mapping[str, Any]) -> BatchSettings:
    return _build(
        BatchSettings,
        s,
        rows="batch_rows",
        bytes="batch_bytes",
        poll_interval="poll_interval",
        keep_files="keep_files",
        fallback="fallback",
    )


# Settings that must be non-empty text (a path or a name), and switches.
_TEXT_KEYS = (
    "input",
    "out",
    "summary",
    "metrics_file",
    "provider",
    "model",
    "api_key_env",
    "fsync",
    "loop",
)
_SWITCH_KEYS = ("progress", "restart", "retry_failed", "adaptive_concurrency")


def _check_types(settings: Mapping[str, Any]) -> None:
    """A wrong type is named here, before it can reach a ``Path`` or a request."""
    for key in _TEXT_KEYS:
        value = settings.get(key)
        if value is not None and not isinstance(value, Path):
            require(
                isinstance(value, str) and value.strip() != "",
                f"{key} must be non-empty text, got {value!r}",
            )
    for key in _SWITCH_KEYS:
        value = settings.get(key)
        require(
            value is None or isinstance(value, bool), f"{key} must be true or false, got {value!r}"
        )


def _base_urls(settings: Mapping[str, Any]) -> tuple[str, ...]:
    """``base_url`` (one, or a list) and ``base_urls``, in order, once each."""
    urls: list[Any] = []
    for key in ("base_url", "base_urls"):
        given = settings.get(key)
        if given is not None:
            urls.extend(given if isinstance(given, list | tuple) else [given])
    require(all(isinstance(url, str) for url in urls), f"base_url must be text, got {urls!r}")
    return tuple(dict.fromkeys(url.rstrip("/") for url in urls))


def _response_schema(given: Any) -> ResponseSchema | None:
    if given is None or isinstance(given, ResponseSchema):
        return given
    require(isinstance(given, str | Path), f"response_schema must be a path, got {given!r}")
    return load_response_schema(Path(given))


def _shard(given: Any) -> Shard | None:
    if given is None or isinstance(given, Shard):
        return given
    require(isinstance(given, str), f'shard must be text like "0/4", got {given!r}')
    return Shard.parse(given)


_T = TypeVar("_T")


def _pick(settings: Mapping[str, Any], **names: str) -> dict[str, Any]:
    return {field_name: settings[key] for field_name, key in names.items() if key in settings}


def _build(cls: Callable[..., _T], settings: Mapping[str, Any], **names: str) -> _T:
    return cls(**_pick(settings, **names))
