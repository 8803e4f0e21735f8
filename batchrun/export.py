"""``batchrun export OUT --to FILE``: an output's rows as Parquet, CSV or JSONL.

The rows come from ``results.read_results``; the writers here only lay them
out. Each writes to a temporary file beside ``FILE`` and renames it into
place, so a failed export leaves no half-written table.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from batchrun.errors import UsageError, disk_writes
from batchrun.paths import Named, check_written, claim_temporary
from batchrun.results import COLUMNS, read_results
from batchrun.state import recorded_input

Format = Literal["parquet", "csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("parquet", "csv", "jsonl")
_SUFFIXES: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
ROW_GROUP = 8_192  # Parquet rows held in memory at once
# ... and at most about this many bytes of their values: large answers or
# vectors end a group early, so memory holds one group whatever rows weigh.
GROUP_BYTES = 16 << 20
# Columns that ``table_row`` fills with text or None only.
_ALWAYS_TEXT = frozenset({"custom_id", "status", "finish_reason", "error_code", "parsed"})


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What an export wrote: ``rows`` rows, ``failed`` of them failed rows."""

    rows: int
    failed: int
    path: Path
    format: Format


def choose_format(to: Path, given: str | None) -> Format:
    """``given`` when set, else the format ``to``'s extension names."""
    if given is not None:
        if given not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {given!r}")
        return given
    found = _SUFFIXES.get(to.suffix.lower())
    if found is None:
        raise UsageError(
            f"cannot tell the format of {to} from its extension: name it .parquet, .csv or"
            " .jsonl, or pass --format"
        )
    return found


def export(
    out: Path,
    to: Path,
    *,
    format: str | None = None,
    input: Path | None = None,
    columns: Sequence[str] = (),
    partial: bool = False,
) -> ExportReport:
    """Write ``out``'s rows to ``to`` (see ``results.table_row``), with the
    input fields ``columns`` joined on; ``UsageError`` on bad arguments."""
    chosen = choose_format(to, format)
    check_written(_read_by(out, input), [("--to", to)])
    writer = {"parquet": write_parquet, "csv": write_csv, "jsonl": write_jsonl}[chosen]
    if chosen == "parquet":
        _require_pyarrow()
    rows = _Counted(read_results(out, input=input, columns=columns, partial=partial))
    names = (*COLUMNS, *columns)
    # One name per --to: a killed export's piece is taken over by the next
    # export to the same place, never left for good (see ``claim_temporary``).
    fresh = to.with_name(f".{to.name}.exporting")
    with disk_writes(to):
        held = claim_temporary(fresh, to)
    try:
        with disk_writes(to):
            writer(rows, names, fresh)
            os.replace(fresh, to)
    except BaseException:
        fresh.unlink(missing_ok=True)  # still ours: the lock kept other commands off it
        raise
    finally:
        os.close(held)
    return ExportReport(rows=rows.rows, failed=rows.failed, path=to, format=chosen)


def _read_by(out: Path, input: Path | None) -> list[Named]:
    """What an export reads, and the input of OUT's run: none may be overwritten."""
    reads: list[Named] = [("OUT", out)]
    if input is not None:
        reads.append(("--input", input))
    run_input = recorded_input(out)
    if run_input is not None:
        reads.append(("the input of OUT's run", run_input))
    return reads


class _Counted:
    """Rows passed through, counted."""

    def __init__(self, rows: Iterable[dict[str, Any]]) -> None:
        self._rows = rows
        self.rows = self.failed = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self._rows:
            self.rows += 1
            self.failed += row["status"] == "failed"
            yield row


def write_jsonl(rows: Iterable[dict[str, Any]], names: Sequence[str], path: Path) -> None:
    """One JSON object per row; vectors stay lists."""
    del names  # every row holds every column already
    with path.open("wb") as handle:
        for row in rows:
            handle.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))


def write_csv(rows: Iterable[dict[str, Any]], names: Sequence[str], path: Path) -> None:
    """A header, then one line per row; lists and objects as JSON text, None empty."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(names)
        for row in rows:
            out.writerow([_cell(row[name]) for name in names])


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    return value


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError(
            "exporting to Parquet needs pyarrow: pip install 'batchrun[parquet]'"
            " (or export to .csv or .jsonl, which need nothing)"
        ) from None


def write_parquet(rows: Iterable[dict[str, Any]], names: Sequence[str], path: Path) -> None:
    """Row groups of ``ROW_GROUP`` rows through one ``ParquetWriter``; memory
    holds one group. Column types come from the first group (see
    ``parquet_schema``)."""
    import pyarrow.parquet as pq

    groups = _groups(iter(rows))
    group = next(groups, [])
    schema = parquet_schema(group, names)
    with pq.ParquetWriter(path, schema) as writer:
        while group:
            writer.write_table(_arrow_table(group, schema), row_group_size=ROW_GROUP)
            group = next(groups, [])


def _groups(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """``rows`` in groups of at most ``ROW_GROUP`` rows and about
    ``GROUP_BYTES`` bytes of values (a group holds at least one row)."""
    group: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        group.append(row)
        size += _weight(row)
        if len(group) >= ROW_GROUP or size >= GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def _weight(row: dict[str, Any]) -> int:
    """About what ``row``'s values take in a table: text by length, lists
    (vectors) at 8 bytes an item."""
    size = 0
    for value in row.values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, list):
            size += 8 * len(value) + sum(8 * len(item) for item in value if isinstance(item, list))
        elif isinstance(value, dict):
            size += len(orjson.dumps(value))
        else:
            size += 8
    return size


def parquet_schema(sample: list[dict[str, Any]], names: Sequence[str]) -> Any:
    """The Arrow schema: fixed types for batchrun's columns; ``text`` a list
    of floats when the sample's answers are all vectors; joined input columns
    as pyarrow infers them from the sample (objects, lists and mixed or empty
    columns become JSON text)."""
    import pyarrow as pa

    fixed = {
        "line": pa.int64(),
        "tokens_in": pa.int64(),
        "tokens_out": pa.int64(),
        "attempts": pa.int64(),
        "cost": pa.float64(),
    }
    fields = []
    for name in names:
        kind = fixed.get(name)
        if kind is None:
            kind = _inferred([row[name] for row in sample], vectors=name == "text")
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def _inferred(values: list[Any], *, vectors: bool) -> Any:
    import pyarrow as pa

    present = [value for value in values if value is not None]
    if vectors and present and all(_is_vector(value) for value in present):
        return pa.list_(pa.float64())
    if not present or any(isinstance(value, list | dict) for value in present):
        return pa.string()
    try:
        kind = pa.array(present).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.string()
    return kind if pa.types.is_primitive(kind) or pa.types.is_string(kind) else pa.string()


def _is_vector(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, int | float) for item in value)


def _arrow_table(group: list[dict[str, Any]], schema: Any) -> Any:
    import pyarrow as pa

    arrays = []
    for field in schema:
        values = [row[field.name] for row in group]
        if field.name not in _ALWAYS_TEXT and pa.types.is_string(field.type):
            values = [_text(value) for value in values]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise UsageError(
                f"column {field.name!r} changes type after the first {ROW_GROUP:,} rows"
                f" (it was {field.type}): export to .csv or .jsonl instead"
            ) from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
