"""A batch's result files to output records. Pure: no I/O.

Result lines come in any order and are mapped back by their ``custom_id``
(``r<line>``, see ``plan``). A line with a response becomes the record online
mode would write for that answer: a 2xx is a success, another status the
provider's classified error with the response kept. A line that says the row
never ran (``batch_expired``, ``batch_cancelled``) is unfinished, as is a row
with no line at all: a ``completed`` batch with missing rows is no success.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson

from batchrun.batchmode.known import filed_head
from batchrun.batchmode.plan import line_of_key
from batchrun.errors import RowError, TransientError
from batchrun.providers import Provider
from batchrun.providers.base import answer_error, body_error
from batchrun.records import Outcome, Response, answer_line, failed_outcome, output_line
from batchrun.schema import AnswerCheck

# Bytes a result file is read, and a spill file written, at a time: one part
# at a time, and Python's default (8 KiB) costs a system call per 20 records.
IO_BUFFER = 1 << 20
# Error codes that mean the row was not executed: it is sent again.
NOT_RUN: Final = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})


class Records:
    """Output records by input line, spilled to ``spill`` as they come.

    A part has up to 50,000 records to put in line order; only their lines
    and offsets stay in memory (16 bytes a record), so collecting a part
    costs the same few MiB whatever its answers weigh.
    """

    def __init__(self, spill: Path) -> None:
        self._path = spill
        self._handle: BinaryIO = spill.open("wb+", buffering=IO_BUFFER)
        self._size = 0
        self._lines = array.array("q")
        self._starts = array.array("q")
        self._seen: set[int] = set()
        self._in_order = True  # each line added after the ones before it
        self._last = 0  # the line added last

    def add(self, line: int, data: bytes, head: bytes = b"") -> int | None:
        """Keep ``data`` as ``line``'s record, after ``head`` (see
        ``known.filed_head``); a line's first record wins. Returns where
        ``data`` starts in the spill file (None: the line had a record)."""
        seen = self._seen
        if line in seen:
            return None
        seen.add(line)
        if line < self._last:
            self._in_order = False
        self._last = line
        self._lines.append(line)
        self._starts.append(self._size)
        at = self._size + len(head)
        if head:
            data = head + data  # one write: cheaper than two for a short head
        self._handle.write(data)
        self._size += len(data)
        return at

    def __len__(self) -> int:
        return len(self._lines)

    def lines(self) -> set[int]:
        return set(self._seen)

    @contextlib.contextmanager
    def view(self) -> Iterator[mmap.mmap]:
        """The spill file, read-only (offsets as ``add`` returned them); not empty."""
        self._handle.flush()
        with mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view

    def sorted_chunks(self) -> Iterator[bytes]:
        """The records (each after its head, if it has one) in line order."""
        if not self._size:
            return
        starts, size = self._starts, self._size
        with self.view() as view:
            for index in sorted(range(len(self._lines)), key=self._lines.__getitem__):
                end = starts[index + 1] if index + 1 < len(starts) else size
                yield view[starts[index] : end]

    def keep_as(self, path: Path) -> bool:
        """If the records came in line order, make the spill file ``path``
        (durably, in one rename: no copy) and return True; else False, and
        the caller writes ``sorted_chunks``."""
        if not self._in_order:
            return False
        self._handle.flush()
        os.fsync(self._handle.fileno())
        os.replace(self._path, path)
        return True

    def close(self) -> None:
        """Drop the spill file (if ``keep_as`` did not keep it)."""
        self._handle.close()
        self._path.unlink(missing_ok=True)


@dataclass(slots=True)
class Collected:
    """A part's output records, and its rows left without one."""

    records: Records
    unfinished: set[int] = field(default_factory=set)


# Sees each new record: its line, where it starts in the spill, the record,
# whether it is an answer (no error), whether its error is retryable, and its
# cost (None: not priced).
OnRecord = Callable[[int, int, bytes, bool, bool, float | None], None]
# Tokens (in, out) an answer's body reports, as the run's provider reads them.
Usage = Callable[[Any], tuple[int, int]]
# The cost of an answer from its tokens (in, out), in the job's currency.
Price = Callable[[int, int], float]


@dataclass(frozen=True, slots=True)
class Reading:
    """How answers are read. ``usage``: the run's provider's token reader;
    with it, each answer's record gets a head with its tokens (and cost)
    (``known.filed_head``), so the ordered writer need not parse it again.
    ``check``: the response schema's, which every answer must pass (see
    ``_keep_checked``). ``price``: what an answer costs from its tokens
    (needs ``usage``); None: records carry no cost."""

    usage: Usage | None = None
    check: AnswerCheck | None = None
    price: Price | None = None


@dataclass(frozen=True, slots=True)
class _Reading:
    provider: Provider
    on_record: OnRecord | None
    rules: Reading


def collect(
    files: Iterable[Path],
    ids: Mapping[int, str],
    provider: Provider,
    spill: Path,
    on_record: OnRecord | None = None,
    reading: Reading = Reading(),
) -> Collected:
    """The records of the downloaded result ``files`` for a part whose rows
    (input line → the input's ``custom_id``) are ``ids``, each answer read as
    ``reading`` says; ``on_record`` sees each new one (see ``OnRecord``). The
    caller closes ``records``."""
    how = _Reading(provider, on_record, reading)
    found = Collected(Records(spill))
    for path in files:
        with path.open("rb", buffering=IO_BUFFER) as handle:
            for raw in handle:
                _take(found, raw, ids, how)
    found.unfinished = set(ids) - found.records.lines()
    return found


def _take(found: Collected, raw: bytes, ids: Mapping[int, str], reading: _Reading) -> None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # a damaged line: its row stays unfinished and is sent again
    if not isinstance(data, dict):
        return
    line = line_of_key(data.get("custom_id"))
    if line is None:
        return
    custom_id = ids.get(line)
    if custom_id is None:  # not one of this part's rows (custom ids are never None)
        return
    response = data.get("response")
    if type(response) is dict and _is_answer(response.get("status_code"), response.get("body")):
        if reading.rules.check is None:
            _keep_answer(found, line, custom_id, response, reading)  # most lines: no Outcome
        else:
            _keep_checked(found, _as_response(response), line, custom_id, reading)
        return
    outcome = outcome_of(data, line, custom_id, reading.provider)
    if outcome is not None:
        outcome.cost = _error_cost(reading.rules)
        _keep(found, line, output_line(outcome), b"", outcome, reading)


def _error_cost(rules: Reading) -> float | None:
    """What a row error's record says it cost: nothing when priced (as online
    mode records an error: no tokens counted), None when not."""
    return rules.price(0, 0) if rules.price is not None else None


def _keep(
    found: Collected,
    line: int,
    record: bytes,
    head: bytes,
    verdict: Outcome | None,
    reading: _Reading,
    cost: float | None = None,
) -> None:
    """Spill ``line``'s record after ``head`` and show it to ``on_record``;
    ``verdict``: the record's outcome, None for a plain answer (no error)
    costing ``cost``."""
    at = found.records.add(line, record, head)
    if reading.on_record is not None and at is not None:
        if verdict is None:
            reading.on_record(line, at, record, True, False, cost)
        else:
            reading.on_record(line, at, record, verdict.ok, verdict.retryable, verdict.cost)


def _is_answer(status: object, body: object) -> bool:
    """Whether a response is an answer: a 2xx whose body is an object
    carrying no error instead (see ``body_error``)."""
    if type(status) is not int or not 200 <= status < 300:
        return False
    return type(body) is dict and answer_error(body) is None


def _keep_answer(
    found: Collected, line: int, custom_id: str, response: dict[str, Any], reading: _Reading
) -> None:
    """Spill an answer's record, after a head with its tokens and cost (see
    ``known.filed_head``), and show it to ``on_record``."""
    body = response.get("body")
    head, cost = _head(line, body, reading.rules)
    status, request_id = response["status_code"], _request_id(response)
    record = answer_line(line, custom_id, status, request_id, body, cost)
    _keep(found, line, record, head, None, reading, cost)


def _head(line: int, body: Any, rules: Reading) -> tuple[bytes, float | None]:
    """The head of an answer's record and its cost (``b""`` and None
    without a token reader)."""
    if rules.usage is None:
        return b"", None
    tokens_in, tokens_out = rules.usage(body)
    cost = rules.price(tokens_in, tokens_out) if rules.price is not None else None
    return filed_head(line, tokens_in, tokens_out, cost), cost


def _keep_checked(
    found: Collected, answer: Response, line: int, custom_id: str, reading: _Reading
) -> None:
    """An answer checked against ``--response-schema``: its record with the
    parsed object, or the check's error with the answer kept, as online mode
    records a last attempt. A failed check is not sent again in a batch: the
    row's error is retryable, and ``--retry-failed`` (online) resends it."""
    rules = reading.rules
    assert rules.check is not None
    head, cost = _head(line, answer.body, rules)
    try:
        parsed = rules.check.classify(answer)
    except (RowError, TransientError) as exc:
        failed = failed_outcome(line, custom_id, exc, attempts=1)
        failed.cost = cost  # the answer was paid, as online mode records it
        _keep(found, line, output_line(failed), b"", failed, reading)
        return
    outcome = Outcome(
        line=line, custom_id=custom_id, response=answer, attempts=1, parsed=parsed, cost=cost
    )
    _keep(found, line, output_line(outcome), head, None, reading, cost)


def outcome_of(
    data: dict[str, Any], line: int, custom_id: str, provider: Provider
) -> Outcome | None:
    """The outcome of a result line that is no answer (answers, see
    ``_is_answer``, go straight to their record); None when the row did not run."""
    response, error = data.get("response"), data.get("error")
    if isinstance(response, dict) and type(response.get("status_code")) is int:  # not a bool
        return _error_answer(response, line, custom_id, provider)
    code = error.get("code") if isinstance(error, dict) else None
    if code is None or code in NOT_RUN:
        return None
    message = error.get("message") if isinstance(error, dict) else None
    return Outcome(
        line=line,
        custom_id=custom_id,
        error_code=str(code),
        error_message=str(message or code),
        attempts=1,
    )


def _error_answer(
    response: dict[str, Any], line: int, custom_id: str, provider: Provider
) -> Outcome:
    """A response that is no answer, classified as online mode would."""
    status, body = response["status_code"], response.get("body")
    passed_on = body_error(status, body) if 200 <= status < 300 else None
    verdict = passed_on or provider.classify(status, body)
    return Outcome(
        line=line,
        custom_id=custom_id,
        response=_as_response(response),
        error_code=verdict.code,
        error_message=verdict.message,
        retryable=verdict.verdict == "transient",
        attempts=1,
    )


def _as_response(response: dict[str, Any]) -> Response:
    """A result line's ``response`` (its ``status_code`` an int)."""
    return Response(
        status_code=response["status_code"],
        request_id=_request_id(response),
        body=response.get("body"),
    )


def _request_id(response: dict[str, Any]) -> str | None:
    request_id = response.get("request_id")
    return request_id if isinstance(request_id, str) else None


def invalid_line_record(line: int, custom_id: str, code: str, message: str) -> bytes:
    """The record of a row the provider refused at validation."""
    outcome = Outcome(
        line=line, custom_id=custom_id, error_code=code, error_message=message, attempts=1
    )
    return output_line(outcome)
