"""--max-response-bytes against a real server sending huge bodies, with and
without a Content-Length."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from batchrun.config import DEFAULT_MAX_RESPONSE_BYTES
from batchrun.errors import UsageError
from batchrun.jobfile import build_config, load_job_file
from batchrun.mock.server import MockServer
from batchrun.runner import Clock, run_async
from tests.conftest import chat, make_config, read_jsonl

LIMIT = 100_000


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", ["", "mock:chunked"])
async def test_a_body_past_the_limit_fails_its_row_once(
    tmp_path: Path, server: MockServer, framing: str
) -> None:
    rows = [chat(f"big mock:huge=5000000 {framing}"), chat(f"fits mock:huge=90000 {framing}")]
    config = make_config(tmp_path, rows, server, max_response_bytes=LIMIT)

    with anyio.fail_after(20):
        summary = await run_async(config, clock=Clock())

    big, fits = read_jsonl(config.out)
    assert big["error"]["code"] == "response_too_large"
    assert big["error"]["retryable"] is False
    assert "--max-response-bytes (100,000 bytes)" in big["error"]["message"]
    assert big["attempts"] == 1
    assert big["response"]["status_code"] == 200
    assert big["response"]["body"] is None
    assert fits["error"] is None
    assert len(fits["response"]["body"]["padding"]) > 80_000
    assert summary.exit_code == 1
    assert server.stats.requests == 2  # not retried


def test_max_response_bytes_setting(tmp_path: Path) -> None:
    assert build_config({"input": "i", "out": "o"}).max_response_bytes == 64 << 20
    assert DEFAULT_MAX_RESPONSE_BYTES == 64 * 1024 * 1024
    job = tmp_path / "job.toml"
    job.write_text('ca_bundle = "ca.pem"\n[limits]\nmax_response_bytes = 1000\n')
    config = build_config({**load_job_file(job), "input": "i", "out": "o"})
    assert config.max_response_bytes == 1000
    assert config.ca_bundle == Path("ca.pem")
    with pytest.raises(UsageError, match="--max-response-bytes must be a whole number >= 1"):
        build_config({"input": "i", "out": "o", "max_response_bytes": 0})
    with pytest.raises(UsageError, match="ca_bundle must be non-empty text, got 3"):
        build_config({"input": "i", "out": "o", "ca_bundle": 3})
