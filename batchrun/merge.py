"""``batchrun merge``: join the outputs of ``--shard I/N`` runs into one output
in input order, refusing a missing, unfinished or foreign shard.

Shard ``I`` holds input rows ``I, I+N, I+2N ...`` in order, so the merged
output takes one line from each shard in turn; every line's number is
checked on the way, and the result appears at ``OUT`` in one rename.

Each shard output must hold as many lines as its finished record says its
run wrote: a shard cut short by its last line (or given an extra one) can
still look like a plausible round-robin split, so the counts, not the shape
alone, decide, and a refusal names the shard file whose count is wrong.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchrun.config import Shard
from batchrun.errors import UsageError, disk_writes
from batchrun.inputs import count_lines
from batchrun.paths import Named, check_written, claim_temporary
from batchrun.state import StateDir, recorded_input


@dataclass(frozen=True, slots=True)
class ShardOutput:
    """A finished shard run: its output file, its shard, its fingerprint, and
    ``rows``, the rows its run wrote (from its finished record)."""

    path: Path
    shard: Shard
    meta: dict[str, Any]
    rows: int


@dataclass(frozen=True, slots=True)
class MergeReport:
    rows: int
    failed: int
    output: Path


def merge(paths: list[Path], out: Path) -> MergeReport:
    """Merge the shard outputs at ``paths`` into ``out``; ``UsageError`` when
    the set is not the complete, finished shards of one job."""
    reads: list[Named] = [(f"shard output {path}", path) for path in paths]
    reads += [("the shards' input", given) for given in filter(None, map(recorded_input, paths))]
    check_written(reads, [("--out", out)])
    _check_replaceable(out)
    shards = sorted((_finished_shard(path) for path in paths), key=lambda s: s.shard.index)
    _check_complete(shards)
    _check_counts(shards)
    partial = out.with_name(out.name + ".merging")
    with disk_writes(out):
        held = claim_temporary(partial, out)  # an earlier merge's is taken over
    try:
        with disk_writes(out):
            rows, failed = _interleave(shards, partial)
            os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)  # still ours: the lock kept other commands off it
        raise
    finally:
        os.close(held)
    return MergeReport(rows=rows, failed=failed, output=out)


# The start of every output record (``records.output_record``): the id
# ``batch_req_<line>``, the custom id, then the same line number. A provider's
# own batch output starts with ``batch_req_`` too, but a hex id and no line.
_RECORD_START = re.compile(
    rb'\{"id":"batch_req_(\d+)","custom_id":"(?:[^"\\]|\\.)*","line":(\d+)[,}]'
)
# Bytes read for it: custom ids longer than this are not worth telling apart.
_START_BYTES = 1 << 16


def _check_replaceable(out: Path) -> None:
    """``out``, if it exists, holds batchrun records (an earlier merge, made
    again): a file of anything else is not replaced."""
    if not out.is_file() or out.stat().st_size == 0:
        return
    with out.open("rb") as handle:
        start = handle.read(_START_BYTES)
    found = _RECORD_START.match(start)
    if found is None or found[1] != found[2]:
        raise UsageError(
            f"--out {out} exists and is not a batchrun output: merge would replace it;"
            " remove it first, or give another name"
        )


def _finished_shard(path: Path) -> ShardOutput:
    state = StateDir(path)
    meta = state.read_meta()
    if meta is None:
        raise UsageError(f"{path} is not a batchrun output (no state in {state.root})")
    if not meta.get("shard"):
        raise UsageError(f"{path} is not a shard's output (it was run without --shard)")
    shard = Shard.parse(str(meta["shard"]))
    finished = state.read_finished()
    if finished is None or not path.exists():
        raise UsageError(
            f"shard {shard} ({path}) has not finished: run it to the end first"
            f" (batchrun status {path})"
        )
    return ShardOutput(path, shard, meta, finished.summary.rows)


def _check_complete(shards: list[ShardOutput]) -> None:
    if not shards:
        raise UsageError("no shard outputs given")
    counts = {s.shard.count for s in shards}
    if len(counts) > 1:
        raise UsageError(f"the shards come from different splits: N = {sorted(counts)}")
    inputs = {(s.meta.get("input_size"), s.meta.get("input_hash")) for s in shards}
    if len(inputs) > 1:
        raise UsageError("the shards were run on different input files")
    _check_same_settings(shards)
    count = counts.pop()
    present = [s.shard.index for s in shards]
    if len(set(present)) != len(present):
        raise UsageError(f"a shard is given twice: {sorted(present)}")
    missing = sorted(set(range(count)) - set(present))
    if missing:
        names = ", ".join(f"{index}/{count}" for index in missing)
        raise UsageError(f"shard {names} missing: every shard of {count} is needed")


# The settings that shape requests (as the fingerprint records them): shards
# of one job share them, or the merged file would mix two jobs.
_SHAPING = ("provider", "model", "params")


def _check_same_settings(shards: list[ShardOutput]) -> None:
    for key in _SHAPING:
        values = [(str(s.shard), s.meta.get(key)) for s in shards]
        if len({orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for _, v in values}) > 1:
            shown = ", ".join(f"shard {name}: {value!r}" for name, value in values)
            raise UsageError(f"the shards were run with different {key} ({shown}): not one job")


def _check_counts(shards: list[ShardOutput]) -> None:
    """Refuse, before anything is written, a shard output whose line count
    is not what its run wrote (the file was changed after the run)."""
    _check_split(shards)
    for s in shards:
        lines = count_lines(s.path)  # as ``_lines`` reads them: a last line without newline counts
        if lines != s.rows:
            raise _wrong_count(s, lines)


def _check_split(shards: list[ShardOutput]) -> None:
    """The recorded counts must be the round-robin split of one input:
    ``_interleave`` trusts them to know which shard owes each row. Which
    record is wrong cannot be told, so every count is shown."""
    total = sum(s.rows for s in shards)
    if any(s.rows != len(range(s.shard.index, total, s.shard.count)) for s in shards):
        shown = ", ".join(f"shard {s.shard}: {s.rows:,}" for s in shards)
        raise UsageError(
            f"the shards' finished records do not split one input of {total:,} rows"
            f" ({shown}): not one job's shards"
        )


def _wrong_count(shard: ShardOutput, lines: int) -> UsageError:
    """The refusal of a shard output that holds ``lines`` lines, naming it."""
    change = "was cut short" if lines < shard.rows else "has lines added"
    return UsageError(
        f"{shard.path} {change}: it holds {lines:,} lines, but the run of shard"
        f" {shard.shard} wrote {shard.rows:,}; remove it and run that shard again"
        " (its stored answers are reused)"
    )


def _interleave(shards: list[ShardOutput], partial: Path) -> tuple[int, int]:
    # Driven by the recorded counts, not by the first shard to run out: the
    # shard owing row ``row`` is known, so a line missing or left over is
    # always blamed on its own file, even if one changed after the count.
    total = sum(s.rows for s in shards)
    failed = 0
    with contextlib.ExitStack() as stack:
        readers = [_lines(stack.enter_context(s.path.open("rb"))) for s in shards]
        sink = stack.enter_context(partial.open("wb"))  # claimed: ours, no link
        for row in range(1, total + 1):
            turn = (row - 1) % len(shards)
            line = next(readers[turn], None)
            if line is None:
                raise _wrong_count(shards[turn], (row - 1) // len(shards))
            failed += _checked(line, row, shards[turn].path)
            sink.write(line)
        _check_exhausted(readers, shards)
        sink.flush()
        os.fsync(sink.fileno())
    return total, failed


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    for line in handle:
        yield line if line.endswith(b"\n") else line + b"\n"


def _checked(line: bytes, expected: int, path: Path) -> int:
    """1 when the record failed, 0 when ok; ``UsageError`` when out of place."""
    try:
        record = orjson.loads(line)
        number, error = record.get("line"), record.get("error")
    except (orjson.JSONDecodeError, AttributeError):
        number, error = None, None
    if number != expected:
        raise UsageError(f"{path} holds line {number!r} where line {expected} belongs")
    return 0 if error is None else 1


def _check_exhausted(readers: list[Iterator[bytes]], shards: list[ShardOutput]) -> None:
    """After every recorded row, each shard must be at its end: one that
    still has lines is the one that grew."""
    for shard, reader in zip(shards, readers, strict=True):
        if next(reader, None) is not None:
            raise _wrong_count(shard, shard.rows + 1 + sum(1 for _ in reader))
