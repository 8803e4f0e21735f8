"""``batchrun status OUT``: how far a run on OUT has come. Reads, never writes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from batchrun.batchmode.standing import describe as describe_batches
from batchrun.config import WHOLE, Shard
from batchrun.errors import UsageError
from batchrun.inputs import READ_ERRORS, count_lines
from batchrun.providers import get_provider
from batchrun.resume import finished_lines, recover, tally
from batchrun.state import FinishedRun, StateDir


def describe(out: Path) -> dict[str, Any]:
    """The state of the run on ``out``, JSON-ready.

    Keys: ``output``, ``state`` (finished, unfinished), ``running`` (a live
    process holds the lock), ``holder``, ``input``, ``rows``, ``done``,
    ``ok``, ``failed_by_code``, ``in_flight`` (rows sent with no answer yet,
    while a run is alive), ``in_doubt`` (the same rows once no run is: the
    provider may have billed them), ``remaining`` (None when the input
    is gone; ``input_problem`` says why), ``to_resend`` (a ``--retry-failed``
    pass: the remaining rows it sends again, the rest being kept from the
    finished output), ``exit_code`` (finished runs), ``batches``
    (``--mode batch``: each part's batch id and status).
    """
    state = StateDir(out)
    meta = state.read_meta()
    if meta is None:
        raise UsageError(f"no batchrun state for {out} (looked in {state.root})")
    running = state.is_locked()
    report: dict[str, Any] = {
        "output": str(out),
        "input": meta.get("input"),
        "running": running,
        "holder": state.holder() if running else None,  # the lock file outlives its holder
    }
    finished = state.read_finished()
    if finished is not None:
        report.update(_finished(finished))
    else:
        report.update(_unfinished(state, meta))
    # Rows sent with no answer recorded are in flight while their run is alive.
    report["in_flight"] = report["in_doubt"] if running else 0
    if running:
        report["in_doubt"] = 0
    batches = describe_batches(state.root)
    if batches is not None:
        report["batches"] = batches
    return report


def _finished(finished: FinishedRun) -> dict[str, Any]:
    summary = finished.summary
    return {
        "state": "finished",
        "finished_at": finished.at,
        "rows": summary.rows,
        "done": summary.rows,
        "ok": summary.ok,
        "failed_by_code": summary.failed_by_code,
        "in_doubt": 0,
        # The rows resent after stops over all its runs (each may be billed twice).
        "resent_after_crashes": summary.extra.get("in doubt (all runs)", 0),
        "remaining": 0,
        "exit_code": summary.exit_code,
    }


def _unfinished(state: StateDir, meta: dict[str, Any]) -> dict[str, Any]:
    usage = get_provider(str(meta.get("provider", "openai"))).usage
    shard = Shard.parse(meta["shard"]) if meta.get("shard") else WHOLE
    point = recover(state, usage, shard)
    checkpoint = point.checkpoint
    counts = checkpoint.counts  # the resume point's own: counting on changes nothing on disk
    for record in point.journal.results.values():
        counts.count_record(tally(orjson.loads(record), usage))
    done = checkpoint.rows + len(point.journal.results)
    rows, problem = _input_rows(meta, shard)
    changed = rows is not None and rows < done  # edited since: the next run tells how
    resend = None
    if meta.get("pass") == "retry-failed" and not changed:
        resend = _to_resend(state.out, checkpoint.rows, point.journal.results.keys())
    return {
        "state": "unfinished",
        "rows": rows,
        "done": done,
        "in_order": checkpoint.rows,
        "ok": counts.ok,
        "failed_by_code": dict(counts.failed_by_code),
        "in_doubt": len(point.journal.in_doubt),
        "resent_after_crashes": checkpoint.in_doubt,
        "remaining": None if rows is None or changed else rows - done,
        "input_changed": changed,
        "input_problem": problem,
        "to_resend": resend,
    }


# Every record the pass resends has this in its error: a line without it is
# kept, unparsed. A line with it is parsed, since an answer's body may hold
# the same pair.
_RETRYABLE = b'"retryable":true'


def _to_resend(out: Path, written: int, done: Iterable[int]) -> int | None:
    """How many records of the finished output ``out`` (the one a
    ``--retry-failed`` pass replaces) from place ``written`` on have a
    retryable error, leaving out the input lines in ``done`` (journaled by
    the pass already); None if ``out`` cannot be read."""
    finished, count = set(done), 0
    try:
        with finished_lines(out, written) as lines:
            for raw in lines:
                if _RETRYABLE not in raw:
                    continue
                record = _record(raw)
                error = record.get("error")
                if isinstance(error, dict) and error.get("retryable") is True:
                    count += record.get("line") not in finished
    except OSError:
        return None
    return count


def _record(raw: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _input_rows(meta: dict[str, Any], shard: Shard) -> tuple[int | None, str | None]:
    """The rows of the run's input now, or None and why not (it is gone, or
    cannot be read to its end)."""
    path = Path(str(meta.get("input")))
    if not path.is_file():
        return None, "missing"
    try:
        return shard.rows_before(count_lines(path)), None
    except READ_ERRORS as exc:  # a damaged .gz, say: the report goes on without it
        return None, f"unreadable: {exc}"


def render(report: dict[str, Any]) -> str:
    """The report for a person, a few lines."""
    failed = report["failed_by_code"]
    failed_text = ", ".join(f"{code}: {n:,}" for code, n in failed.items()) or "none"
    running = f"yes ({report['holder']})" if report["running"] else "no"
    rows = report["rows"]
    lines = [
        f"{report['output']}: {report['state']}"
        + (f" at {report['finished_at']}" if report.get("finished_at") else ""),
        f"  input      {report['input']}" + _input_note(report),
        f"  done       {report['done']:,}" + (f" of {rows:,}" if rows is not None else ""),
        f"  ok         {report['ok']:,}",
        f"  failed     {sum(failed.values()):,} ({failed_text})",
        _doubt_line(report),
        *_resent_line(report.get("resent_after_crashes") or 0),
        f"  remaining  {report['remaining'] if report['remaining'] is not None else '?'}"
        + _resend_note(report),
        f"  running    {running}",
    ]
    if report.get("exit_code") is not None:
        lines.append(f"  exit code  {report['exit_code']}")
    lines.extend(_batch_lines(report.get("batches") or []))
    return "\n".join(lines)


def _input_note(report: dict[str, Any]) -> str:
    if report["rows"] is None:
        return f" ({report.get('input_problem') or 'missing or unreadable'})"
    if report.get("input_changed"):
        return f" (changed since the run: {report['rows']:,} rows now)"
    return ""


def _resend_note(report: dict[str, Any]) -> str:
    """A ``--retry-failed`` pass's remaining rows are mostly kept, not sent."""
    resend = report.get("to_resend")
    if resend is None:
        return ""
    return f" ({resend:,} to send again, the others kept from the finished output)"


def _doubt_line(report: dict[str, Any]) -> str:
    """Rows sent with no answer recorded: in flight while the run is alive,
    in doubt (the provider may have billed them) once it is not."""
    if report["running"]:
        return f"  in flight  {report.get('in_flight', 0):,} (sent, no answer yet)"
    return f"  in doubt   {report['in_doubt']:,} (sent, answer not recorded: resent on resume)"


def _resent_line(rows: int) -> list[str]:
    """Rows in doubt at earlier stops and sent again since: each may have been
    billed twice (none: no line)."""
    if not rows:
        return []
    return [f"  resent     {rows:,} (in doubt at an earlier stop, sent again: may be billed twice)"]


def _batch_lines(batches: list[dict[str, Any]]) -> list[str]:
    lines = [f"  batches    {len(batches)}"] if batches else []
    for batch in batches:
        counts = batch["counts"]
        done = counts.get("settled", counts.get("completed", 0) + counts.get("failed", 0))
        lines.append(
            f"    part {batch['part']}: {batch['batch_id'] or '(none recorded)'}"
            f" {batch['status']}, {done:,}/{batch['rows']:,} rows"
        )
    return lines
