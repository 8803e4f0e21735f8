"""``batchrun status``'s text report."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import pytest

from batchrun.config import WHOLE
from batchrun.mock.server import MockServer
from batchrun.state import StateDir
from batchrun.status import _input_rows, describe, render
from tests.conftest import chat, make_config


def _report(**extra: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "output": "out.jsonl",
        "state": "unfinished",
        "input": "in.jsonl",
        "rows": 10,
        "done": 4,
        "ok": 4,
        "failed_by_code": {},
        "in_doubt": 2,
        "remaining": 6,
        "running": False,
        "holder": None,
    }
    report.update(extra)
    return report


def test_rows_without_an_answer_are_in_doubt_once_no_run_is_alive() -> None:
    text = render(_report())
    assert "  in doubt   2 (sent, answer not recorded: resent on resume)" in text.splitlines()
    assert "  running    no" in text.splitlines()


def test_rows_resent_after_earlier_stops_are_shown_finished_or_not() -> None:
    finished = render(_report(state="finished", in_doubt=0, resent_after_crashes=3))
    line = "  resent     3 (in doubt at an earlier stop, sent again: may be billed twice)"
    assert line in finished.splitlines()
    assert "  resent  " not in render(_report(resent_after_crashes=0))


def test_while_the_run_is_alive_they_are_in_flight() -> None:
    live = _report(running=True, holder="pid 7", in_doubt=0, in_flight=2)
    text = render(live)
    assert "  in flight  2 (sent, no answer yet)" in text.splitlines()
    assert "in doubt" not in text


def test_an_input_now_shorter_than_the_rows_done_is_said_to_have_changed() -> None:
    text = render(_report(rows=3, done=5, remaining=None, input_changed=True))
    assert "  input      in.jsonl (changed since the run: 3 rows now)" in text.splitlines()
    assert "  remaining  ?" in text.splitlines()


def test_a_missing_or_damaged_input_leaves_the_row_count_unknown(tmp_path: Path) -> None:
    damaged = tmp_path / "in.jsonl.gz"
    damaged.write_bytes(gzip.compress(b'{"messages": []}\n' * 1_000)[:60])  # cut short
    meta = {"input": str(damaged)}

    rows, problem = _input_rows(meta, WHOLE)
    assert rows is None
    assert problem is not None
    assert problem.startswith("unreadable: Compressed file ended before")
    assert _input_rows({"input": str(tmp_path / "gone.jsonl")}, WHOLE) == (None, "missing")
    text = render(_report(rows=None, input_problem="missing"))
    assert "  input      in.jsonl (missing)" in text.splitlines()
    text = render(_report(rows=None, input_problem=problem))
    assert f"  input      in.jsonl ({problem})" in text.splitlines()


@pytest.mark.asyncio
async def test_the_holder_is_named_only_while_a_run_holds_the_lock(
    tmp_path: Path, server: MockServer
) -> None:
    config = make_config(tmp_path, [chat("a")], server)
    state = StateDir(config.out)
    state.root.mkdir()
    state.write_meta({"input": str(config.input)})
    state.lock()
    try:
        held = describe(config.out)
    finally:
        state.unlock()
    after = describe(config.out)  # the lock file and its text stay behind

    assert held["running"]
    assert held["holder"].startswith(f"pid {os.getpid()} on ")
    assert (after["running"], after["holder"]) == (False, None)


@pytest.mark.asyncio
async def test_rows_sent_unanswered_are_in_flight_while_locked_and_in_doubt_after(
    tmp_path: Path, server: MockServer
) -> None:
    # A script reading --json must not take a live run's requests for doubtful ones.
    config = make_config(tmp_path, [chat("a"), chat("b")], server)
    state = StateDir(config.out)
    state.root.mkdir()
    state.write_meta({"input": str(config.input)})
    state.journal_path.write_bytes(b'{"b":1}\n{"b":2}\n')
    state.lock()
    try:
        live = describe(config.out)
    finally:
        state.unlock()
    stopped = describe(config.out)

    assert (live["in_flight"], live["in_doubt"]) == (2, 0)
    assert (stopped["in_flight"], stopped["in_doubt"]) == (0, 2)


@pytest.mark.asyncio
async def test_a_retry_pass_tells_how_many_of_its_remaining_rows_it_sends_again(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrun.runner import run_async

    # An answer whose text names the marker is kept, not counted (it is escaped there).
    rows = [chat("a"), chat("b mock:fail=503"), chat('"retryable":true'), chat("d mock:fail=503")]
    rows += [chat("e")]
    first = make_config(tmp_path, rows, server, provider="openai", max_attempts=1)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert (await run_async(first)).exit_code == 1
    # The pass stops at its first resent row (a refused key is fatal): row a is written.
    monkeypatch.setenv("OPENAI_API_KEY", "bad-key")
    again = make_config(tmp_path, rows, server, provider="openai", retry_failed=True)
    assert (await run_async(again)).exit_code == 3

    report = describe(again.out)

    assert (report["state"], report["done"], report["remaining"]) == ("unfinished", 1, 4)
    assert report["to_resend"] == 2
    line = "  remaining  4 (2 to send again, the others kept from the finished output)"
    assert line in render(report).splitlines()
    assert describe(first.out)["to_resend"] == 2
    assert "to send again" not in render(_report())
