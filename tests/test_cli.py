"""The real command line, run as a subprocess: flags, job files, exit codes."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import anyio
import orjson
import pytest
from typer.testing import CliRunner

from batchrun import __main__ as entry
from batchrun import __version__
from batchrun.cli import app
from batchrun.mock.server import MockServer
from tests.conftest import chat, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(extra)
    return env


def batchrun(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(**env),
        cwd=ROOT,
    )


async def abatchrun(*args: str | Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI run while this test's event loop keeps serving the mock."""
    with anyio.fail_after(60):
        return await anyio.run_process(
            [sys.executable, "-m", "batchrun", *map(str, args)],
            env=cli_env(**env),
            cwd=ROOT,
            check=False,
        )


def test_sample_input_with_the_embedded_mock(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    summary_path = tmp_path / "summary.json"

    done = batchrun(
        "run",
        "sample_inputs/prompts.jsonl",
        "--out",
        out,
        "--provider",
        "mock",
        "--no-progress",
        "--summary",
        summary_path,
    )

    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    assert len(rows) == len((ROOT / "sample_inputs/prompts.jsonl").read_bytes().splitlines())
    assert [r["line"] for r in rows] == list(range(1, len(rows) + 1))
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["ok"] == len(rows)
    assert summary["exit_code"] == 0
    assert {
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "tokens_in",
        "tokens_out",
        "retries",
        "failed_by_code",
        "duration_s",
        "rows_per_s",
    } <= summary.keys()
    assert "rows" in done.stderr
    assert "ok" in done.stderr


def test_failed_rows_exit_1(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("fine"), chat("no mock:fail=400")])

    done = batchrun("run", source, "--out", tmp_path / "o.jsonl", "--no-progress")

    assert done.returncode == 1, done.stderr
    assert "invalid_request_error: 1" in done.stderr


def test_limit_rule_violation_exits_2_naming_the_rule(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("x")])

    done = batchrun(
        "run",
        source,
        "--out",
        tmp_path / "o.jsonl",
        "--max-async-requests",
        "64",
        "--connection-pool-size",
        "16",
    )

    assert done.returncode == 2
    assert "--max-async-requests-per-host <= --max-async-requests <= --connection-pool-size" in (
        done.stderr
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    bad_job = tmp_path / "job.toml"
    bad_job.write_text('input = "x.jsonl"\nout = "y.jsonl"\nmax_asink = 3\n')

    missing_input = batchrun("run", tmp_path / "nope.jsonl", "--out", tmp_path / "o.jsonl")
    unknown_key = batchrun("run", "--job", bad_job)
    no_key = batchrun(
        "run",
        "sample_inputs/prompts.jsonl",
        "--out",
        tmp_path / "o.jsonl",
        "--provider",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
    )
    unknown_flag = batchrun("run", "--bogus")

    assert missing_input.returncode == 2
    assert "does not exist" in missing_input.stderr
    assert unknown_key.returncode == 2
    assert "max_asink" in unknown_key.stderr
    assert no_key.returncode == 2
    assert "OPENAI_API_KEY" in no_key.stderr
    assert unknown_flag.returncode == 2


@pytest.mark.asyncio
async def test_flags_override_the_job_file(tmp_path: Path, server: MockServer) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i} mock:delay=0.05") for i in range(20)])
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "{source}"\nout = "{tmp_path / "o.jsonl"}"\nprovider = "openai"\n'
        f'base_url = "{server.base_url}"\nmodel = "from-job"\n'
        "[limits]\nmax_async_requests = 2\n"
    )

    done = await abatchrun(
        "run", "--job", job, "--model", "from-flag", "--no-progress", OPENAI_API_KEY="sk-test"
    )

    assert done.returncode == 0, done.stderr.decode()
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert {r["response"]["body"]["model"] for r in rows} == {"from-flag"}
    assert server.stats.max_in_flight == 2  # the job file's limit still applies


@pytest.mark.asyncio
async def test_bad_key_exits_3_with_a_redacted_message(tmp_path: Path, server: MockServer) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(200)])

    done = await abatchrun(
        "run",
        source,
        "--out",
        tmp_path / "o.jsonl",
        "--provider",
        "openai",
        "--base-url",
        server.base_url,
        "--max-async-requests",
        "2",
        "--no-progress",
        OPENAI_API_KEY="bad-key",
    )

    stderr = done.stderr.decode()
    assert done.returncode == 3, stderr
    assert "aborted" in stderr
    assert "invalid_api_key" in stderr
    assert "bad-key" not in stderr
    assert server.stats.requests <= 4


def test_log_lines_without_a_terminal(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(3)])

    done = batchrun("run", source, "--out", tmp_path / "o.jsonl")

    assert done.returncode == 0
    assert "progress 3/3" in done.stderr  # the final log line, not a bar


def test_mock_server_command_serves_until_stopped() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "batchrun", "mock-server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "mock server listening on http://127.0.0.1:" in line
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert proc.returncode in (0, -15)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["run", "", "--out", "o"], "INPUT"),
        (["run", "i", "--out", "o", "--job", ""], "--job"),
        (["validate", " "], "INPUT"),
        (["validate", "i", "--response-schema", ""], "--response-schema"),
        (["status", ""], "OUT"),
        (["cancel", ""], "OUT"),
        (["export", "", "--to", "t.csv"], "OUT"),
        (["export", "o", "--to", ""], "--to"),
        (["merge", "a", "", "--out", "m"], "SHARD_OUT"),
        (["merge", "a", "--out", ""], "--out"),
        (["cache", "prune", "", "--older-than", "1d"], "DIR"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, list) else value,
)
def test_an_empty_path_is_a_usage_error_naming_it(args: list[str], name: str) -> None:
    # Path("") is the current directory: an empty path must not reach one.
    done = batchrun(*args)
    assert done.returncode == 2
    assert done.stderr == f"batchrun: error: {name} is empty: give a path\n"


def test_mock_server_refuses_an_address_it_cannot_listen_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = batchrun("mock-server", "--port", str(port))
    out_of_range = batchrun("mock-server", "--port", "70000")
    negative = batchrun("mock-server", "--latency", "-1")

    assert busy.returncode == 2
    assert busy.stderr.startswith(f"batchrun: error: cannot listen on 127.0.0.1:{port}: ")
    assert busy.stderr.count("\n") == 1  # one line, no traceback
    assert out_of_range.returncode == negative.returncode == 2
    assert "70000 is not in the range 0<=x<=65535" in out_of_range.stderr
    assert "-1.0 is not in the range x>=0.0" in negative.stderr


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_job_files_are_valid(job: Path) -> None:
    from batchrun.jobfile import build_config, load_job_file

    settings = {"input": "in.jsonl", "out": "out.jsonl", **load_job_file(job)}
    config = build_config(settings)
    assert config.limits.per_host <= config.limits.max_async <= config.limits.pool_size


def test_validate_reports_bad_lines_and_exits_1(tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [chat("fine", custom_id="a"), b"", b"{oops", chat("again", custom_id="a")],
    )

    done = batchrun("validate", source, "--json")

    assert done.returncode == 1, done.stderr
    report = orjson.loads(done.stdout)
    assert report["rows"] == 4
    assert report["malformed"] == 2
    assert report["duplicate_ids"] == 1
    assert [line for line, _ in report["malformed_examples"]] == [2, 3]


def test_validate_a_clean_file_exits_0_and_sends_nothing() -> None:
    done = batchrun("validate", "sample_inputs/prompts.jsonl", "--job", "jobs/reference.toml")

    assert done.returncode == 0, done.stderr
    assert "100 rows" in done.stdout
    assert "estimated cost" in done.stdout


def test_metrics_file_is_a_valid_prometheus_textfile(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = tmp_path / "batchrun.prom"
    done = batchrun(
        "run",
        "sample_inputs/prompts.jsonl",
        "--out",
        tmp_path / "o.jsonl",
        "--no-progress",
        "--metrics-file",
        metrics,
    )

    assert done.returncode == 0, done.stderr
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    (done_sample,) = families["batchrun_rows_done"].samples
    assert done_sample.value == 100
    assert done_sample.labels["batch_job"] == "o.jsonl"
    # Two jobs whose outputs share a name keep apart in one textfile directory.
    assert done_sample.labels["output"] == str(tmp_path / "o.jsonl")
    assert "batchrun_concurrency_limit" in families


def test_python_api_runs_a_job_and_returns_the_summary(tmp_path: Path) -> None:
    from batchrun import build_config, run

    summary = run(
        build_config(
            {
                "input": ROOT / "sample_inputs/prompts.jsonl",
                "out": tmp_path / "out.jsonl",
                "provider": "mock",
                "progress": False,
            }
        )
    )

    assert summary.exit_code == 0
    assert summary.ok == 100
    assert summary.to_dict()["failed_by_code"] == {}


def test_a_key_over_plain_http_to_a_remote_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    from batchrun.runner import _warn_plain_http

    with caplog.at_level("WARNING", logger="batchrun"):
        _warn_plain_http("http://127.0.0.1:8000/v1", "sk-1")
        _warn_plain_http("http://localhost:8000/v1", "sk-1")
        _warn_plain_http("https://api.example.com/v1", "sk-1")
        assert not caplog.records
        _warn_plain_http("http://api.example.com/v1", "sk-1")
    assert "plain http to api.example.com" in caplog.text
    assert "sk-1" not in caplog.text


def test_version_loads_no_http_stack() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "batchrun", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout == f"batchrun {__version__}\n"
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "batchrun" in imported
    # Not even the command line interface: ``--version`` alone answers first.
    assert not {"aiohttp", "typer", "batchrun.cli", "batchrun.runner"} & imported


def test_version_with_other_words_goes_through_the_command_line() -> None:
    result = CliRunner().invoke(app, ["--version", "run"])
    assert result.exit_code == 0
    assert result.output == f"batchrun {__version__}\n"


def test_the_installed_version_is_the_package_version() -> None:
    # pyproject.toml reads the version from ``batchrun.__version__``: one source.
    assert importlib.metadata.version("batchrun") == __version__
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="batchrun")
    assert script.value == "batchrun.__main__:main"


class _Exited(Exception):
    """``os._exit`` was called with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_exit(status: int) -> NoReturn:
        raise _Exited(status)

    monkeypatch.setattr(entry.os, "_exit", fake_exit)


@pytest.mark.parametrize(
    ("argv", "status", "stream", "says"),
    [
        (["run", "--no-such-flag"], 2, "err", "No such option"),
        (["--help"], 0, "out", "Usage"),
    ],
)
def test_the_command_leaves_at_once_with_its_exit_code(
    exits: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
    stream: str,
    says: str,
) -> None:
    monkeypatch.setattr(sys, "argv", ["batchrun", *argv])
    with pytest.raises(_Exited) as done:
        entry.main()
    assert done.value.status == status
    assert says in getattr(capsys.readouterr(), stream)


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (5, 5), ("no such job", 1)])
def test_leaving_at_once_keeps_what_system_exit_means(
    exits: None, capsys: pytest.CaptureFixture[str], code: object, status: int
) -> None:
    with pytest.raises(_Exited) as done:
        entry.exit_now(code)
    assert done.value.status == status
    assert capsys.readouterr().err == ("no such job\n" if isinstance(code, str) else "")


def test_a_bug_exits_70_with_its_traceback_never_1(
    exits: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import batchrun.cli

    def broken() -> None:
        raise KeyError("messages")

    monkeypatch.setattr(batchrun.cli, "main", broken)
    monkeypatch.setattr(sys, "argv", ["batchrun", "run", "in.jsonl", "--out", "out.jsonl"])
    with pytest.raises(_Exited) as done:
        entry.main()
    assert done.value.status == 70  # exit 1 says "finished, some rows failed"
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "KeyError: 'messages'" in err
    assert err.rstrip().splitlines()[-1].startswith("batchrun: internal error (a bug in batchrun")
