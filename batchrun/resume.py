"""Where a run stopped, and what it had: the start of every resume.

Reads only bounded data however large the run: the output written since the
last checkpoint, and the compacted journal. The checkpoint says where in the
input to seek, so the finished part of the input is not parsed again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchrun.config import WHOLE, Shard
from batchrun.errors import TornOutputError
from batchrun.journal import JournalContents, read_journal
from batchrun.state import Checkpoint, StateDir
from batchrun.stats import Tally

Usage = Callable[[Any], tuple[int, int]]


def tally(data: dict[str, Any], usage: Usage) -> Tally:
    """An output record's verdict, tokens and cost (``usage`` reads a body)."""
    error = data.get("error")
    response = data.get("response")
    tokens = usage(response.get("body")) if isinstance(response, dict) else (0, 0)
    cost = data.get("cost")
    paid = float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else 0.0
    reused = bool(data.get("reused"))
    if isinstance(error, dict):
        code = str(error.get("code") or "unknown")
        return Tally(False, code, bool(error.get("retryable")), *tokens, paid, reused)
    return Tally(True, None, False, *tokens, paid, reused)


def free_tally(data: dict[str, Any], usage: Usage) -> Tally:
    """``tally`` of a record a --retry-failed pass keeps from the finished
    output: its verdict and tokens, at no cost to the pass (a pass's
    ``--max-cost`` counts its own spend; the pass before paid for the row)."""
    return dataclasses.replace(tally(data, usage), cost=0.0)


@dataclass(slots=True)
class ResumePoint:
    """The state a run starts from.

    ``checkpoint`` describes and counts the whole ordered output as it is on
    disk (its ``rows`` and ``output_bytes``), and where to seek in the input;
    ``journal`` holds the results and in-flight marks of later rows.
    """

    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    journal: JournalContents = field(default_factory=JournalContents)


def recover(
    state: StateDir, usage: Usage, shard: Shard = WHOLE, *, kept: Path | None = None
) -> ResumePoint:
    """The resume point of the unfinished run in ``state`` (of ``shard``'s rows).
    ``kept``: the finished output a --retry-failed pass keeps rows of; a row
    written as it is there counts at no cost (``free_tally``).

    Raises ``TornOutputError`` when ``output.partial`` is missing, shorter
    than its checkpoint says, not cut at a line's end there, or damaged
    after it: resuming would publish joined or missing lines.
    """
    checkpoint = state.read_checkpoint()
    counted = dataclasses.replace(checkpoint, counts=checkpoint.counts.copy())
    rows, output_bytes = checkpoint.rows, checkpoint.output_bytes
    if state.partial_path.exists():
        rows, output_bytes = _scan_output(state, counted, usage, shard, kept)
    elif rows:
        raise TornOutputError(f"{state.partial_path} is missing")
    counted.rows, counted.output_bytes = rows, output_bytes
    journal = read_journal(state.journal_path, after_line=shard.line_of(rows) - 1, with_keys=False)
    return ResumePoint(checkpoint=counted, journal=journal)


def _scan_output(
    state: StateDir, counted: Checkpoint, usage: Usage, shard: Shard, kept: Path | None
) -> tuple[int, int]:
    """Count the complete lines written after the checkpoint into ``counted``."""
    rows, offset = counted.rows, counted.output_bytes
    with state.partial_path.open("rb") as handle, _kept_lines(kept, rows) as previous:
        _check_extent(handle, offset, state)
        handle.seek(offset)
        for raw in handle:
            if not raw.endswith(b"\n"):
                break  # torn by a kill mid-write: cut off when appending resumes
            old = next(previous, b"")
            free = bool(old) and raw in (old, old + b"\n")
            _count(counted, raw, shard.line_of(rows), usage, state, free=free)
            rows += 1
            offset += len(raw)
    return rows, offset


@contextmanager
def _kept_lines(kept: Path | None, skip: int) -> Iterator[Iterator[bytes]]:
    """The lines of the finished output ``kept`` from its row ``skip`` on
    (none without one): a row written as it is there was kept, not paid."""
    if kept is None or not kept.exists():  # gone: ``prepare`` stops the run, by name
        yield iter(())
        return
    with finished_lines(kept, skip) as lines:
        yield lines


@contextmanager
def finished_lines(out: Path, skip: int) -> Iterator[Iterator[bytes]]:
    """The lines of the finished output ``out`` (the one a --retry-failed
    pass replaces) from its row ``skip`` on, read as they are asked for."""
    with out.open("rb") as handle:
        for _ in range(skip):
            handle.readline()
        yield iter(handle)


def _check_extent(handle: BinaryIO, size: int, state: StateDir) -> None:
    """Raise ``TornOutputError`` unless the checkpoint's ``size`` bytes are
    all there and end a line: only then can appending go on after them."""
    actual = handle.seek(0, os.SEEK_END)
    if actual < size:
        raise TornOutputError(
            f"{state.partial_path} is shorter than its checkpoint says"
            f" ({actual:,} of {size:,} bytes)"
        )
    if size:
        handle.seek(size - 1)
        if handle.read(1) != b"\n":
            raise TornOutputError(
                f"{state.partial_path} does not end a line where its checkpoint says"
                f" (at byte {size:,})"
            )


def _count(
    counted: Checkpoint, raw: bytes, line: int, usage: Usage, state: StateDir, *, free: bool
) -> None:
    try:
        data = orjson.loads(raw)
        found, verdict = data.get("line"), (free_tally if free else tally)(data, usage)
    except (orjson.JSONDecodeError, AttributeError):
        found, verdict = None, None
    if found != line or verdict is None:
        raise TornOutputError(f"{state.partial_path} is damaged at the row of line {line}")
    counted.counts.count_record(verdict)


def spent_before(start: ResumePoint, usage: Usage) -> float:
    """What earlier runs on this output spent: the ordered output's rows and
    the journaled ones after them."""
    journaled = (tally(orjson.loads(raw), usage) for raw in start.journal.results.values())
    return start.checkpoint.counts.cost + sum(verdict.cost for verdict in journaled)
