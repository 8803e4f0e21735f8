"""A batch's result files to output records. Pure: no I/O.

Result lines come in any order and are mapped back by their ``custom_id``
(``r<line>``, see ``plan``). A line with a response becomes the record online
mode would write for that answer: a 2xx is a success, another status the
provider's classified error with the response kept. A line that says the row
never ran (``batch_expired``, ``batch_cancelled``) is unfinished, as is a row
with no line at all: a ``completed`` batch with missing rows is no success.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from batchrun.batchmode.plan import line_of_key
from batchrun.providers import Provider
from batchrun.records import Outcome, Response, output_line

# Error codes that mean the row was not executed: it is sent again.
NOT_RUN: Final = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})


@dataclass(slots=True)
class Collected:
    """Output records by input line, and the part's rows left without one."""

    records: dict[int, bytes] = field(default_factory=dict)
    unfinished: set[int] = field(default_factory=set)


def collect(contents: Iterable[bytes], ids: Mapping[int, str], provider: Provider) -> Collected:
    """The records of the result files ``contents`` for a part whose rows
    (input line → the input's ``custom_id``) are ``ids``."""
    found = Collected()
    for content in contents:
        for raw in content.splitlines():
            _take(found, raw, ids, provider)
    found.unfinished = set(ids) - found.records.keys()
    return found


def _take(found: Collected, raw: bytes, ids: Mapping[int, str], provider: Provider) -> None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # a damaged line: its row stays unfinished and is sent again
    if not isinstance(data, dict):
        return
    line = line_of_key(data.get("custom_id"))
    if line is None or line not in ids or line in found.records:
        return
    outcome = outcome_of(data, line, ids[line], provider)
    if outcome is not None:
        found.records[line] = output_line(outcome)


def outcome_of(
    data: dict[str, Any], line: int, custom_id: str, provider: Provider
) -> Outcome | None:
    """The outcome of one result line; None when the row did not run."""
    response, error = data.get("response"), data.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        return _answered(response, line, custom_id, provider)
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


def _answered(response: dict[str, Any], line: int, custom_id: str, provider: Provider) -> Outcome:
    status, body = response["status_code"], response.get("body")
    request_id = response.get("request_id")
    answer = Response(
        status_code=status,
        request_id=request_id if isinstance(request_id, str) else None,
        body=body,
    )
    if 200 <= status < 300:
        tokens_in, tokens_out = provider.usage(body)
        return Outcome(
            line=line,
            custom_id=custom_id,
            response=answer,
            attempts=1,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )
    verdict = provider.classify(status, body)
    return Outcome(
        line=line,
        custom_id=custom_id,
        response=answer,
        error_code=verdict.code,
        error_message=verdict.message,
        retryable=verdict.verdict == "transient",
        attempts=1,
    )


def invalid_line_record(line: int, custom_id: str, code: str, message: str) -> bytes:
    """The record of a row the provider refused at validation."""
    outcome = Outcome(
        line=line, custom_id=custom_id, error_code=code, error_message=message, attempts=1
    )
    return output_line(outcome)
