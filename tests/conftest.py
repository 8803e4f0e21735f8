"""Shared fixtures: a real mock provider on loopback, input files, fake time."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from batchrun.config import RunConfig
from batchrun.jobfile import build_config
from batchrun.mock.server import MockServer
from batchrun.timing import Clock
from tests.fakes import FakeClock


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=os.environ.get("BATCHRUN_TEST_LOOP", "asyncio"),
        help="Event loop for the async tests (env BATCHRUN_TEST_LOOP; default asyncio).",
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the loop ``--loop`` names."""
    if config.getoption("--loop") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest_asyncio.fixture
async def server() -> AsyncIterator[MockServer]:
    async with MockServer() as mock:
        yield mock


@pytest.fixture
def fake_time() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_clock(fake_time: FakeClock) -> Clock:
    return fake_time.as_clock()


def chat(text: str, **extra: Any) -> dict[str, Any]:
    """A bare chat row whose prompt is ``text`` (mock directives go in it)."""
    return {"messages": [{"role": "user", "content": text}], **extra}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | bytes]) -> Path:
    with path.open("wb") as handle:
        for row in rows:
            handle.write(row if isinstance(row, bytes) else orjson.dumps(row))
            handle.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def make_config(
    tmp_path: Path, rows: Iterable[dict[str, Any] | bytes], server: MockServer, **settings: Any
) -> RunConfig:
    """A run of ``rows`` against ``server`` (OpenAI dialect), progress off.

    ``rows`` is written to ``in.jsonl`` unless ``settings`` names an input.
    """
    base: dict[str, Any] = {
        "input": settings.get("input") or write_jsonl(tmp_path / "in.jsonl", rows),
        "out": tmp_path / "out.jsonl",
        "provider": "mock",
        "base_url": server.base_url,
        "progress": False,
    }
    base.update(settings)
    return build_config(base)


async def run_shards(tmp_path: Path, server: MockServer, source: Path, count: int) -> list[Path]:
    """Finished outputs ``p0.jsonl`` ... of ``source``'s ``count`` shards, in shard order."""
    from batchrun.runner import run_async

    outputs = []
    for index in range(count):
        config = make_config(
            tmp_path,
            [],
            server,
            input=source,
            out=tmp_path / f"p{index}.jsonl",
            shard=f"{index}/{count}",
        )
        await run_async(config, clock=FakeClock().as_clock())
        outputs.append(config.out)
    return outputs
