"""Job files and the merge of settings into a ``RunConfig``.

Settings come in three layers, later ones winning: built-in defaults, a TOML
job file (``--job``), and command-line flags. Keys are flat and named like
the flags with underscores; in a job file they may also stand in the tables
``[limits]``, ``[timeouts]``, ``[retry]``, ``[costs]`` and ``[batch]``, and ``[params]``
holds default request parameters.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchrun.config import (
    BatchSettings,
    Costs,
    RetryPolicy,
    RunConfig,
    Shard,
    Timeouts,
    is_utf8,
    require,
    resolve_limits,
)
from batchrun.errors import UsageError
from batchrun.schema import ResponseSchema, load_response_schema
from batchrun.settings import BY_KEY, SECTIONS, SETTINGS, default, job_sections

# Job-file keys (flat, named like the flags) and the table each belongs to.
_JOB_KEYS = job_sections()


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML job file into flat settings keyed like ``_JOB_KEYS``.

    Top-level keys and the optional tables ``[limits]``, ``[timeouts]``,
    ``[retry]``, ``[costs]`` and ``[batch]`` are accepted; ``[params]`` holds default
    request parameters. Unknown keys are an error, naming the allowed ones, so
    a typo never silently does nothing.
    """
    path = Path(path)
    try:
        # Editors on Windows may start UTF-8 text with a byte order mark,
        # which TOML does not allow: it is not part of the file's text.
        data = tomllib.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode())
    except FileNotFoundError:
        raise UsageError(f"job file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"job file {path} is a directory: give a TOML file") from None
    except OSError as exc:
        raise UsageError(f"job file {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text
        raise UsageError(
            f"job file {path} is not valid TOML: not UTF-8 text (byte {exc.start})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"job file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    params = data.get("params")
    if params is not None and not isinstance(params, dict):
        raise UsageError(
            f"job file {path}: params must be a table ([params]) of request parameters,"
            f" got {params!r}"
        )
    _check_params_table(path, params or {})
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _check_job_key(path, sub_key, section=key)
                flat[sub_key] = sub_value
        else:
            _check_job_key(path, key, section=None)
            flat[key] = value
    return flat


def _check_params_table(path: Path, params: Mapping[str, Any]) -> None:
    """No batchrun setting in ``[params]`` (``model`` is both): TOML puts
    every key after a table's header into that table, so a setting written
    below ``[params]`` would go to the provider with every request."""
    settings = sorted(key for key in params if key in _JOB_KEYS and key != "model")
    if settings:
        raise UsageError(
            f"job file {path}: [params] holds {', '.join(settings)}, which are batchrun"
            " settings, not request parameters: TOML puts every key after [params] in it;"
            " move them above the first table, or into theirs"
        )


def _check_job_key(path: Path, key: str, *, section: str | None) -> None:
    expected = _JOB_KEYS.get(key)
    if expected is None:
        close = difflib.get_close_matches(key, _JOB_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        flag_only = BY_KEY.get(key)
        if flag_only is not None:  # restart, retry_failed: "did you mean" would mislead
            hint = (
                f" ({flag_only.flag} is a flag only: it says what one command does,"
                " not what the job is)"
            )
        allowed = ", ".join(sorted(_JOB_KEYS))
        raise UsageError(f"job file {path}: unknown key {key!r}{hint}; allowed keys: {allowed}")
    if section is not None and expected != section:
        where = "at the top level" if expected == "run" else f"in [{expected}]"
        raise UsageError(f"job file {path}: key {key!r} belongs {where}, not in [{section}]")


def build_config(settings: Mapping[str, Any]) -> RunConfig:
    """Make a ``RunConfig`` from flat settings (job file merged with flags).

    Keys are the settings' keys (``batchrun.settings``); a ``None`` value means
    "not set".
    """
    given = {key: value for key, value in settings.items() if value is not None}
    _check_known(given)
    _check_types(given)
    for required in ("input", "out"):
        require(
            required in given,
            f"no {required} given: pass it on the command line or in the job file",
        )
    fields = _fields(given)
    limits = resolve_limits(**fields.pop("limits", {}))
    run_fields = fields.pop("", {})
    # Unset, the window grows with the concurrency: each worker keeps a few rows ahead.
    run_fields.setdefault("reorder_window", max(default("reorder_window"), 4 * limits.max_async))
    parts = {name: make(**fields.get(name, {})) for name, make in _PARTS.items()}
    return RunConfig(limits=limits, **parts, **run_fields)


# The parts of a RunConfig built from their own settings (limits: resolve_limits).
_PARTS: dict[str, Callable[..., Any]] = {
    "timeouts": Timeouts,
    "retry": RetryPolicy,
    "costs": Costs,
    "batch": BatchSettings,
}


def _fields(given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The given settings as ``RunConfig`` fields, by part ("" for the run's own)."""
    fields: dict[str, dict[str, Any]] = {}
    for setting in SETTINGS:
        if setting.key in given or any(alias in given for alias in setting.aliases):
            part, _, name = setting.field.rpartition(".")
            convert = _CONVERT.get(setting.key, _as_is)
            fields.setdefault(part, {})[name] = convert(given, setting.key)
    return fields


def _as_is(given: Mapping[str, Any], key: str) -> Any:
    value = given[key]
    return Path(value) if BY_KEY[key].type is Path else value


# Every key ``build_config`` takes: the settings' keys and their aliases.
_KEYS = frozenset(BY_KEY) | frozenset(alias for item in SETTINGS for alias in item.aliases)


def _check_known(settings: Mapping[str, Any]) -> None:
    """An unknown key is an error, as in a job file: a misspelt setting
    (``max_async_request``) would otherwise silently do nothing."""
    for key in settings:
        if key in SECTIONS:  # a job file's table, as tomllib reads it
            raise UsageError(
                f"setting {key!r}: settings are flat, as load_job_file gives them: put the"
                f" keys of [{key}] beside the others (max_async_requests, not"
                " limits.max_async_requests)"
            )
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)." if close else "."
            raise UsageError(
                f"unknown setting {key!r}{hint} Settings are the job-file keys: the flags'"
                " names with underscores (--max-async-requests is max_async_requests)"
            )


def _check_types(settings: Mapping[str, Any]) -> None:
    """A wrong type is named here, before it can reach a ``Path`` or a request."""
    for key, value in settings.items():
        setting = BY_KEY.get(key)
        if setting is None:
            continue
        if setting.text and not isinstance(value, Path):
            require(
                isinstance(value, str) and value.strip() != "",
                f"{key} must be non-empty text, got {value!r}",
            )
        if isinstance(value, str | Path):  # kept in the state's JSON, sent in requests
            require(
                is_utf8(str(value)),
                f"{key} must be UTF-8 text, got {value!r} (a byte that is no UTF-8 in it)",
            )
        if isinstance(value, Path):  # the state keeps the full path
            full = os.path.abspath(value)
            require(
                is_utf8(full),
                f"{key}'s full path {full!r} is no UTF-8 text (a byte that is no UTF-8 in"
                " a directory's name): batchrun keeps it in its state; run from, or name,"
                " a directory whose path is UTF-8",
            )
        if setting.type is bool:
            require(isinstance(value, bool), f"{key} must be true or false, got {value!r}")


def _base_urls(settings: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """``base_url`` (one, or a list) and ``base_urls``, in order, once each."""
    urls: list[Any] = []
    for name in (key, *BY_KEY[key].aliases):
        given = settings.get(name)
        if given is not None:
            urls.extend(given if isinstance(given, list | tuple) else [given])
            require(given not in ([], ()), f"{name} is an empty list: name at least one URL")
    require(all(isinstance(url, str) for url in urls), f"base_url must be text, got {urls!r}")
    # A trailing slash is dropped where a host is left ("http://" stays, so
    # the check that refuses it quotes what was written).
    return tuple(dict.fromkeys(url.rstrip("/") if urlsplit(url).netloc else url for url in urls))


def _response_schema(settings: Mapping[str, Any], key: str) -> ResponseSchema:
    # A non-empty path by now: a text setting (``_check_types``).
    return load_response_schema(Path(settings[key]))


def _shard(settings: Mapping[str, Any], key: str) -> Shard:
    given = settings[key]
    if isinstance(given, Shard):
        return given
    require(isinstance(given, str), f'shard must be text like "0/4", got {given!r}')
    return Shard.parse(given)


# Settings that are more than their value (the rest: a Path if the type says so).
_CONVERT: dict[str, Callable[[Mapping[str, Any], str], Any]] = {
    "base_url": _base_urls,
    "response_schema": _response_schema,
    "shard": _shard,
}
