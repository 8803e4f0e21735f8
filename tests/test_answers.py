"""Answers that must not be taken for results, and requests that must reach
the right place: real runs against the mock provider on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrun.answers import usage_tokens
from batchrun.config import RetryPolicy
from batchrun.errors import RowError, TransientError
from batchrun.jobfile import build_config
from batchrun.mock.server import GATEWAY_PREFIX, MockServer
from batchrun.retry import budget_note
from batchrun.runner import Clock, run_async
from batchrun.state import StateDir
from batchrun.store import STORE_FILE, open_store
from batchrun.validate import validate
from tests.conftest import chat, make_config, read_jsonl, write_jsonl

BOM = b"\xef\xbb\xbf"


@pytest.mark.asyncio
async def test_a_base_url_not_ending_in_v1_gets_bare_lines_at_base_chat_completions(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    gateway = f"http://{server.host}:{server.port}{GATEWAY_PREFIX}"
    rows = [chat("a"), {"prompt": "b"}, {"input": "c"}]
    config = make_config(tmp_path, rows, server, base_url=gateway)

    summary = await run_async(config, clock=fake_clock)

    assert summary.exit_code == 0
    assert [r["response"]["status_code"] for r in read_jsonl(config.out)] == [200, 200, 200]
    assert server.stats.requests == 3


@pytest.mark.asyncio
async def test_a_200_whose_body_is_not_an_object_is_retried_as_a_bad_body(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    # Attempts 1-3 get null, [] and a string; the fourth a real answer.
    rows = [chat("odd mock:oddbody=3"), chat("always odd mock:oddbody=99"), chat("fine")]
    config = make_config(tmp_path, rows, server, max_attempts=4)

    summary = await run_async(config, clock=fake_clock)

    odd, always, fine = read_jsonl(config.out)
    assert (odd["error"], odd["attempts"]) == (None, 4)
    assert odd["response"]["body"]["choices"][0]["message"]["content"].startswith("echo: odd")
    assert always["error"]["code"] == "invalid_body"
    assert always["error"]["retryable"] is True
    assert always["error"]["message"] == "HTTP 200 with a JSON null body, not an object"
    assert always["attempts"] == 4
    assert fine["error"] is None
    assert summary.failed_by_code == {"invalid_body": 1}


@pytest.mark.asyncio
async def test_a_200_carrying_an_error_is_retried_and_never_kept_as_an_answer(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    # Some gateways pass an upstream failure on as 200 {"error": ...}: taken
    # for an answer, it was written as a success and stored for reuse.
    rows = [chat("gw mock:errbody=1"), chat("always mock:errbody=99")]
    config = make_config(tmp_path, rows, server, max_attempts=3)

    summary = await run_async(config, clock=fake_clock)

    passed_on, always = read_jsonl(config.out)
    assert (passed_on["error"], passed_on["attempts"]) == (None, 2)
    assert always["error"]["code"] == "overloaded"
    assert always["error"]["retryable"] is True
    assert "model overloaded" in always["error"]["message"]
    assert always["attempts"] == 3
    assert summary.failed_by_code == {"overloaded": 1}
    store = open_store(StateDir(config.out).root / STORE_FILE)
    stored = store.stats()
    store.close()
    assert stored.ok == 1  # the real answer only
    assert stored.errors == stored.retryable  # a later run sends the other again


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_not_followed_for_a_post_and_says_so(
    status: int, tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    config = make_config(tmp_path, [chat(f"moved mock:redirect={status}"), chat("ok")], server)

    summary = await run_async(config, clock=fake_clock)

    moved, ok = read_jsonl(config.out)
    assert moved["error"]["code"] == "redirect"
    assert moved["error"]["retryable"] is False
    assert moved["error"]["message"].startswith(
        f"HTTP {status} redirect to /moved/v1/chat/completions: batchrun does not follow"
    )
    assert moved["response"]["status_code"] == status
    assert ok["error"] is None
    assert server.stats.requests == 2  # one POST each: nothing followed, nothing resent
    assert summary.exit_code == 1


@pytest.mark.asyncio
async def test_a_bom_at_the_start_of_the_file_is_not_part_of_line_1(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("first"), chat("second")])
    source.write_bytes(BOM + source.read_bytes())
    config = make_config(tmp_path, [], server, input=source)

    summary = await run_async(config, clock=fake_clock)
    report = validate(build_config({"input": source, "out": "-"}))

    assert summary.exit_code == 0
    assert [r["error"] for r in read_jsonl(config.out)] == [None, None]
    assert (report.rows, report.malformed) == (2, 0)


def test_a_bom_elsewhere_is_still_a_bad_line(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt": "a"}\n' + BOM + b'{"prompt": "b"}\n')

    report = validate(build_config({"input": source, "out": "-"}))

    assert report.malformed == 1


@pytest.mark.asyncio
async def test_a_retry_after_beyond_the_budget_says_what_was_asked_and_allowed(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    config = make_config(
        tmp_path, [chat("busy mock:fail=429 mock:retry_after=1200")], server, retry_budget=900
    )

    await run_async(config, clock=fake_clock)

    (row,) = read_jsonl(config.out)
    assert row["attempts"] == 1
    assert row["error"]["code"] == "rate_limit_exceeded"
    assert row["error"]["message"] == (
        "mock fault: HTTP 429; the provider asked to wait 1,200 s (Retry-After) and"
        " --retry-budget allows 900 s per row (900 s left)"
    )


def test_budget_note_only_when_the_pause_did_not_fit() -> None:
    policy = RetryPolicy(max_attempts=3, budget=60)
    asked = TransientError("rate_limited", "slow", retry_after=90)

    assert budget_note(asked, policy, attempts=1, elapsed=0) is not None
    assert budget_note(asked, policy, attempts=3, elapsed=0) is None  # attempts ran out
    assert budget_note(TransientError("x", "y", retry_after=5), policy, 1, 0) is None
    assert budget_note(TransientError("x", "y"), policy, 1, 0) is None
    assert budget_note(RowError("x", "y", retry_after=90), policy, 1, 0) is None
    assert budget_note(TransientError("x", "y", retry_after=20), policy, 1, elapsed=50) == (
        "the provider asked to wait 20 s (Retry-After) and --retry-budget allows 60 s per row"
        " (10 s left)"
    )


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}, (4, 2)),
        ({"input_tokens": 5, "output_tokens": 1}, (5, 1)),
        ({"total_tokens": 7}, (7, 0)),  # a DashScope native embedding: all of it input
        ({"output_tokens": 3, "total_tokens": 9}, (0, 3)),  # the input count is missing
        ({}, (0, 0)),
    ],
)
def test_usage_tokens_in_either_dialect(usage: dict[str, int], expected: tuple[int, int]) -> None:
    assert usage_tokens({"usage": usage}) == expected
