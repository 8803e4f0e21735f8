"""Token estimates before sending: for rate budgets and cost estimates.

No tokenizer is bundled: the estimate is characters / 4 (a fair average for
English with BPE tokenizers; CJK text runs closer to one token per character,
so CJK characters count as one each). Rate limiting corrects the estimate
from the ``usage`` each answer reports.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Output tokens assumed when a request sets no max_tokens.
DEFAULT_MAX_OUTPUT = 256


def text_tokens(text: str) -> int:
    """Estimated tokens in ``text``: ~4 characters each, CJK one each."""
    if text.isascii():
        return (len(text) + 3) // 4
    wide = sum(1 for ch in text if ch >= "\u2e80")
    return wide + (len(text) - wide + 3) // 4


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of a request body in any supported form."""
    return sum(text_tokens(text) for text in _texts(body))


def estimate_output_tokens(body: Mapping[str, Any]) -> int:
    """The most output the request allows (``max_tokens`` and its spellings)."""
    if "input" in body and "messages" not in body and not isinstance(body.get("input"), Mapping):
        return 0  # embeddings produce no tokens, whatever max_tokens a job default adds
    parameters = body.get("parameters")
    for source in (body, parameters if isinstance(parameters, Mapping) else {}):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            # JSON reads a whole number past 64 bits (or written 512.0) as a
            # float: it is still the cap the provider is asked for.
            if isinstance(value, float) and value >= 0 and value.is_integer():
                return int(value)
    return DEFAULT_MAX_OUTPUT


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Input plus the most output: what a rate budget must reserve."""
    return estimate_input_tokens(body) + estimate_output_tokens(body)


def _texts(body: Mapping[str, Any]) -> Iterator[str]:
    given = body.get("input")
    messages = body.get("messages")
    if isinstance(given, Mapping):
        messages = given.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                yield from _content_texts(message.get("content"))
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (item for item in value if isinstance(item, str))


def _content_texts(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]
