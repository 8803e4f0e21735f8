"""Tests of batchrun.config: limit resolution, validation, job files, build_config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from batchrun.config import (
    Limits,
    RetryPolicy,
    RunConfig,
    Timeouts,
    resolve_limits,
)
from batchrun.errors import UsageError
from batchrun.jobfile import build_config, load_job_file

INVARIANT = "--max-async-requests-per-host <= --max-async-requests <= --connection-pool-size"


def limits_tuple(limits: Limits) -> tuple[int, int, int]:
    return (limits.per_host, limits.max_async, limits.pool_size)


# --- resolve_limits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool_size", "max_async", "per_host", "expected"),
    [
        # (per_host, max_async, pool_size)
        (None, None, None, (32, 32, 32)),
        (None, 200, None, (200, 200, 200)),
        (None, 8, None, (8, 8, 32)),
        (None, None, 64, (64, 64, 64)),
        (8, None, None, (8, 8, 8)),
        (None, None, 4, (4, 32, 32)),
        (64, 16, None, (16, 16, 64)),
        (128, None, 64, (64, 64, 128)),
        (16, None, 4, (4, 16, 16)),
        (100, 50, 10, (10, 50, 100)),
        (1, 1, 1, (1, 1, 1)),
    ],
)
def test_resolve_limits_follow_rules(
    pool_size: int | None,
    max_async: int | None,
    per_host: int | None,
    expected: tuple[int, int, int],
) -> None:
    limits = resolve_limits(pool_size=pool_size, max_async=max_async, per_host=per_host)
    assert limits_tuple(limits) == expected


@pytest.mark.parametrize(
    ("pool_size", "max_async", "per_host", "got"),
    [
        (None, 32, 64, "got 64 <= 32 <= 32"),
        (32, 64, None, "got 64 <= 64 <= 32"),
        (8, None, 64, "got 64 <= 8 <= 8"),
        (16, 32, 8, "got 8 <= 32 <= 16"),
    ],
)
def test_resolve_limits_reports_user_values_that_break_the_invariant(
    pool_size: int | None, max_async: int | None, per_host: int | None, got: str
) -> None:
    with pytest.raises(UsageError) as info:
        resolve_limits(pool_size=pool_size, max_async=max_async, per_host=per_host)
    message = str(info.value)
    assert INVARIANT in message
    assert got in message


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"pool_size": 0}, "--connection-pool-size"),
        ({"max_async": 0}, "--max-async-requests"),
        ({"per_host": 0}, "--max-async-requests-per-host"),
        ({"max_async": -4}, "--max-async-requests"),
        ({"max_async": 2.5}, "--max-async-requests"),
    ],
)
def test_resolve_limits_bad_value_names_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    full: dict[str, Any] = {"pool_size": None, "max_async": None, "per_host": None, **kwargs}
    with pytest.raises(UsageError, match=f"^{flag} must be a whole number >= 1"):
        resolve_limits(**full)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"max_async": "64"}, "--max-async-requests"),
        ({"pool_size": "8"}, "--connection-pool-size"),
        ({"per_host": "8"}, "--max-async-requests-per-host"),
    ],
)
def test_resolve_limits_string_value_is_a_usage_error(kwargs: dict[str, Any], flag: str) -> None:
    full: dict[str, Any] = {"pool_size": None, "max_async": None, "per_host": None, **kwargs}
    with pytest.raises(UsageError, match=flag):
        resolve_limits(**full)


# --- dataclass validation --------------------------------------------------------


def test_defaults() -> None:
    assert limits_tuple(Limits()) == (32, 32, 32)
    assert Timeouts() == Timeouts(connect=120.0, read=300.0, write=60.0, idle=300.0)
    assert RetryPolicy() == RetryPolicy(
        max_attempts=6, budget=900.0, backoff_initial=1.0, backoff_max=60.0
    )


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", None])
@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("pool_size", "--connection-pool-size"),
        ("max_async", "--max-async-requests"),
        ("per_host", "--max-async-requests-per-host"),
    ],
)
def test_limits_rejects_bad_values(field: str, flag: str, bad: Any) -> None:
    with pytest.raises(UsageError) as info:
        Limits(**{field: bad})
    assert str(info.value) == f"{flag} must be a whole number >= 1, got {bad!r}"


def test_limits_invariant_checked_by_dataclass() -> None:
    with pytest.raises(UsageError, match="limits must satisfy"):
        Limits(pool_size=10, max_async=20, per_host=5)
    assert limits_tuple(Limits(pool_size=10, max_async=10, per_host=10)) == (10, 10, 10)


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, "5", None])
@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("connect", "--connect-timeout"),
        ("read", "--read-timeout"),
        ("write", "--write-timeout"),
        ("idle", "--connection-idle-timeout"),
    ],
)
def test_timeouts_reject_bad_values(field: str, flag: str, bad: Any) -> None:
    with pytest.raises(UsageError) as info:
        Timeouts(**{field: bad})
    assert str(info.value) == f"{flag} must be a finite number of seconds > 0, got {bad!r}"


def test_timeouts_accept_ints_and_fractions() -> None:
    timeouts = Timeouts(connect=1, read=0.25, write=2, idle=0.5)
    assert (timeouts.connect, timeouts.read, timeouts.write, timeouts.idle) == (1, 0.25, 2, 0.5)


@pytest.mark.parametrize("bad", [0, -3, 2.0, "3", None])
def test_retry_policy_rejects_bad_max_attempts(bad: Any) -> None:
    with pytest.raises(UsageError) as info:
        RetryPolicy(max_attempts=bad)
    assert str(info.value) == f"--max-attempts must be a whole number >= 1, got {bad!r}"


@pytest.mark.parametrize("bad", [-1, -0.001, "10", None])
@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("budget", "--retry-budget"),
        ("backoff_initial", "--backoff-initial"),
        ("backoff_max", "--backoff-max"),
    ],
)
def test_retry_policy_rejects_bad_seconds(field: str, flag: str, bad: Any) -> None:
    with pytest.raises(UsageError) as info:
        RetryPolicy(**{field: bad})
    bound = "> 0" if field == "budget" else ">= 0"
    assert str(info.value) == f"{flag} must be a finite number of seconds {bound}, got {bad!r}"


def test_retry_policy_accepts_waits_of_zero_seconds_but_no_budget_of_zero() -> None:
    policy = RetryPolicy(max_attempts=1, budget=0.5, backoff_initial=0, backoff_max=0)
    assert (policy.max_attempts, policy.budget, policy.backoff_max) == (1, 0.5, 0)
    with pytest.raises(UsageError, match="--retry-budget must be a finite number of seconds > 0"):
        RetryPolicy(budget=0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RetryPolicy(max_attempts=True),
        lambda: Limits(per_host=True),
        lambda: Timeouts(connect=True),
    ],
    ids=["max_attempts", "per_host", "connect"],
)
def test_booleans_are_not_numbers(build: Any) -> None:
    with pytest.raises(UsageError):
        build()


# --- load_job_file ---------------------------------------------------------------


def write_job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_job_file_flattens_tables(tmp_path: Path) -> None:
    path = write_job(
        tmp_path,
        """
input = "rows.jsonl"
out = "results.jsonl"
provider = "dashscope"
model = "qwen-plus"
max_attempts = 3

[limits]
max_async_requests = 64
connection_pool_size = 128

[timeouts]
read_timeout = 30.5

[retry]
retry_budget = 120
backoff_max = 8

[params]
temperature = 0.2
max_tokens = 256
""",
    )
    assert load_job_file(path) == {
        "input": "rows.jsonl",
        "out": "results.jsonl",
        "provider": "dashscope",
        "model": "qwen-plus",
        "max_attempts": 3,
        "max_async_requests": 64,
        "connection_pool_size": 128,
        "read_timeout": 30.5,
        "retry_budget": 120,
        "backoff_max": 8,
        "params": {"temperature": 0.2, "max_tokens": 256},
    }


def test_a_job_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'model = "qwen-plus"\n[limits]\nmax_async_requests = 8\n')
    assert load_job_file(path) == {"model": "qwen-plus", "max_async_requests": 8}


def test_load_job_file_then_build_config(tmp_path: Path) -> None:
    path = write_job(
        tmp_path,
        """
input = "rows.jsonl"
out = "results.jsonl"
provider = "openai"
max_async_requests_per_host = 48

[timeouts]
connect_timeout = 5
connection_idle_timeout = 12

[retry]
max_attempts = 2

[params]
temperature = 0
""",
    )
    config = build_config(load_job_file(path))
    assert config.input == Path("rows.jsonl")
    assert config.out == Path("results.jsonl")
    assert config.provider == "openai"
    assert limits_tuple(config.limits) == (48, 48, 48)
    assert config.timeouts == Timeouts(connect=5, read=300.0, write=60.0, idle=12)
    assert config.retry.max_attempts == 2
    assert config.retry.budget == 900.0
    assert dict(config.params) == {"temperature": 0}


def test_load_job_file_empty(tmp_path: Path) -> None:
    assert load_job_file(write_job(tmp_path, "")) == {}


def test_an_unknown_setting_is_named_with_the_closest_one() -> None:
    with pytest.raises(
        UsageError,
        match=r"unknown setting 'max_async_request' \(did you mean 'max_async_requests'\?\)",
    ):
        build_config({"input": "in.jsonl", "out": "out.jsonl", "max_async_request": 8})
    with pytest.raises(UsageError, match=r"unknown setting 'zzz'\. Settings are the job-file keys"):
        build_config({"input": "in.jsonl", "out": "out.jsonl", "zzz": 1})
    # Aliases are settings too.
    assert build_config({"input": "i", "out": "o", "base_urls": ["http://h/v1"]}).base_urls


def test_a_job_file_that_is_no_text_file_is_a_usage_error(tmp_path: Path) -> None:
    binary = tmp_path / "job.toml"
    binary.write_bytes(b"model = '\xff\xfe'\n")
    with pytest.raises(UsageError, match=r"job file .*job.toml is not valid TOML: not UTF-8 text"):
        load_job_file(binary)
    with pytest.raises(UsageError, match=f"job file {tmp_path} is a directory: give a TOML file"):
        load_job_file(tmp_path)


@pytest.mark.parametrize(
    ("text", "bad_key", "hint"),
    [
        ("max_async = 5\n", "max_async", " (did you mean 'max_async_requests'?)"),
        ("[limits]\npool = 3\n", "pool", ""),
        ("[network]\nproxy = 'x'\n", "network", ""),
        ("[retry]\nmax_attempt = 3\n", "max_attempt", " (did you mean 'max_attempts'?)"),
        ("max_async_request = 3\n", "max_async_request", " (did you mean 'max_async_requests'?)"),
    ],
)
def test_load_job_file_unknown_key_names_the_closest_and_lists_allowed_keys(
    tmp_path: Path, text: str, bad_key: str, hint: str
) -> None:
    path = write_job(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_job_file(path)
    message = str(info.value)
    assert f"job file {path}: unknown key {bad_key!r}{hint}; allowed keys: " in message
    allowed = message.split("allowed keys: ", 1)[1].split(", ")
    assert allowed == sorted(allowed)
    for key in ("input", "out", "max_async_requests", "read_timeout", "max_attempts", "params"):
        assert key in allowed


@pytest.mark.parametrize(
    ("text", "key", "expected", "given"),
    [
        ("[limits]\nread_timeout = 5\n", "read_timeout", "timeouts", "limits"),
        ("[timeouts]\nmax_attempts = 2\n", "max_attempts", "retry", "timeouts"),
        ("[retry]\nconnection_pool_size = 2\n", "connection_pool_size", "limits", "retry"),
        ("[limits]\nmodel = 'm'\n", "model", "run", "limits"),
    ],
)
def test_load_job_file_key_in_wrong_table(
    tmp_path: Path, text: str, key: str, expected: str, given: str
) -> None:
    path = write_job(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_job_file(path)
    where = "at the top level" if expected == "run" else f"in [{expected}]"
    assert str(info.value) == (f"job file {path}: key {key!r} belongs {where}, not in [{given}]")


def test_load_job_file_invalid_toml(tmp_path: Path) -> None:
    path = write_job(tmp_path, "input = \n[limits\n")
    with pytest.raises(UsageError, match=r"is not valid TOML: ") as info:
        load_job_file(path)
    assert str(path) in str(info.value)


def test_load_job_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(UsageError) as info:
        load_job_file(path)
    assert str(info.value) == f"job file {path} does not exist"


# --- build_config ----------------------------------------------------------------


def test_build_config_requires_input() -> None:
    with pytest.raises(UsageError, match=r"^no input given"):
        build_config({"out": "o.jsonl"})


def test_build_config_requires_out() -> None:
    with pytest.raises(UsageError, match=r"^no out given"):
        build_config({"input": "i.jsonl"})


def test_build_config_none_means_unset() -> None:
    with pytest.raises(UsageError, match=r"^no input given"):
        build_config({"input": None, "out": "o.jsonl"})
    config = build_config(
        {"input": "i.jsonl", "out": "o.jsonl", "model": None, "max_async_requests": None}
    )
    assert config.model is None
    assert limits_tuple(config.limits) == (32, 32, 32)


def test_build_config_defaults_and_paths() -> None:
    config = build_config({"input": "data/i.jsonl", "out": "o.jsonl", "summary": "s.json"})
    assert isinstance(config, RunConfig)
    assert config.input == Path("data/i.jsonl")
    assert isinstance(config.input, Path)
    assert config.out == Path("o.jsonl")
    assert config.summary_path == Path("s.json")
    assert config.provider == "mock"
    assert config.base_urls == ()
    assert config.progress is True
    assert dict(config.params) == {}
    assert config.reorder_window == 10_000
    assert config.timeouts == Timeouts()
    assert config.retry == RetryPolicy()


def test_build_config_summary_absent() -> None:
    assert build_config({"input": "i", "out": "o"}).summary_path is None


@pytest.mark.parametrize(("max_async", "window"), [(8, 10_000), (2500, 10_000), (5000, 20_000)])
def test_build_config_default_reorder_window(max_async: int, window: int) -> None:
    config = build_config({"input": "i", "out": "o", "max_async_requests": max_async})
    assert config.reorder_window == window


def test_build_config_reorder_window_given() -> None:
    config = build_config({"input": "i", "out": "o", "reorder_window": 32})
    assert config.reorder_window == 32


def test_build_config_reorder_window_below_max_async() -> None:
    with pytest.raises(UsageError) as info:
        build_config({"input": "i", "out": "o", "reorder_window": 16})
    assert str(info.value) == "--reorder-window (16) must be at least --max-async-requests (32)"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "100"])
def test_build_config_reorder_window_bad_value(bad: Any) -> None:
    with pytest.raises(UsageError) as info:
        build_config({"input": "i", "out": "o", "reorder_window": bad})
    assert str(info.value) == f"--reorder-window must be a whole number >= 1, got {bad!r}"


@pytest.mark.parametrize("bad", [0, -1, 86_400.5, 1e300, float("nan"), "30"])
def test_build_config_poll_interval_bad_value(bad: Any) -> None:
    # 1e300 is finite: a run would sleep through its batches, silent, for ever.
    with pytest.raises(UsageError) as info:
        build_config({"input": "i", "out": "o", "mode": "batch", "poll_interval": bad})
    assert str(info.value) == (
        "--poll-interval must be a number of seconds > 0 and at most 86400 (a day: the"
        f" providers' window for a batch), got {bad!r}"
    )


def test_build_config_poll_interval_of_a_day_is_taken() -> None:
    config = build_config({"input": "i", "out": "o", "mode": "batch", "poll_interval": 86_400})
    assert config.batch.poll_interval == 86_400


@pytest.mark.parametrize("provider", ["openai", "dashscope", "mock"])
def test_build_config_known_providers(provider: str) -> None:
    assert build_config({"input": "i", "out": "o", "provider": provider}).provider == provider


def test_build_config_unknown_provider() -> None:
    with pytest.raises(UsageError) as info:
        build_config({"input": "i", "out": "o", "provider": "azure"})
    assert str(info.value) == "--provider must be one of openai, dashscope, mock, got 'azure'"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"seed": 1 << 64}, "parameter seed is 18446744073709551616: an integer past 64 bits"),
        ({"stop": [1.0, float("nan")]}, "parameter stop is [1.0, nan]: JSON has no NaN"),
        ({"x": {"y": [-(1 << 70)]}}, "parameter x is {'y': [-1180591620717411303424]}: an int"),
        ({"stream": True}, "parameter stream asks for streamed answers"),
        ({1: 2}, "parameter 1: a parameter's name must be text"),
        ({"stop": ["\ud800"]}, "parameter stop is ['\\ud800']: text with a lone surrogate"),
        ({"x": {"\udfff": 1}}, "an object whose keys are not all text"),
        ({"x": {"a": {3: 4}}}, "parameter x is {'a': {3: 4}}: an object whose keys are not all"),
    ],
)
def test_build_config_refuses_params_that_cannot_be_sent_as_given(
    params: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        build_config({"input": "i", "out": "o", "params": params})
    build_config({"input": "i", "out": "o", "params": {"seed": (1 << 64) - 1, "stream": False}})


def test_build_config_params_must_be_a_table() -> None:
    with pytest.raises(UsageError, match=r"\[params\] in a job file must be a table"):
        build_config({"input": "i", "out": "o", "params": ["temperature"]})


def test_build_config_maps_flat_keys() -> None:
    config = build_config(
        {
            "input": "i",
            "out": "o",
            "provider": "dashscope",
            "base_url": "http://localhost:9/api/v1",
            "model": "qwen-turbo",
            "api_key_env": "MY_KEY",
            "progress": False,
            "connection_pool_size": 64,
            "max_async_requests": 16,
            "max_async_requests_per_host": 4,
            "connect_timeout": 1.5,
            "read_timeout": 2.5,
            "write_timeout": 3.5,
            "connection_idle_timeout": 4.5,
            "max_attempts": 9,
            "retry_budget": 30,
            "backoff_initial": 0.1,
            "backoff_max": 2,
        }
    )
    assert config.base_urls == ("http://localhost:9/api/v1",)
    assert config.model == "qwen-turbo"
    assert config.api_key_env == "MY_KEY"
    assert config.progress is False
    assert limits_tuple(config.limits) == (4, 16, 64)
    assert config.timeouts == Timeouts(connect=1.5, read=2.5, write=3.5, idle=4.5)
    assert config.retry == RetryPolicy(
        max_attempts=9, budget=30, backoff_initial=0.1, backoff_max=2
    )


@pytest.mark.parametrize(
    ("key", "flag"),
    [
        ("read_timeout", "--read-timeout"),
        ("retry_budget", "--retry-budget"),
        ("max_attempts", "--max-attempts"),
    ],
)
def test_build_config_bad_value_names_flag(key: str, flag: str) -> None:
    with pytest.raises(UsageError, match=f"^{flag} must be"):
        build_config({"input": "i", "out": "o", key: -1})


def test_build_config_limits_violation() -> None:
    with pytest.raises(UsageError, match=INVARIANT):
        build_config(
            {"input": "i", "out": "o", "max_async_requests": 64, "connection_pool_size": 8}
        )


def test_build_config_string_limit_from_job_file(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "i"\nout = "o"\n[limits]\nmax_async_requests = "64"\n')
    with pytest.raises(UsageError, match="--max-async-requests"):
        build_config(load_job_file(path))


def test_job_file_operations_keys(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'input = "in.jsonl"\nout = "out.jsonl"\nshard = "2/4"\nmetrics_file = "m.prom"\n'
        'base_urls = ["http://a:8000/v1", "http://b:8000/v1/"]\n'
        "[costs]\nprice_input_per_million = 0.8\nprice_output_per_million = 2.0\n"
        "context_limit = 32768\n"
        "[limits]\nrpm = 600\ntpm = 100000\nadaptive_concurrency = false\n"
    )

    config = build_config(load_job_file(job))

    assert config.base_urls == ("http://a:8000/v1", "http://b:8000/v1")
    assert config.shard is not None
    assert str(config.shard) == "2/4"
    assert config.costs.price_output_per_million == 2.0
    assert config.costs.context_limit == 32768
    assert (config.limits.rpm, config.limits.tpm, config.limits.adaptive) == (600, 100000, False)
    assert config.metrics_file == Path("m.prom")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"shard": "4/4"}, "--shard must be I/N with 0 <= I < N"),
        ({"shard": "two"}, "--shard must be I/N"),
        ({"base_url": "localhost:8000"}, "--base-url must be an http:// or https:// URL"),
        ({"context_limit": 0}, "context_limit must be a whole number"),
        ({"price_input_per_million": -1}, "price_input_per_million must be a number >= 0"),
        ({"rpm": 0}, "--rpm must be a finite number >= 0.01"),
    ],
)
def test_operations_settings_are_validated(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_config({"input": "in.jsonl", "out": "out.jsonl", **settings})


def test_costs_key_in_the_wrong_table_is_named(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("[limits]\ncontext_limit = 5\n")
    with pytest.raises(UsageError, match=r"'context_limit' belongs in \[costs\]"):
        load_job_file(job)


def test_load_job_file_takes_a_path_as_text(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'model = "m"\n')
    assert load_job_file(str(path)) == load_job_file(path)


def test_locked_error_is_exported() -> None:
    import batchrun
    from batchrun.errors import LockedError

    assert batchrun.LockedError is LockedError
    assert "LockedError" in batchrun.__all__


def test_a_setting_written_below_params_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, '[params]\ntemperature = 0.2\nmax_async_requests = 8\nmodel = "m"\n')
    with pytest.raises(UsageError) as caught:
        load_job_file(path)
    assert str(caught.value) == (
        f"job file {path}: [params] holds max_async_requests, which are batchrun settings, not"
        " request parameters: TOML puts every key after [params] in it; move them above the"
        " first table, or into theirs"
    )


def test_a_table_given_to_build_config_says_settings_are_flat() -> None:
    with pytest.raises(UsageError, match=r"setting 'limits': settings are flat, as load_job_file"):
        build_config({"input": "i", "out": "o", "limits": {"rpm": 60}})


@pytest.mark.parametrize("key", ["model", "out", "input"])
def test_a_setting_with_a_byte_that_is_no_utf8_is_refused(key: str) -> None:
    # A command-line argument's stray byte becomes a lone surrogate: the state
    # files (JSON) and the requests cannot carry it.
    settings: dict[str, object] = {"input": "i", "out": "o", key: "x\udcff"}
    with pytest.raises(UsageError, match=f"{key} must be UTF-8 text"):
        build_config(settings)


def test_a_path_in_a_directory_whose_name_is_no_utf8_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative path is kept whole in the state (JSON): the directory run
    # from must be UTF-8 too, or the run would stop with a traceback.
    odd = tmp_path / "bad\udcff"
    odd.mkdir()
    monkeypatch.chdir(odd)
    with pytest.raises(UsageError, match=r"input's full path '.*' is no UTF-8 text"):
        build_config({"input": Path("in.jsonl"), "out": Path("o.jsonl")})
