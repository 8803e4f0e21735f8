"""``--loop auto|asyncio|uvloop`` and the test suite's own loop (``--loop``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import orjson
import pytest

from batchrun import eventloop
from batchrun.errors import UsageError
from tests.test_cli import batchrun


@pytest.mark.asyncio
async def test_the_async_tests_run_on_the_loop_the_suite_was_asked_for(
    request: pytest.FixtureRequest,
) -> None:
    assert eventloop.running() == request.config.getoption("--loop")


def test_auto_takes_uvloop_when_it_is_installed() -> None:
    installed = importlib.util.find_spec("uvloop") is not None
    assert eventloop.resolve("auto") == ("uvloop" if installed else "asyncio")
    assert eventloop.resolve("asyncio") == "asyncio"


def test_uvloop_asked_for_but_missing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="--loop asyncio"):
        eventloop.resolve("uvloop")
    assert eventloop.resolve("auto") == "asyncio"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_run_on_each_loop(tmp_path: Path, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    job = tmp_path / "job.toml"
    job.write_text(f'loop = "{loop}"\n')
    done = batchrun(
        "run", "sample_inputs/prompts.jsonl", "--out", out, "--provider", "mock",
        "--no-progress", "--summary", summary, "--job", job,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert orjson.loads(summary.read_bytes())["extra"]["event loop"] == loop


def test_an_unknown_loop_exits_2_in_one_line(tmp_path: Path) -> None:
    done = batchrun(
        "run", "sample_inputs/prompts.jsonl", "--out", tmp_path / "o.jsonl",
        "--provider", "mock", "--loop", "trio",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--loop must be one of auto, asyncio, uvloop" in done.stderr
    assert "Traceback" not in done.stderr
