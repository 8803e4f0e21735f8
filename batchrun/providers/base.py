"""What every provider dialect supplies, and the verdict type of its error map."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from batchrun.errors import UsageError
from batchrun.records import Request, json_type

Verdict = Literal["transient", "row", "fatal"]

# Statuses that another attempt may cure, whatever the dialect says.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


@dataclass(frozen=True, slots=True)
class Classified:
    """A provider's verdict on a non-2xx answer."""

    verdict: Verdict
    code: str
    message: str


class Provider:
    """A provider dialect: where to send a request, in what shape, and how to
    read its answers. Subclasses override the class attributes and hooks."""

    name: str = "base"
    default_base_url: str = ""
    embedded_server: bool = False  # no default URL: the run starts the mock server
    default_key_env: str = ""
    fallback_key: str | None = None  # used when the key variable is unset

    def url(self, request: Request, base_url: str) -> str:
        """The absolute URL for ``request`` under ``base_url``."""
        raise NotImplementedError

    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body to send for ``request``."""
        raise NotImplementedError

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Request headers; the key goes only here."""
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def classify(self, status: int, body: Any) -> Classified:
        """The verdict on a non-2xx answer with parsed ``body`` (None if unparsable)."""
        raise NotImplementedError

    def usage(self, body: Any) -> tuple[int, int]:
        """Tokens (in, out) that a successful answer reports; (0, 0) when absent."""
        raise NotImplementedError


# Keys of a successful answer's body: chat and completions, embeddings, DashScope's native API.
_ANSWER_KEYS = ("choices", "data", "output")


def answer_error(body: Mapping[str, Any]) -> Classified | None:
    """The error a 2xx ``body`` carries instead of an answer (some gateways
    pass an upstream failure on as ``200 {"error": ...}``), or None. Such a
    row is tried again (transient): it must not be recorded, or stored for
    reuse, as an answer."""
    error = body.get("error")
    if not error or any(key in body for key in _ANSWER_KEYS):
        return None
    code = message = None
    if isinstance(error, Mapping):
        code, message = error.get("code") or error.get("type"), error.get("message")
    elif isinstance(error, str):
        message = error
    code_text = str(code) if code else "error_in_answer"
    return Classified(
        "transient",
        code_text,
        f"a 2xx answer with an error instead of a result: {message or code_text}",
    )


def body_error(status: int, body: Any) -> Classified | None:
    """The error a 2xx answer's parsed ``body`` is instead of a result, or
    None: an object carrying an error (``answer_error``), or no object at
    all (null, [], "text"). Online mode and batch results read it alike."""
    if isinstance(body, dict):
        return answer_error(body)
    return Classified(
        "transient",
        "invalid_body",
        f"HTTP {status} with a JSON {json_type(body)} body, not an object",
    )


def status_verdict(status: int) -> Verdict:
    """The verdict a bare HTTP status implies when the body says nothing more."""
    if status in (401, 403):
        return "fatal"
    if status in TRANSIENT_STATUSES or status >= 500:
        return "transient"
    return "row"


# The most tokens one answer may report: 100 times the largest context
# window. A negative count or one past this is no count: it would make
# --max-cost spend go down, or put --tpm in debt for years.
MAX_TOKENS = 10**8


def plain_usage(body: Any, tokens_in: str, tokens_out: str) -> tuple[int, int] | None:
    """``body["usage"][tokens_in]`` and ``[tokens_out]`` when the body and its
    usage are plain dicts and both counts are ints, as in almost every answer
    (read once per answer: a quarter of the general checks' cost); else None."""
    usage = body.get("usage") if type(body) is dict else None
    if type(usage) is dict:
        given_in, given_out = usage.get(tokens_in), usage.get(tokens_out)
        if (
            type(given_in) is int  # a bool is no count
            and type(given_out) is int
            and 0 <= given_in <= MAX_TOKENS
            and 0 <= given_out <= MAX_TOKENS
        ):
            return given_in, given_out
    return None


def int_field(data: Any, *keys: str) -> int:
    """``data[keys[0]]`` if it is a count (an int in ``0..MAX_TOKENS``), else
    the next key's, else 0."""
    if isinstance(data, dict | Mapping):  # dict first: its check is cheaper than the ABC's
        for key in keys:
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
                return value
    return 0


@functools.lru_cache(maxsize=1024)  # a run joins the same few pairs once per row
def join_url(base_url: str, path: str) -> str:
    """``base_url`` + ``path``, with exactly one slash between them."""
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def checked_key(name: str, key: str) -> str:
    """``key`` (read from the environment variable ``name``), or ``UsageError``
    when an HTTP header cannot carry it as given: printable Latin-1 only, so a
    pasted line break or a look-alike character would fail every request as
    if the network were at fault. The message never shows the key."""
    bad = next((c for c in key if not (" " <= c <= "~" or "\xa0" <= c <= "\xff")), None)
    if bad is not None:
        flaw = f"holds the character U+{ord(bad):04X}, which an HTTP header cannot carry"
    elif key != key.strip():
        flaw = "starts or ends with a space, which an HTTP header drops"
    else:
        return key
    raise UsageError(f"the API key in {name} {flaw}: set it to the key alone")
