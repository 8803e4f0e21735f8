"""What a request asks of the mock provider and what it answers: pure logic.

A row scripts its own faults with ``mock:NAME[=VALUE]`` tokens in its prompt
(see ``batchrun.mock.server``); ``parse_directives`` reads them, and
``success_body`` makes the deterministic answer of each dialect.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import orjson

from batchrun.contentkey import canonical_json
from batchrun.records import Kind

ECHO_CHARS: Final = 200
ALWAYS: Final = 1 << 30  # attempts: more than any run makes


@dataclass(frozen=True, slots=True)
class Directives:
    """A row's parsed ``mock:`` tokens (see the module docstring); 0 = off."""

    delay: float = 0.0
    fail: int | None = None
    fail_times: int | None = None  # None: every attempt
    retry_after: str | None = None
    quota: bool = False
    reset: int = 0
    truncate: int = 0
    badjson: int = 0
    notjson: int = 0  # asked for JSON: attempts n <= N answer prose instead
    wrongshape: int = 0  # asked for JSON: attempts n <= N answer JSON of another shape
    length: bool = False  # the answer stops at the token limit (finish_reason length)
    trickle: float = 0.0  # seconds between body bytes
    trickle_times: int | None = None  # None: every attempt
    hang102: int = 0
    huge: int = 0  # body bytes
    chunked: bool = False
    oddbody: int = 0
    errbody: int = 0  # attempts n <= N: a 200 whose body is an error, as some gateways answer
    redirect: int | None = None  # a 3xx status
    size: int = 0  # characters of answer content, at least


NO_DIRECTIVES: Final = Directives()


def _seconds(value: str | None) -> float:
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def _count(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _times(found: dict[str, str], name: str) -> int:
    """``NAME=N``: the first N attempts; a bare ``NAME``: every attempt."""
    if name not in found:
        return 0
    return _count(found[name]) if found[name] else ALWAYS


def _fail(value: str | None) -> tuple[int | None, int | None]:
    code, sep, times = (value or "").partition("x")
    if not code.isdigit() or not 400 <= int(code) <= 599 or (sep and not times.isdigit()):
        return None, None
    return int(code), int(times) if sep else None


def _paced(value: str | None) -> tuple[float, int | None]:
    """``S`` or ``SxN``: seconds, and the attempts it applies to (None: all)."""
    seconds, sep, times = (value or "").partition("x")
    if sep and not times.isdigit():
        return 0.0, None
    return _seconds(seconds), int(times) if sep else None


def _redirect(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() and 300 <= int(value) <= 399 else None


def parse_directives(text: str) -> Directives:
    """Collect the ``mock:NAME[=VALUE]`` tokens of a prompt text."""
    if "mock:" not in text:
        return NO_DIRECTIVES
    found: dict[str, str] = {}
    for token in text.split():
        if token.startswith("mock:"):
            name, _, value = token[5:].partition("=")
            found[name] = value
    fail, fail_times = _fail(found.get("fail"))
    trickle, trickle_times = _paced(found.get("trickle"))
    return Directives(
        delay=_seconds(found.get("delay")),
        fail=fail,
        fail_times=fail_times,
        retry_after=found.get("retry_after") or None,
        quota="quota" in found,
        reset=_count(found.get("reset")),
        truncate=_count(found.get("truncate")),
        badjson=_count(found.get("badjson")),
        notjson=_times(found, "notjson"),
        wrongshape=_times(found, "wrongshape"),
        length="length" in found,
        trickle=trickle,
        trickle_times=trickle_times,
        hang102=_count(found.get("hang102")),
        huge=_count(found.get("huge")),
        chunked="chunked" in found,
        oddbody=_count(found.get("oddbody")),
        errbody=_count(found.get("errbody")),
        redirect=_redirect(found.get("redirect")),
        size=_count(found.get("size")),
    )


def _strings(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [item for item in items if isinstance(item, str)]


def _message_texts(messages: Any) -> list[str]:
    """One text per message: a string content, or its list's ``text`` parts."""
    texts = []
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = (part.get("text") for part in content if isinstance(part, dict))
            content = "\n".join(part for part in parts if isinstance(part, str))
        texts.append(content if isinstance(content, str) else "")
    return texts


def prompt_parts(kind: Kind, body: dict[str, Any]) -> list[str]:
    """The texts of a request: message contents, prompts or embedding inputs."""
    if kind == "chat":
        return _message_texts(body.get("messages"))
    if kind != "dashscope":
        return _strings(body.get("prompt" if kind == "completions" else "input"))
    given = body.get("input")
    if not isinstance(given, dict):
        return []
    texts = _message_texts(given.get("messages")) or _strings(given.get("prompt"))
    return texts or _strings(given.get("texts"))


def openai_error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-dialect error body for HTTP ``status``; ``code`` overrides the default."""
    if status == 429:
        kind_type, default = "requests", "rate_limit_exceeded"
    else:
        kind_type = default = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind_type, "code": code or default}}


@dataclass(slots=True)
class Call:
    """One authorised request with a JSON object body."""

    kind: Kind
    digest: str
    attempt: int
    body: dict[str, Any]
    parts: list[str]

    @property
    def request_id(self) -> str:
        return "req-" + self.digest[:16]


def digest_of(raw: bytes, body: dict[str, Any] | None) -> str:
    """The sha256 hex digest naming a request: of ``body``'s canonical JSON
    (sorted keys), or of ``raw`` when the body is no JSON object."""
    data = raw if body is None else canonical_json(body)
    return hashlib.sha256(data).hexdigest()


def _embedding(text: str) -> list[float]:
    # 32 digest bytes are 8 signed int32s; dividing by 2**31 lands in [-1, 1).
    words = struct.unpack("<8i", hashlib.sha256(text.encode()).digest())
    return [word / 2147483648 for word in words]


def _native_texts(body: dict[str, Any]) -> bool:
    """Whether a DashScope native body is an embedding's (``input.texts``)."""
    given = body.get("input")
    return isinstance(given, dict) and "texts" in given


def _asks_json(call: Call) -> bool:
    """Whether the request set ``response_format`` (DashScope: in ``parameters``)."""
    body = call.body
    if call.kind == "dashscope":
        parameters = body.get("parameters")
        body = parameters if isinstance(parameters, dict) else {}
    given = body.get("response_format")
    return isinstance(given, dict) and given.get("type") in ("json_object", "json_schema")


def _answer_text(call: Call, rules: Directives, n_in: int) -> str:
    """The echo; asked for JSON, ``{"echo": ..., "words": n_in}`` unless the
    directives script prose or another shape; cut in half with ``length``."""
    echo = call.parts[-1][:ECHO_CHARS] if call.parts else ""
    if not _asks_json(call):
        text = "echo: " + echo
    elif call.attempt <= rules.notjson:
        text = "Sure! Here is the JSON you asked for."
    elif call.attempt <= rules.wrongshape:
        text = orjson.dumps({"unexpected": True}).decode()
    else:
        text = orjson.dumps({"echo": echo, "words": n_in}).decode()
    return text[: len(text) // 2] if rules.length else text


def success_body(call: Call, rules: Directives = NO_DIRECTIVES) -> dict[str, Any]:
    """The normal answer; token counts are whitespace-separated words. A
    chat or completion answer's content is padded to ``rules.size`` characters."""
    model = call.body.get("model")
    model = model if isinstance(model, str) else "mock"
    n_in = sum(len(part.split()) for part in call.parts)
    if call.kind == "embeddings":
        data = [
            {"object": "embedding", "index": i, "embedding": _embedding(text)}
            for i, text in enumerate(call.parts)
        ]
        usage = {"prompt_tokens": n_in, "total_tokens": n_in}
        return {"object": "list", "data": data, "model": model, "usage": usage}
    if call.kind == "dashscope" and _native_texts(call.body):
        vectors = [
            {"text_index": i, "embedding": _embedding(text)} for i, text in enumerate(call.parts)
        ]
        usage = {"total_tokens": n_in}
        return {"output": {"embeddings": vectors}, "usage": usage, "request_id": call.request_id}
    content = _answer_text(call, rules, n_in)
    size = rules.size
    if size > len(content):
        content += (" pad" * (size // 4 + 1))[: size - len(content)]
    message = {"role": "assistant", "content": content}
    n_out = len(content.split())
    finish = "length" if rules.length else "stop"
    if call.kind == "dashscope":
        output = {"choices": [{"finish_reason": finish, "message": message}]}
        usage = {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}
        return {"output": output, "usage": usage, "request_id": call.request_id}
    chat = call.kind == "chat"
    choice = {"index": 0, **({"message": message} if chat else {"text": content})}
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + call.digest[:12],
        "object": "chat.completion" if chat else "text_completion",
        "created": 0,
        "model": model,
        "choices": [{**choice, "finish_reason": finish}],
        "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
    }
