"""Input lines to requests, outcomes to output lines. Pure: no I/O.

An input line is one of three forms:

1. an OpenAI batch request ``{"custom_id", "method", "url", "body"}``;
2. a bare request body: chat ``{"messages": [...]}``, completions
   ``{"prompt": ...}`` or embeddings ``{"input": str | [...]}``, optionally with
   ``custom_id`` or ``id``;
3. a DashScope native body ``{"input": {"messages": [...]}, "parameters": {...}}``,
   or a native embedding ``{"input": {"texts": [...]}, "parameters": {...}}``
   (read as the bare embeddings body with the same texts and parameters).

A line that is none of these becomes a ``LineError``, never an exception: one
bad line must not stop a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from batchrun.errors import RequestError, TransientError

Kind = Literal["chat", "completions", "embeddings", "dashscope"]

# ``Outcome.parsed`` of a row no response schema checked (None is valid JSON).
NOT_PARSED: Any = object()

# OpenAI batch urls and the kind of request each carries.
BATCH_URLS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Defaults:
    """Job-level request defaults; a line's own values win."""

    model: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    # Only for chat rows (OpenAI or DashScope native), after ``params``: what
    # asks for JSON answers (``schema.response_format``).
    chat_params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)  # not frozen: built per row, frozen init is slower
class Request:
    """One parsed input line. ``line`` is 1-based; ``body`` has defaults applied."""

    line: int
    custom_id: str
    kind: Kind
    body: dict[str, Any]
    url: str | None = None  # the line's own batch url, when it gave one


@dataclass(frozen=True, kw_only=True, slots=True)
class LineError:
    """An input line that is not a request; it becomes an error record."""

    line: int
    custom_id: str
    message: str
    code: str = "invalid_line"


@dataclass(kw_only=True, slots=True)  # not frozen: built per row, frozen init is slower
class Response:
    """A provider's successful answer: HTTP status, request id, parsed body."""

    status_code: int
    request_id: str | None
    body: Any


@dataclass(kw_only=True, slots=True)  # not frozen: built per row, frozen init is slower
class Outcome:
    """The final result of one row, in output-record terms.

    Exactly one of ``response`` (success) or ``error_code`` is the verdict;
    a failed HTTP answer keeps its ``response`` too, so the provider's error
    body reaches the user.
    """

    line: int
    custom_id: str
    response: Response | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False  # the failure was transient: --retry-failed sends it again
    attempts: int = 0
    latency_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float | None = None  # from the answer's usage, when the job has prices
    parsed: Any = NOT_PARSED  # the answer's JSON, when a response schema checked it

    @property
    def ok(self) -> bool:
        return self.error_code is None


UTF8_BOM = b"\xef\xbb\xbf"


def parse_line(raw: bytes, line: int, defaults: Defaults) -> Request | LineError:
    """Parse one input line (without its newline) numbered ``line`` (1-based)."""
    fallback_id = f"line-{line}"
    if line == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]  # files saved by Windows tools start with one
    if not raw.strip():
        return LineError(line=line, custom_id=fallback_id, message=f"line {line}: blank line")
    try:
        raw.decode("utf-8")
        data = orjson.loads(raw)
    except UnicodeDecodeError as exc:
        return _error(line, fallback_id, f"not UTF-8 text (byte {exc.start})")
    except orjson.JSONDecodeError as exc:
        return _error(line, fallback_id, f"not valid JSON ({exc})")
    if not isinstance(data, dict):
        return _error(line, fallback_id, f"expected a JSON object, got {json_type(data)}")
    custom_id = _custom_id(data, fallback_id)
    if raw.count(b"[") + raw.count(b"{") > _DEEP and not _serialisable(data):
        return _error(line, custom_id, f"nested too deeply (more than {_DEEP} levels)")
    if "body" in data and "url" in data:
        return _batch_request(data, line, custom_id, defaults)
    return _bare_request(data, line, custom_id, defaults)


# orjson reads JSON nested up to 1,024 levels but writes at most about 254,
# and a request is written again (its body, its content key): a line nested
# past that must be refused here, or it would fail every run. Only a line
# with this many brackets can be that deep, so most lines skip the check.
_DEEP = 240


def _serialisable(data: dict[str, Any]) -> bool:
    """Whether ``data`` can be written as JSON with two levels around it
    (a content key wraps the body in a list)."""
    try:
        orjson.dumps([[data]])
    except TypeError:
        return False
    return True


def json_type(value: object) -> str:
    """JSON's name for the type of a parsed value (null, boolean, number,
    string, array, object)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {list: "array", str: "string", int: "number", float: "number", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _error(line: int, custom_id: str, what: str) -> LineError:
    return LineError(line=line, custom_id=custom_id, message=f"line {line}: {what}")


def _custom_id(data: Mapping[str, Any], fallback: str) -> str:
    for key in ("custom_id", "id"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return fallback


def _batch_request(
    data: Mapping[str, Any], line: int, custom_id: str, defaults: Defaults
) -> Request | LineError:
    method = data.get("method", "POST")
    url = data.get("url")
    body = data.get("body")
    if method != "POST":
        return _error(line, custom_id, f"method must be POST, got {method!r}")
    kind = BATCH_URLS.get(url) if isinstance(url, str) else None
    if kind is None:
        known = ", ".join(BATCH_URLS)
        return _error(line, custom_id, f"url must be one of {known}, got {url!r}")
    if not isinstance(body, dict):
        return _error(line, custom_id, "body must be a JSON object")
    if body.get("stream"):
        return _error(line, custom_id, _STREAMED)
    if not _has_request(kind, body):
        field, shape = _REQUEST_FIELDS[kind]
        return _error(line, custom_id, f'a {url} body needs "{field}" ({shape})')
    body = _with_defaults(body, defaults, chat=kind == "chat")
    return Request(line=line, custom_id=custom_id, kind=kind, body=body, url=url)


# What a batch line's body must hold for its url: the field the request is.
_REQUEST_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "chat": ("messages", "a non-empty list"),
    "completions": ("prompt", "text or a list"),
    "embeddings": ("input", "non-empty text or a non-empty list"),
}


def _has_request(kind: str, body: Mapping[str, Any]) -> bool:
    """Whether ``body`` holds the request its url's ``kind`` reads (as a bare
    line of that kind must, see ``_bare_kind``)."""
    value = body.get(_REQUEST_FIELDS[kind][0])
    if kind == "chat":
        return isinstance(value, list) and bool(value)
    if kind == "embeddings":
        return isinstance(value, str | list) and bool(value)
    return isinstance(value, str | list)


# A streamed answer comes as server-sent events, not one JSON body: every
# attempt would be paid and then fail to parse.
_STREAMED = 'asks for a streamed answer ("stream": true); batchrun reads whole answers: drop it'


def _bare_request(
    data: Mapping[str, Any], line: int, custom_id: str, defaults: Defaults
) -> Request | LineError:
    # The line's fields in order but its ids: a copy and two pops cost a third of a comprehension.
    body = dict(data)
    body.pop("custom_id", None)
    body.pop("id", None)
    if _is_native_embedding(body):
        if not isinstance(body.get("parameters", {}), dict | None):
            return _error(line, custom_id, _NOT_PARAMETERS)
        body = _flat_embedding(body)
    kind = _bare_kind(body)
    if body.get("stream"):
        return _error(line, custom_id, _STREAMED)
    if kind is None:
        return _error(
            line,
            custom_id,
            "no recognisable request: expected a batch request (url, body), or a body with"
            ' "messages", "prompt", "input", or DashScope\'s "input": {"messages": ...}'
            ' or {"texts": [...]}',
        )
    if kind == "dashscope":
        return _native_request(body, line, custom_id, defaults)
    body = _with_defaults(body, defaults, chat=kind == "chat")
    return Request(line=line, custom_id=custom_id, kind=kind, body=body)


_NOT_PARAMETERS = "a native line's parameters must be a JSON object"


def _native_request(
    body: dict[str, Any], line: int, custom_id: str, defaults: Defaults
) -> Request | LineError:
    """A DashScope native chat line (``{"input": {"messages": ...}, "parameters": ...}``)."""
    parameters = body.get("parameters")
    if parameters is None:  # as good as none given
        parameters = body["parameters"] = {}
    if not isinstance(parameters, dict):
        return _error(line, custom_id, _NOT_PARAMETERS)
    if parameters.get("stream"):
        return _error(line, custom_id, _STREAMED)
    return Request(
        line=line, custom_id=custom_id, kind="dashscope", body=_native_defaults(body, defaults)
    )


def _is_native_embedding(body: Mapping[str, Any]) -> bool:
    given = body.get("input")
    return isinstance(given, dict) and isinstance(given.get("texts"), list)


def _flat_embedding(body: Mapping[str, Any]) -> dict[str, Any]:
    """DashScope's native embedding body, ``{"input": {"texts": [...]},
    "parameters": {...}}``, as the bare embeddings body every provider
    translates: the texts as ``input``, the parameters beside it (the
    DashScope provider puts them back under ``parameters``)."""
    flat = {key: value for key, value in body.items() if key not in ("input", "parameters")}
    parameters = body.get("parameters")
    if isinstance(parameters, dict):
        flat.update(parameters)
    flat["input"] = body["input"]["texts"]
    return flat


def _bare_kind(body: Mapping[str, Any]) -> Kind | None:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return "chat"
    if "prompt" in body and isinstance(body["prompt"], str | list):
        return "completions"
    given = body.get("input")
    if isinstance(given, dict) and isinstance(given.get("messages"), list):
        return "dashscope"
    if isinstance(given, str | list) and given:
        return "embeddings"
    return None


def _with_defaults(body: dict[str, Any], defaults: Defaults, *, chat: bool) -> dict[str, Any]:
    extra = defaults.chat_params if chat else None
    if defaults.model is None and not defaults.params and not extra:
        return body
    merged: dict[str, Any] = dict(defaults.params)
    if extra:
        merged.update(extra)
    if defaults.model is not None:
        merged["model"] = defaults.model
    merged.update(body)
    return merged


def _native_defaults(body: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    """A native line with the job's defaults: the model beside ``input`` (from
    ``--model``, else a ``model`` in ``[params]``, as for the other forms),
    every other parameter under ``parameters``; the line wins."""
    merged = dict(body)
    params = dict(defaults.params)
    model = params.pop("model", None)
    if defaults.model is not None:
        model = defaults.model
    if model is not None:
        merged.setdefault("model", model)
    merged["parameters"] = {**params, **defaults.chat_params, **body.get("parameters", {})}
    return merged


def output_record(outcome: Outcome) -> dict[str, Any]:
    """The OpenAI batch-output shape of an outcome, plus batchrun's own fields."""
    response = outcome.response
    record = {
        "id": f"batch_req_{outcome.line}",
        "custom_id": outcome.custom_id,
        "line": outcome.line,
        "response": None
        if response is None
        else {
            "status_code": response.status_code,
            "request_id": response.request_id,
            "body": response.body,
        },
        "error": None
        if outcome.error_code is None
        else {
            "code": outcome.error_code,
            "message": outcome.error_message,
            "retryable": outcome.retryable,
        },
        "attempts": outcome.attempts,
    }
    if outcome.cost is not None:
        record["cost"] = outcome.cost
    if outcome.parsed is not NOT_PARSED:
        record["parsed"] = outcome.parsed
    return record


def output_line(outcome: Outcome) -> bytes:
    """One output line, newline included."""
    return orjson.dumps(output_record(outcome), option=orjson.OPT_APPEND_NEWLINE)


def answer_line(
    line: int,
    custom_id: str,
    status_code: int,
    request_id: str | None,
    body: Any,
    cost: float | None = None,
) -> bytes:
    """``output_line`` of an answer (no error) that took one attempt and has
    no parsed answer, as batch results are; without building its ``Outcome``
    and ``Response``, for a million of them."""
    record = {
        "id": f"batch_req_{line}",
        "custom_id": custom_id,
        "line": line,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
        "attempts": 1,
    }
    if cost is not None:
        record["cost"] = cost
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def failed_outcome(
    line: int, custom_id: str, exc: RequestError, attempts: int, latency: float = 0.0
) -> Outcome:
    """The outcome of row ``line`` whose last attempt failed with ``exc``
    (a transient error is retryable); an HTTP answer's status and body are kept."""
    response = None
    if exc.status is not None:
        response = Response(status_code=exc.status, request_id=exc.request_id, body=exc.body)
    return Outcome(
        line=line,
        custom_id=custom_id,
        response=response,
        error_code=exc.code,
        error_message=exc.message,
        retryable=isinstance(exc, TransientError),
        attempts=attempts,
        latency_s=latency,
    )


def line_error_outcome(error: LineError) -> Outcome:
    """The outcome of a line that never became a request."""
    return Outcome(
        line=error.line,
        custom_id=error.custom_id,
        error_code=error.code,
        error_message=error.message,
    )
