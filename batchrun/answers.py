"""What a successful answer says, whatever its dialect. Pure: no I/O.

One reader for the OpenAI shapes (chat, completions, embeddings) and
DashScope's native ones (``output.choices``, ``output.text``,
``output.embeddings``), shared by the response-schema check and the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Parsed JSON objects are always dicts: ``type(x) is dict`` is the fast check
# this per-row code can afford (an ABC isinstance costs several times more).


@dataclass(frozen=True, slots=True)
class Answer:
    """The useful part of an answer body.

    ``text`` is the assistant's (or completion's) text, ``vectors`` the
    embeddings in input order; both are None when the body has none.
    """

    text: str | None = None
    finish_reason: str | None = None
    vectors: list[Any] | None = None


NO_ANSWER = Answer()


def read_answer(body: Any) -> Answer:
    """The text, finish reason and embeddings of a 2xx answer body."""
    if type(body) is not dict:
        return NO_ANSWER
    output = body.get("output")
    if type(output) is dict:  # DashScope native
        return _native(output)
    data = body.get("data")
    if isinstance(data, list):
        return Answer(vectors=_vectors(data, "index"))
    return _first_choice(body.get("choices"))


def _first_choice(choices: Any) -> Answer:
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        return NO_ANSWER
    choice = choices[0]
    message = choice.get("message")
    text = _content(message.get("content")) if type(message) is dict else None
    if text is None and isinstance(choice.get("text"), str):
        text = choice["text"]
    return Answer(text=text, finish_reason=_str(choice.get("finish_reason")))


def _native(output: dict[str, Any]) -> Answer:
    embeddings = output.get("embeddings")
    if isinstance(embeddings, list):
        return Answer(vectors=_vectors(embeddings, "text_index"))
    answer = _first_choice(output.get("choices"))
    if answer.text is None and isinstance(output.get("text"), str):
        return Answer(text=output["text"], finish_reason=_str(output.get("finish_reason")))
    return answer


def _content(content: Any) -> str | None:
    """A message's content: a string, or the ``text`` of its parts joined."""
    if type(content) is str:
        return content
    if type(content) is list:
        parts = [part.get("text") for part in content if type(part) is dict]
        return "".join(part for part in parts if isinstance(part, str))
    return None


def _vectors(items: list[Any], index_key: str) -> list[Any]:
    found = [item for item in items if type(item) is dict and "embedding" in item]
    found.sort(key=lambda item: _int(item.get(index_key)))
    return [item["embedding"] for item in found]


def _str(value: Any) -> str | None:
    return value if type(value) is str and value else None


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def usage_tokens(body: Any) -> tuple[int, int]:
    """Tokens (in, out) an answer reports, under either dialect's names."""
    usage = body.get("usage") if type(body) is dict else None
    if type(usage) is not dict:
        return 0, 0
    tokens_in = usage.get("prompt_tokens", usage.get("input_tokens"))
    tokens_out = usage.get("completion_tokens", usage.get("output_tokens"))
    if tokens_in is None and tokens_out is None:  # a DashScope embedding: total_tokens only
        tokens_in = usage.get("total_tokens")
    return _int(tokens_in), _int(tokens_out)
