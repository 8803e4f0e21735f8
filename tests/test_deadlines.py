"""No row held hostage: --request-timeout and --retry-budget against real
servers that trickle their bodies or answer 102 and go silent."""

from __future__ import annotations

import math
import time
from pathlib import Path

import anyio
import pytest
from tenacity import RetryCallState
from typer.testing import CliRunner

from batchrun.cli import app
from batchrun.config import RetryPolicy
from batchrun.errors import TransientError, UsageError
from batchrun.jobfile import build_config, load_job_file
from batchrun.mock.server import MockServer
from batchrun.retry import retrying, stop_past_budget
from batchrun.runner import Clock, run_async
from batchrun.sender import RowBudget
from tests.conftest import chat, make_config, read_jsonl
from tests.fakes import FakeClock

TRICKLE = "mock:trickle=0.2"  # ~270 body bytes, one each 0.2 s: nearly a minute


async def _timed_run(config: object) -> tuple[list[dict[str, object]], float]:
    started = time.monotonic()
    with anyio.fail_after(30):
        await run_async(config, clock=Clock())  # type: ignore[arg-type]
    return read_jsonl(config.out), time.monotonic() - started  # type: ignore[attr-defined]


# --- the pure pieces ---------------------------------------------------------------


def test_row_budget_starts_at_the_first_attempt() -> None:
    fake = FakeClock(100.0)
    budget = RowBudget(10.0, Clock(monotonic=fake.monotonic, sleep=fake.sleep))
    assert budget.remaining() == math.inf
    fake.now += 50  # waiting in the throttle's queue does not count
    budget.start()
    fake.now += 4
    budget.start()  # a later attempt does not restart it
    assert budget.remaining() == pytest.approx(6.0)
    error = budget.exhausted()
    assert isinstance(error, TransientError)
    assert error.code == "retry_budget_exhausted"


def _state_with_sleep(seconds: float) -> RetryCallState:
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.upcoming_sleep = seconds
    return state


def test_stop_past_budget_refuses_a_wait_that_ends_past_it() -> None:
    left = [5.0]
    stop = stop_past_budget(lambda: left[0])
    assert not stop(_state_with_sleep(4.9))
    assert stop(_state_with_sleep(5.0))
    left[0] = -1.0
    assert stop(_state_with_sleep(0.0))


@pytest.mark.asyncio
async def test_retry_loop_on_fake_time_never_sleeps_past_the_budget() -> None:
    fake = FakeClock(100.0)
    policy = RetryPolicy(max_attempts=100, budget=30.0, backoff_initial=4.0, backoff_max=8.0)
    budget = RowBudget(policy.budget, Clock(monotonic=fake.monotonic, sleep=fake.sleep))
    budget.start()
    calls = 0

    async def always_503() -> None:
        nonlocal calls
        calls += 1
        raise TransientError("server_error", "503", status=503)

    with pytest.raises(TransientError):
        await retrying(policy, sleep=fake.sleep, remaining=budget.remaining)(always_503)
    assert fake.now - 100.0 <= 30.0
    assert calls >= 2


# --- whole runs against real servers ---------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.slow
async def test_trickling_body_is_cut_by_the_request_timeout(
    tmp_path: Path, server: MockServer
) -> None:
    rows = [chat(f"slow {TRICKLE}"), chat("fast"), chat("slow once mock:trickle=0.2x1")]
    config = make_config(
        tmp_path, rows, server, read_timeout=1, request_timeout=1, max_attempts=2,
        backoff_initial=0.01, backoff_max=0.01,
    )  # fmt: skip

    out, elapsed = await _timed_run(config)

    assert out[0]["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert out[0]["error"]["retryable"] is True  # type: ignore[index]
    assert out[0]["attempts"] == 2
    assert out[1]["error"] is None
    assert out[2]["error"] is None
    assert out[2]["attempts"] == 2
    assert elapsed < 6


@pytest.mark.asyncio
@pytest.mark.slow
async def test_102_then_silence_is_cut_by_the_request_timeout(
    tmp_path: Path, server: MockServer
) -> None:
    rows = [chat("hang mock:hang102=9"), chat("once mock:hang102=1")]
    config = make_config(
        tmp_path, rows, server, read_timeout=30, request_timeout=1, max_attempts=2,
        backoff_initial=0.01, backoff_max=0.01,
    )  # fmt: skip

    out, elapsed = await _timed_run(config)

    assert out[0]["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert out[1]["error"] is None
    assert out[1]["attempts"] == 2
    assert elapsed < 5


@pytest.mark.asyncio
@pytest.mark.slow
async def test_102_then_silence_is_cut_by_the_read_timeout_too(
    tmp_path: Path, server: MockServer
) -> None:
    # An interim answer is bytes like any other: silence after it is timed.
    rows = [chat("hang mock:hang102=9")]
    config = make_config(
        tmp_path, rows, server, read_timeout=0.3, request_timeout=600, max_attempts=1
    )

    out, elapsed = await _timed_run(config)

    assert out[0]["error"]["code"] == "read_timeout"  # type: ignore[index]
    assert elapsed < 5


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.parametrize("fault", [TRICKLE, "mock:hang102=9"])
async def test_retry_budget_cancels_the_attempt_in_flight(
    tmp_path: Path, server: MockServer, fault: str
) -> None:
    # No request or read timeout to speak of: the budget alone must end the row.
    rows = [chat(f"stuck {fault}"), chat("fine")]
    config = make_config(
        tmp_path, rows, server, read_timeout=30, request_timeout=600, retry_budget=1.5
    )

    out, elapsed = await _timed_run(config)

    error = out[0]["error"]
    assert error["code"] == "retry_budget_exhausted"  # type: ignore[index]
    assert error["retryable"] is True  # type: ignore[index]
    assert out[0]["attempts"] == 1
    assert out[1]["error"] is None
    assert 1.4 < elapsed < 4
    assert server.stats.in_flight == 0  # the server saw the attempt abandoned


@pytest.mark.asyncio
@pytest.mark.slow
async def test_one_row_in_ten_trickling_does_not_hold_the_run(
    tmp_path: Path, server: MockServer
) -> None:
    # The reported stall, scaled down: 100 rows, 10 % trickling, read timeout
    # never tripped. Every row is written, within the budget of the slow ones.
    rows = [chat(f"row {i} {TRICKLE if i % 10 == 3 else ''}") for i in range(100)]
    config = make_config(
        tmp_path, rows, server, read_timeout=3, retry_budget=2, max_async_requests=8
    )

    out, elapsed = await _timed_run(config)

    assert len(out) == 100
    codes = [row["error"]["code"] if row["error"] else None for row in out]  # type: ignore[index]
    assert codes.count("retry_budget_exhausted") == 10
    assert codes.count(None) == 90
    assert elapsed < 10


@pytest.mark.asyncio
async def test_a_backoff_wait_past_the_budget_keeps_the_last_error(
    tmp_path: Path, server: MockServer
) -> None:
    # Retry-After 30 s against a 1 s budget: no sleep into a cut-off, the 503 stays.
    rows = [chat("busy mock:fail=503 mock:retry_after=30")]
    config = make_config(tmp_path, rows, server, retry_budget=1, backoff_max=0.01)

    with anyio.fail_after(10):
        summary = await run_async(config, clock=Clock())

    out = read_jsonl(config.out)
    assert out[0]["error"]["code"] != "retry_budget_exhausted"
    assert out[0]["response"]["status_code"] == 503
    assert out[0]["attempts"] == 1
    assert summary.duration_s < 1


# --- settings ---------------------------------------------------------------------------


def test_request_timeout_is_a_flag_and_a_timeouts_job_key(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("[timeouts]\nrequest_timeout = 45\n")
    settings = {**load_job_file(job), "input": "in.jsonl", "out": "out.jsonl"}
    assert build_config(settings).timeouts.request == 45
    assert build_config({"input": "i", "out": "o"}).timeouts.request == 600
    with pytest.raises(
        UsageError, match="--request-timeout must be a finite number of seconds > 0"
    ):
        build_config({"input": "i", "out": "o", "request_timeout": 0})


def test_request_timeout_flag_reaches_the_config() -> None:
    result = CliRunner().invoke(app, ["run", "--help"])
    assert "--request-timeout" in result.output
