"""Which batch file each row goes into, and what its line says. Pure: no I/O.

A batch input file holds one endpoint and one model, at most ``max_rows``
lines and ``max_bytes`` bytes. Rows are grouped by (endpoint, model) and each
group is cut into parts as the rows come, so the input is read once and only
one open part per group is held. Within a file a row is named by its input
line (``custom_id`` ``r<line>``): unique even when the input repeats its own
ids, and the key that maps results back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import orjson

from batchrun.contentkey import canonical_json
from batchrun.records import Request

# Provider caps on one batch input file, in bytes.
DEFAULT_MAX_BYTES: Final[dict[str, int]] = {
    "openai": 200 * 1000 * 1000,
    "mock": 200 * 1000 * 1000,
    "dashscope": 500 * 1000 * 1000,
}

_ENDPOINTS: Final = {
    "chat": "/v1/chat/completions",
    "dashscope": "/v1/chat/completions",  # native lines go as chat bodies
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


class Group(NamedTuple):
    """Rows that may share a file."""

    endpoint: str
    model: str | None


def batch_key(line: int) -> str:
    """The ``custom_id`` of input line ``line`` inside a batch file."""
    return f"r{line}"


def line_of_key(key: object) -> int | None:
    """The input line a batch ``custom_id`` names; None if it is not one of ours."""
    if isinstance(key, str) and key.startswith("r") and key[1:].isdigit():
        return int(key[1:])
    return None


def batch_line(request: Request, body: dict[str, Any]) -> tuple[Group, bytes, bytes]:
    """The row's group, its line of the batch file (newline included), and
    ``body``'s canonical JSON, which the line holds as it is.

    ``body`` is the request body in the OpenAI dialect (what the online client
    would send), so a batch answer is the answer to the same request; its keys
    are sorted, which changes nothing the provider reads.
    """
    endpoint = request.url or _ENDPOINTS[request.kind]
    if request.kind == "completions" and _as_chat(body):  # rare: no call for other rows
        endpoint = _ENDPOINTS["chat"]
    model = body.get("model")
    sent = canonical_json(body)
    line = b'{"custom_id":"r%d","method":"POST","url":%b,"body":%b}\n' % (
        request.line,
        _quoted(endpoint),
        sent,
    )
    return _group(endpoint, model if isinstance(model, str) else None), line, sent


def _as_chat(body: dict[str, Any]) -> bool:
    """Whether the dialect sends a completion row as a chat request, by the
    ``body`` it made (``CompatibleModeProvider``: messages and no prompt)."""
    return "messages" in body and "prompt" not in body


@functools.lru_cache(maxsize=1024)
def _group(endpoint: str, model: str | None) -> Group:
    # Shared: a NamedTuple's own constructor is Python code, a fifth of a
    # microsecond per row; a job has a few groups.
    return Group(endpoint, model)


@functools.lru_cache(maxsize=64)
def _quoted(endpoint: str) -> bytes:
    return orjson.dumps(endpoint)


@dataclass(slots=True)
class _Open:
    part: int
    rows: int = 0
    bytes: int = 0


class Splitter:
    """Assigns rows to parts, numbered from ``first_part``.

    Invariant: a part holds rows of one group only, at most ``max_rows`` of
    them and at most ``max_bytes`` bytes (a single row larger than that gets
    a part of its own: the provider will name it as a bad line).
    """

    def __init__(self, max_rows: int, max_bytes: int, first_part: int = 1) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be >= 1")
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._open: dict[Group, _Open] = {}
        self._next = first_part

    def place(self, group: Group, size: int) -> tuple[int, int | None]:
        """The part for a row of ``size`` bytes of ``group``, and the part this
        row closed (it was full), if any."""
        current = self._open.get(group)
        closed = None
        if current is not None and (
            current.rows + 1 > self.max_rows or current.bytes + size > self.max_bytes
        ):
            closed, current = current.part, None
        if current is None:
            current = self._open[group] = _Open(self._next)
            self._next += 1
        current.rows += 1
        current.bytes += size
        return current.part, closed
