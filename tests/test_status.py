"""``batchrun status``'s text report."""

from __future__ import annotations

from typing import Any

from batchrun.status import render


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


def test_while_the_run_is_alive_they_are_in_flight() -> None:
    text = render(_report(running=True, holder="pid 7 on host since 2026-11-26T10:00:00+0000"))
    assert "  in flight  2 (sent, no answer yet)" in text.splitlines()
    assert "in doubt" not in text
