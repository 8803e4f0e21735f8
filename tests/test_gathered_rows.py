"""Rows a batch answered are written in gathered runs (``rowsource._Gathered``,
``OrderedWriter.write_run``): the output, the counts and every checkpoint
(with the journal it compacts) must be those of writing them one by one."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun import ordered, rowsource
from batchrun.config import WHOLE, RunConfig, Shard
from batchrun.jobfile import build_config
from batchrun.journal import JournalContents
from batchrun.ordered import OrderedWriter
from batchrun.progress import ProgressReporter
from batchrun.providers import get_provider
from batchrun.records import Outcome, output_line
from batchrun.resume import ResumePoint, recover
from batchrun.reuse import open_answers
from batchrun.rowsource import Finished, RowSource, Work, answered_row
from batchrun.state import StateDir
from batchrun.stats import RunStats, Tally

# What each input row is: a line a batch answered (counted from its results
# file's head, or from its record), one journaled by an earlier run, one to
# send, or a bad line.
KINDS = ("batch", "batch", "batch", "batch", "batch_record", "journaled", "send", "bad")


@dataclasses.dataclass
class _Known:
    data: bytes
    tally: Tally | None


class _Lookup:
    """Batch answers by line, asked in increasing order (as ``KnownResults``)."""

    def __init__(self, answers: dict[int, _Known]) -> None:
        self._answers = answers
        self.found = 0
        self.spent = 0.0

    def get(self, line: int) -> _Known | None:
        found = self._answers.get(line)
        if found is not None:
            self.found += 1
        return found


def _record(line: int, tokens: int, cost: float, *, error: bool = False) -> bytes:
    body = {"usage": {"prompt_tokens": tokens, "completion_tokens": tokens + 1}}
    record: dict[str, Any] = {
        "id": f"batch_req_{line}",
        "custom_id": f"r{line}",
        "line": line,
        "response": None if error else {"status_code": 200, "request_id": None, "body": body},
        "error": {"code": "batch_failed", "message": "x", "retryable": False} if error else None,
        "cost": cost,
    }
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


@dataclasses.dataclass
class _Case:
    kinds: list[str]
    costs: list[float]
    delays: list[int]  # a row sent is answered once this many later ones were sent
    shard: str | None
    every: int  # CHECKPOINT_EVERY
    every_bytes: int  # CHECKPOINT_BYTES
    retry_failed: bool = False  # a --retry-failed pass over an output of every row


def _inputs(case: _Case, root: Path) -> tuple[Path, dict[int, _Known], dict[int, bytes]]:
    """The input file, the batch answers and the journaled results of ``case``."""
    lines, known, journaled = [], {}, {}
    for row, kind in enumerate(case.kinds):
        line, cost = row + 1, case.costs[row % len(case.costs)]
        request = {"custom_id": f"r{line}", "messages": [{"role": "user", "content": str(row)}]}
        lines.append(b"{not json" if kind == "bad" else orjson.dumps(request))
        if kind == "batch":
            tally = Tally(True, None, False, row % 3, row % 3 + 1, cost)
            known[line] = _Known(_record(line, row % 3, cost), tally)
        elif kind == "batch_record":
            known[line] = _Known(_record(line, 2, cost, error=row % 2 == 0), None)
        elif kind == "journaled":
            journaled[line] = _record(line, 1, cost)
    path = root / "in.jsonl"
    path.write_bytes(b"".join(raw + b"\n" for raw in lines))
    return path, known, journaled


def _finished(out: Path, rows: int, shard: Shard | None) -> None:
    """A finished output of every row ``shard`` owns: every third failed,
    retryably (resent), the others kept."""
    owned = [row for row in range(rows) if shard is None or shard.owns(row)]
    records = []
    for row in owned:
        record = orjson.loads(_record(row + 1, 4, 0.5, error=row % 3 == 0))
        if record["error"] is not None:
            record["error"]["retryable"] = True
        records.append(orjson.dumps(record) + b"\n")
    out.write_bytes(b"".join(records))


def _config(case: _Case, root: Path) -> tuple[RunConfig, dict[int, _Known], dict[int, bytes]]:
    """The run of ``case`` in ``root``, its batch answers and journaled results."""
    path, known, journaled = _inputs(case, root)
    settings_: dict[str, Any] = {"input": path, "out": root / "out.jsonl", "provider": "mock"}
    settings_.update(base_url="http://127.0.0.1:9", progress=False)
    if case.shard is not None:
        settings_["shard"] = case.shard
    if case.retry_failed:
        settings_["retry_failed"] = True
    config = build_config(settings_)
    if case.retry_failed:
        _finished(config.out, len(case.kinds), config.shard)
    StateDir(config.out).root.mkdir(parents=True)
    return config, known, journaled


class _Killed(Exception):
    """A kill right after a checkpoint."""


def _run(
    case: _Case, root: Path, monkeypatch: pytest.MonkeyPatch, kill_after: int | None = None
) -> dict[str, Any]:
    """Run ``case`` through a row source and an ordered writer, sending rows
    as workers would (answers late by ``delays``); what it leaves behind.
    With ``kill_after``, the run is killed after that many checkpoints and
    resumed from its state."""
    config, known, journaled = _config(case, root)
    start = ResumePoint(journal=JournalContents(results=dict(journaled)))
    try:
        return _pass(case, config, start, _Lookup(known), monkeypatch, kill_after)
    except _Killed:
        provider = get_provider(config.provider)
        kept = config.out if config.retry_failed else None
        resumed = recover(StateDir(config.out), provider.usage, config.shard or WHOLE, kept=kept)
        return _pass(case, config, resumed, _Lookup(known), monkeypatch)


def _pass(
    case: _Case,
    config: RunConfig,
    start: ResumePoint,
    lookup: _Lookup,
    monkeypatch: pytest.MonkeyPatch,
    kill_after: int | None = None,
) -> dict[str, Any]:
    provider, state = get_provider(config.provider), StateDir(config.out)
    answers = open_answers(state.root, None, resend_retryable=False)
    reporter = ProgressReporter(
        RunStats.resumed(start.checkpoint.rows, start.checkpoint.counts), mode="off"
    )
    writer = OrderedWriter(
        config, state=state, start=start, provider=provider, answers=answers, reporter=reporter
    )
    source = RowSource(
        config,
        start=start,
        provider=provider,
        answers=answers,
        journaled=writer.journaled,
        known=lookup,
        now=writer,
    )
    checkpoints: list[tuple[bytes, bytes]] = []
    _note_checkpoints(monkeypatch, writer, state, checkpoints, kill_after)
    try:
        writer.open()
        anyio.run(_work, source, writer, case.delays)
        writer.close(complete=False)  # its checkpoint first: a kill may come after it too
    except _Killed:
        writer.close(complete=True)  # no checkpoint: the state as the kill leaves it
        raise
    finally:
        answers.local.close()
    return {
        "output": state.partial_path.read_bytes(),
        "checkpoints": checkpoints,
        "stats": _figures(reporter.stats),
        "rows_read": source.rows_read,
        "eof": source.eof,
        "found": lookup.found,
    }


def _figures(stats: RunStats) -> dict[str, Any]:
    figures = dataclasses.asdict(stats)
    latency = figures.pop("latency")
    figures["latency"] = [latency.count, *(latency.percentile(q) for q in (0, 50, 100))]
    return figures


def _note_checkpoints(
    monkeypatch: pytest.MonkeyPatch,
    writer: OrderedWriter,
    state: StateDir,
    checkpoints: list[tuple[bytes, bytes]],
    kill_after: int | None = None,
) -> None:
    """Keep each checkpoint the writer writes, with the journal it leaves;
    after ``kill_after`` of them, the run is killed."""
    checkpoint: Callable[[], None] = writer.checkpoint

    def noted() -> None:
        checkpoint()
        checkpoints.append((state.checkpoint_path.read_bytes(), state.journal_path.read_bytes()))
        if len(checkpoints) == kill_after:
            raise _Killed

    monkeypatch.setattr(writer, "checkpoint", noted)


async def _work(source: RowSource, writer: OrderedWriter, delays: list[int]) -> None:
    """Take the rows as a worker does (a window slot first); a row to send is
    answered once ``delays`` more rows were sent after it (or at the end)."""
    waiting: list[tuple[int, Work]] = []  # (rows sent when it is answered, the row)
    sent = 0
    rows = source.rows()
    while True:
        await writer.window.acquire()
        item = next(rows, None)
        if item is None:
            writer.window.release()
            break
        if isinstance(item, Finished):
            writer.deliver(item)
            continue
        waiting.append((sent + delays[sent % len(delays)], item))
        sent += 1
        for due in [entry for entry in waiting if entry[0] <= sent]:
            waiting.remove(due)
            _answer(writer, due[1])
    for _, work in waiting:
        _answer(writer, work)


def _answer(writer: OrderedWriter, work: Work) -> None:
    request = work.request
    outcome = Outcome(
        line=request.line,
        custom_id=request.custom_id,
        error_code="server_error",
        error_message="e",
        attempts=1,
        latency_s=0.01 * work.row,
        # No tokens: a record without a response carries none, so a resumed
        # run counting it from the journal would count what this one did not.
        cost=0.1,
    )
    data = output_line(outcome)
    journal_at = writer.record(request.line, data, work.key)
    writer.deliver(answered_row(work.row, work.input_end, data, outcome, journal_at))


def _both(case: _Case, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    """``case`` run with rows gathered, then written one by one."""
    monkeypatch.setattr(ordered, "CHECKPOINT_EVERY", case.every)
    monkeypatch.setattr(ordered, "CHECKPOINT_BYTES", case.every_bytes)
    results = []
    for gathered in (rowsource.GATHERED_RUN, 0):
        with monkeypatch.context() as patch, tempfile.TemporaryDirectory() as root:
            patch.setattr(rowsource, "GATHERED_RUN", gathered)
            results.append(_run(case, Path(root), patch))
    return results[0], results[1]


_cases = st.builds(
    _Case,
    kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=300),
    costs=st.lists(st.sampled_from([0.0, 0.1, 0.2, 1e-7, 3.3]), min_size=1, max_size=5),
    delays=st.lists(st.integers(0, 4), min_size=1, max_size=6),
    shard=st.sampled_from([None, None, "0/2", "1/3"]),
    every=st.integers(1, 120),
    every_bytes=st.integers(150, 20_000),
    retry_failed=st.booleans(),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=_cases)
def test_gathered_rows_write_as_one_by_one(case: _Case, monkeypatch: pytest.MonkeyPatch) -> None:
    gathered, one_by_one = _both(case, monkeypatch)
    assert gathered == one_by_one


def test_a_long_batch_answered_input_is_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows a batch answered, in turn, go in runs (checkpoints cut them), and
    still write what one by one does."""
    runs: list[int] = []
    write_run = OrderedWriter.write_run

    def noted(self: OrderedWriter, records: list[bytes], *args: Any) -> None:
        runs.append(len(records))
        write_run(self, records, *args)

    monkeypatch.setattr(OrderedWriter, "write_run", noted)
    case = _Case(["batch"] * 1000, [0.1, 0.2], [0], None, every=150, every_bytes=1 << 30)
    gathered, one_by_one = _both(case, monkeypatch)
    assert gathered == one_by_one
    assert len(gathered["checkpoints"]) == 1000 // 150 + 2  # and those of open and close
    assert sum(runs) > 900  # one row in GATHERED_RUN + 1 goes on to a worker
    assert max(runs) == rowsource.GATHERED_RUN


@given(
    st.lists(
        st.builds(
            Tally,
            st.booleans(),
            st.sampled_from([None, "batch_failed", "server_error"]),
            st.booleans(),
            st.integers(0, 10**6),
            st.integers(0, 10**6),
            st.floats(0, 10, allow_nan=False),
        ),
        max_size=50,
    )
)
def test_a_run_counts_as_its_rows_one_by_one(verdicts: list[Tally]) -> None:
    one_by_one, run = RunStats(), RunStats()
    for verdict in verdicts:
        one_by_one.record_batched(verdict)
    run.record_batched_run(verdicts)
    assert _figures(run) == _figures(one_by_one)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=_cases, kill_after=st.integers(1, 12))
def test_a_gathered_run_killed_after_a_checkpoint_resumes_to_the_same_output(
    case: _Case, kill_after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint claims no row a run has not written: killed right after
    one and resumed, the run ends with the output and counts of one that
    wrote its rows one by one, uninterrupted."""
    monkeypatch.setattr(ordered, "CHECKPOINT_EVERY", case.every)
    monkeypatch.setattr(ordered, "CHECKPOINT_BYTES", case.every_bytes)
    with tempfile.TemporaryDirectory() as root:
        killed = _run(case, Path(root), monkeypatch, kill_after)
    with monkeypatch.context() as patch, tempfile.TemporaryDirectory() as root:
        patch.setattr(rowsource, "GATHERED_RUN", 0)
        whole = _run(case, Path(root), patch)
    assert killed["output"] == whole["output"]
    assert killed["checkpoints"][-1][0] == whole["checkpoints"][-1][0]  # rows, offsets, counts
