"""An output's records as flat table rows, streamed: the core of ``batchrun
export``, ``read_results`` and ``to_pandas``.

``table_row`` is pure; the rest opens the output (refusing an unfinished one
unless asked) and joins chosen fields of the input lines by line number.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from batchrun.answers import read_answer, usage_tokens
from batchrun.errors import UsageError
from batchrun.inputs import check_input_file, open_input
from batchrun.records import UTF8_BOM
from batchrun.state import StateDir, input_identity

# The table's columns, in order; joined input columns follow them.
COLUMNS: tuple[str, ...] = (
    "line",
    "custom_id",
    "status",
    "text",
    "finish_reason",
    "tokens_in",
    "tokens_out",
    "cost",
    "attempts",
    "error_code",
    "error_message",
    "parsed",
)


def table_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One output record as a table row (see ``COLUMNS``).

    ``text`` is the answer's text or, for embeddings, its vector (a list of
    vectors when the row embedded several inputs); ``parsed`` is JSON text.
    Counts are ints, ``cost`` a float or None.
    """
    response = record.get("response")
    body = response.get("body") if type(response) is dict else None
    error = record.get("error")
    error = error if type(error) is dict else None
    answer = read_answer(body) if error is None else None
    text: Any = None
    if answer is not None:
        text = answer.text
        if text is None and answer.vectors:
            text = answer.vectors[0] if len(answer.vectors) == 1 else answer.vectors
    tokens_in, tokens_out = usage_tokens(body)
    parsed = record.get("parsed")
    return {
        "line": record.get("line"),
        "custom_id": record.get("custom_id"),
        "status": "failed" if error is not None else "ok",
        "text": text,
        "finish_reason": None if answer is None else answer.finish_reason,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost": _cost(record.get("cost")),
        "attempts": record.get("attempts"),
        "error_code": None if error is None else error.get("code"),
        "error_message": None if error is None else error.get("message"),
        "parsed": None if parsed is None else orjson.dumps(parsed).decode(),
    }


def _cost(value: Any) -> float | None:
    """A record's cost: a number, or a table with a numeric ``total``."""
    if type(value) is dict:
        value = value.get("total")
    if type(value) is float or type(value) is int:
        return float(value)
    return None


def output_source(out: Path, *, partial: bool = False) -> Path:
    """The file holding ``out``'s records; ``UsageError`` for an unfinished
    run unless ``partial`` (then its ordered output so far)."""
    state = StateDir(out)
    unfinished = state.read_meta() is not None and state.read_finished() is None
    if unfinished and not partial:
        raise UsageError(
            f"the run on {out} has not finished: finish it (run the same command again),"
            " or pass --partial to export the rows done so far"
        )
    if unfinished:
        # OUT itself, if it exists, is an earlier pass's (a new pass over an
        # edited input, or --retry-failed): this pass's rows are in the
        # partial output, and its input is the one --input is checked against.
        if state.partial_path.exists():
            return state.partial_path
        raise UsageError(
            f"the run on {out} has written no row yet (a --mode batch run writes its rows"
            " once its batches end): nothing to export so far"
        )
    if not out.is_file():
        raise UsageError(f"output {out} does not exist or is not a file")
    return out


def records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of an output file; a torn last line (a run still writing)
    is left out."""
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                return
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise UsageError(f"{path} holds a line that is not JSON: not an output") from None
            if not isinstance(record, dict):
                raise UsageError(f"{path} holds a line that is not a record: not an output")
            line = record.get("line")
            if type(line) is not int or line < 1:
                raise UsageError(
                    f"{path} holds a record whose line is {orjson.dumps(line).decode()[:40]},"
                    " not a line number: not an output"
                )
            yield record


class InputColumns:
    """Top-level fields of the input's lines, looked up by ascending line
    number (1-based) while reading the input once, front to back."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        check_input_file(path)
        self.columns = tuple(columns)
        self._lines = self._read(path)
        self._at = 0

    @staticmethod
    def _read(path: Path) -> Iterator[bytes]:
        with open_input(path) as handle:
            yield from handle

    def fields(self, line: int) -> dict[str, Any]:
        """The chosen fields of input line ``line``; None for a missing one."""
        raw = b""
        while self._at < line:
            raw = next(self._lines, b"")
            self._at += 1
        if self._at != line:
            raise UsageError(f"the output's lines are out of order at line {line}")
        if line == 1:
            raw = raw.removeprefix(UTF8_BOM)  # skipped as the run skipped it
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        data = data if isinstance(data, dict) else {}
        return {column: data.get(column) for column in self.columns}


def read_results(
    out: str | Path,
    *,
    input: str | Path | None = None,
    columns: Sequence[str] = (),
    partial: bool = False,
) -> Iterator[dict[str, Any]]:
    """Stream ``out``'s rows as dicts, one per output line (see ``table_row``),
    with the fields ``columns`` of each row's ``input`` line added."""
    source = output_source(Path(out), partial=partial)
    if isinstance(columns, str):  # its letters would each be a column
        raise UsageError(f"columns is a list of field names, got the text {columns!r}")
    if columns and input is None:
        raise UsageError("--columns needs --input, the file to take them from")
    twice = sorted({name for name in columns if list(columns).count(name) > 1})
    if twice:
        raise UsageError(f"--columns {', '.join(twice)}: named twice")
    clash = set(columns) & set(COLUMNS)
    if clash:
        raise UsageError(f"--columns {', '.join(sorted(clash))}: already an export column")
    joined = None
    if input is not None and columns:
        joined = InputColumns(Path(input), columns)
        _check_same_input(Path(out), Path(input))
    return _rows(source, joined)  # a plain function: bad arguments fail at the call


def _check_same_input(out: Path, given: Path) -> None:
    """``given`` is the input the run on ``out`` read, when its state says
    which (a merged output has none): another file's fields, or an edited
    one's, would be joined to the wrong rows."""
    meta = StateDir(out).read_meta()
    if meta is None or not isinstance(meta.get("input_hash"), str):
        return
    if input_identity(given) == (meta.get("input_size"), meta["input_hash"]):
        return
    raise UsageError(
        f"--input {given} is not the input the run on {out} read ({meta.get('input')},"
        " as it was then): its fields would be joined to the wrong rows"
    )


def _rows(source: Path, joined: InputColumns | None) -> Iterator[dict[str, Any]]:
    for record in records(source):
        row = table_row(record)
        if joined is not None:
            row.update(joined.fields(record["line"]))  # a line number (``records``)
        yield row


def to_pandas(
    out: str | Path,
    *,
    input: str | Path | None = None,
    columns: Sequence[str] = (),
    partial: bool = False,
) -> Any:
    """``out``'s rows as a pandas DataFrame (needs pandas: ``batchrun[pandas]``)."""
    try:
        import pandas
    except ImportError:
        raise UsageError(
            "to_pandas needs pandas: pip install 'batchrun[pandas]'"
            " (or use read_results, which needs nothing)"
        ) from None
    rows = read_results(out, input=input, columns=columns, partial=partial)
    return pandas.DataFrame.from_records(rows, columns=[*COLUMNS, *columns])
