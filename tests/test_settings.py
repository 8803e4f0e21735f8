"""The settings table (batchrun/settings.py) against the command line, job
files, the providers and the README: every setting is a flag and a job-file
key of the same name, and flags override the job file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, get_origin

import orjson
import pytest
from typer.testing import CliRunner

import batchrun.heap
import batchrun.runner
from batchrun import cli
from batchrun.config import RunConfig, Shard
from batchrun.providers import _PROVIDERS
from batchrun.schema import ResponseSchema
from batchrun.settings import BY_KEY, MIB, PROVIDERS, SECTIONS, SETTINGS, Setting

ROOT = Path(__file__).resolve().parents[1]

# Settings whose job key and flag differ by design: a table of request
# parameters in the job file, one KEY=JSON pair per --param.
NAMED_OTHERWISE = {"params": "--param"}
# What one invocation does, not a property of the job: flags only.
FLAG_ONLY = {"restart", "retry_failed"}

# Values a setting needs beside it to be valid.
COMPANIONS: dict[str, dict[str, Any]] = {
    "max_cost": {"price_input_per_million": 1.0, "price_output_per_million": 2.0},
    "shared_limits": {"rpm": 60.0},
    "limits_key": {"rpm": 60.0, "shared_limits": "redis://127.0.0.1:1/0"},
}


class FakeResult:
    """What ``runner.run`` returns, for a run that sends nothing."""

    exit_code = 0

    def render(self) -> str:
        return "nothing sent"

    def to_dict(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``batchrun run ARGS`` through the real command line, up to the config
    it would run (nothing is sent): returns that config."""
    configs: list[RunConfig] = []

    def record(config: RunConfig, *, handle_signals: bool) -> FakeResult:
        configs.append(config)
        return FakeResult()

    monkeypatch.setattr(batchrun.runner, "run", record)
    # The command's process-wide set-up (log handler, allocator, collector) is not this test's.
    monkeypatch.setattr(cli, "_setup_logging", lambda: None)
    monkeypatch.setattr(batchrun.heap, "pin_mmap_threshold", lambda: True)
    monkeypatch.setattr(batchrun.heap, "space_out_collections", lambda: None)

    def invoke(*args: str | Path) -> RunConfig:
        result = CliRunner().invoke(cli.app, ["run", *map(str, args)])
        assert result.exit_code == 0, result.output
        return configs.pop()

    return invoke


def write_job(path: Path, values: dict[str, Any]) -> Path:
    """A job file with each key in its own table (top level for "run")."""
    tables: dict[str, list[str]] = {}
    for key, value in values.items():
        section = BY_KEY[key].section if key in BY_KEY else "params"
        text = f"{value!r}".lower() if isinstance(value, bool) else _toml(value)
        tables.setdefault(section, []).append(f"{key} = {text}")
    lines = tables.pop("run", [])
    for section, keys in tables.items():
        lines += [f"[{section}]", *keys]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return repr(value)


def examples(setting: Setting, tmp_path: Path) -> tuple[Any, Any]:
    """Two valid values of ``setting`` that differ from each other: the job
    file's, then the flag's."""
    special: dict[str, tuple[Any, Any]] = {
        "shard": ("0/2", "1/2"),
        "base_url": ("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"),
        "shared_limits": ("redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"),
        "batch_rows": (20_000, 30_000),
        "batch_bytes": (4096, 8192),
        "context_limit": (4096, 8192),
        "batch_price_share": (0.25, 0.75),
    }
    if setting.key in special:
        return special[setting.key]
    if setting.key == "response_schema":
        paths = [tmp_path / "job.schema.json", tmp_path / "flag.schema.json"]
        for path in paths:
            path.write_text('{"type": "object"}')
        return paths[0], paths[1]
    if setting.choices:
        return setting.choices[1], setting.choices[0]
    if setting.type is bool:
        return not setting.default, setting.default
    if setting.type in (int, float):
        base = setting.default or setting.type(16)
        return base * 2, base * 3
    if setting.type is Path:  # in the test's own directory: the summary is written
        return tmp_path / f"job-{setting.key}", tmp_path / f"flag-{setting.key}"
    return f"job-{setting.key}", f"flag-{setting.key}"


def flag_args(setting: Setting, value: Any) -> list[str]:
    if setting.argument:
        return [str(value)]
    if setting.type is bool:
        positive, _, negative = setting.flag_decls[0].partition("/")
        return [positive if value else negative]
    return [setting.flag, str(value)]


def field_value(config: RunConfig, setting: Setting) -> Any:
    value: Any = config
    for name in setting.field.split("."):
        value = getattr(value, name)
    return value.path if isinstance(value, ResponseSchema) else value


def expected(setting: Setting, value: Any) -> Any:
    if setting.key == "base_url":
        return (value,)
    if setting.key == "shard":
        return Shard.parse(value)
    return Path(value) if setting.type is Path else value


JOB_SETTINGS = [s for s in SETTINGS if s.job_key and s.key != "params"]


@pytest.mark.parametrize("setting", JOB_SETTINGS, ids=lambda s: s.key)
def test_every_setting_is_a_job_key_and_a_flag_that_overrides_it(
    setting: Setting, tmp_path: Path, invoke: Any
) -> None:
    job_value, flag_value = examples(setting, tmp_path)
    assert job_value != flag_value
    base = {"input": "in.jsonl", "out": str(tmp_path / "out.jsonl")}
    job = write_job(
        tmp_path / "job.toml", {**base, **COMPANIONS.get(setting.key, {}), setting.key: job_value}
    )

    from_job = invoke("--job", job)
    from_flag = invoke("--job", job, *flag_args(setting, flag_value))

    assert field_value(from_job, setting) == expected(setting, job_value)
    assert field_value(from_flag, setting) == expected(setting, flag_value)


def test_params_flags_add_to_the_job_files_table(tmp_path: Path, invoke: Any) -> None:
    job = write_job(
        tmp_path / "job.toml",
        {"input": "in.jsonl", "out": str(tmp_path / "o"), "temperature": 0.1, "top_p": 0.5},
    )
    config = invoke("--job", job, "--param", "temperature=0.7")
    assert dict(config.params) == {"temperature": 0.7, "top_p": 0.5}


@pytest.mark.parametrize("key", sorted(FLAG_ONLY))
def test_flag_only_settings(key: str, tmp_path: Path, invoke: Any) -> None:
    setting = BY_KEY[key]
    out = tmp_path / "out.jsonl"
    assert field_value(invoke("in.jsonl", "--out", out), setting) is False
    assert field_value(invoke("in.jsonl", "--out", out, setting.flag), setting) is True
    job = write_job(tmp_path / "job.toml", {"input": "in.jsonl", "out": str(out), key: True})
    refused = CliRunner().invoke(cli.app, ["run", "--job", str(job)])
    assert refused.exit_code == 2
    # Named as a flag only, not likened to another key ("did you mean 'metrics_file'?").
    assert f"unknown key {key!r} ({setting.flag} is a flag only: it says" in refused.output
    assert "did you mean" not in refused.output


def test_a_base_url_flag_replaces_the_job_files_base_urls(tmp_path: Path, invoke: Any) -> None:
    job = write_job(
        tmp_path / "job.toml",
        {"input": "in.jsonl", "out": str(tmp_path / "o"), "base_url": "http://127.0.0.1:1"},
    )
    job.write_text(job.read_text() + 'base_urls = ["http://127.0.0.1:3"]\n')
    assert invoke("--job", job).base_urls == ("http://127.0.0.1:1", "http://127.0.0.1:3")
    config = invoke("--job", job, "--base-url", "http://127.0.0.1:2")
    assert config.base_urls == ("http://127.0.0.1:2",)


def test_the_adaptive_flag_has_the_job_keys_name_too(tmp_path: Path, invoke: Any) -> None:
    out = tmp_path / "out.jsonl"
    job = write_job(tmp_path / "job.toml", {"adaptive_concurrency": False})
    assert not invoke("in.jsonl", "--out", out, "--no-adaptive-concurrency").limits.adaptive
    assert not invoke("in.jsonl", "--out", out, "--no-adaptive").limits.adaptive
    assert invoke("in.jsonl", "--out", out, "--job", job, "--adaptive-concurrency").limits.adaptive
    # Both spellings given: the one --help shows (the job key's) wins.
    both = invoke("in.jsonl", "--out", out, "--adaptive", "--no-adaptive-concurrency")
    assert not both.limits.adaptive


def test_one_name_per_setting() -> None:
    assert len(BY_KEY) == len(SETTINGS)
    for setting in SETTINGS:
        if setting.argument:
            continue
        # The spelling --help shows is the job key's: other spellings are hidden aliases.
        spellings = [part for decl in setting.flag_decls for part in decl.split("/")]
        name = NAMED_OTHERWISE.get(setting.key, "--" + setting.key.replace("_", "-"))
        assert name in spellings, setting.key
    assert {s.key for s in SETTINGS if not s.job_key} == FLAG_ONLY
    assert {s.section for s in SETTINGS} <= {"run", *SECTIONS}


def test_defaults_are_immutable_and_of_the_settings_type() -> None:
    for setting in SETTINGS:
        value = setting.default
        assert isinstance(value, int | float | str | bool | tuple | type(None)), setting.key
        if value is not None and get_origin(setting.type) is None:
            assert isinstance(value, setting.type), setting.key


def test_choices_are_named_in_the_help() -> None:
    for setting in SETTINGS:
        for choice in setting.choices:
            assert choice in setting.help_text, (setting.key, choice)


def test_every_provider_name_has_a_dialect() -> None:
    assert set(_PROVIDERS) == set(PROVIDERS)


def test_help_lists_every_flag() -> None:
    result = CliRunner().invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"})
    for setting in SETTINGS:
        assert (setting.key.upper() if setting.argument else setting.flag) in result.output
    assert "needs [costs] prices" in result.output


def test_reference_job_file_names_every_key_in_its_table() -> None:
    text = (ROOT / "jobs" / "reference.toml").read_text()
    section = "run"
    found: dict[str, str] = {}
    for line in text.splitlines():
        table = re.match(r"\[(\w+)\]", line)
        if table:
            section = table.group(1)
        key = re.match(r"#? ?(\w+) = ", line)
        if key and section != "params":
            found[key.group(1)] = section
    wanted = {key: s.section for s in SETTINGS if s.job_key for key in (s.key, *s.aliases)}
    wanted.pop("params")
    assert found == wanted
    tomllib.loads(text)  # and it stays valid TOML


def _readme_default(text: str) -> Any:
    """A README default ("32", "120 s", "10,000", "256 MiB", "`off`", "none", "on")."""
    text = text.strip().strip("`").replace(",", "")
    if text in ("none", "on"):
        return None if text == "none" else True
    number = re.fullmatch(r"(\d+)( s| MiB)?", text)
    if number is None:
        return text
    return int(number.group(1)) * (MIB if number.group(2) == " MiB" else 1)


def test_readme_settings_table_agrees_with_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| flag | default | what it bounds |")[1].split("\n\n")[0]
    by_flag = {s.flag: s for s in SETTINGS}
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    assert len(rows) >= 15
    for flags, default in rows:
        for flag in re.findall(r"`(--[a-z-]+)", flags):
            assert flag in by_flag, flag
            assert _readme_default(default) == by_flag[flag].default, flag
    for flag, key in re.findall(r"`(--[a-z-]+)` \(`(\w+)`\)", readme):
        assert by_flag[flag].key == key


def test_validate_estimates_a_batch_job_at_the_batch_price(tmp_path: Path) -> None:
    sample = str(ROOT / "sample_inputs" / "prompts.jsonl")
    prices = ["--price-input-per-million", "1", "--price-output-per-million", "2"]
    job = write_job(tmp_path / "job.toml", {"mode": "batch"})

    def estimate(*args: str) -> float:
        done = CliRunner().invoke(cli.app, ["validate", sample, *prices, "--json", *args])
        return float(orjson.loads(done.output)["estimated_cost"])

    online = estimate()
    assert estimate("--mode", "batch") == pytest.approx(online / 2)
    assert estimate("--job", str(job)) == pytest.approx(online / 2)
    assert estimate("--job", str(job), "--mode", "online") == pytest.approx(online)
    assert estimate("--mode", "batch", "--batch-price-share", "0.1") == pytest.approx(online / 10)


def test_validate_takes_the_prices_and_context_as_flags_over_the_job_file(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.toml", {"context_limit": 1_000_000})
    sample = ROOT / "sample_inputs" / "prompts.jsonl"
    args = ["validate", str(sample), "--job", str(job), "--json"]
    prices = ["--price-input-per-million", "1", "--price-output-per-million", "2"]
    with_job = CliRunner().invoke(cli.app, args)
    with_flags = CliRunner().invoke(cli.app, [*args, *prices, "--context-limit", "10"])
    assert with_job.exit_code == 0, with_job.output
    assert with_flags.exit_code == 1, with_flags.output
    assert orjson.loads(with_job.output)["estimated_cost"] is None
    report = orjson.loads(with_flags.output)
    assert report["estimated_cost"] > 0
    assert report["over_context"] > 0
