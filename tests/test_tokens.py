"""Token estimates before sending."""

from __future__ import annotations

import orjson
import pytest

from batchrun.tokens import (
    DEFAULT_MAX_OUTPUT,
    estimate_input_tokens,
    estimate_output_tokens,
    estimate_tokens,
    text_tokens,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("abcd", 1), ("abcde", 2), ("hello world, how are you?", 7), ("你好世界", 4)],
)
def test_text_tokens(text: str, tokens: int) -> None:
    assert text_tokens(text) == tokens


def test_chat_counts_every_message_and_text_parts() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "abcd" * 10},
            {"role": "user", "content": [{"type": "text", "text": "abcd" * 5}, {"type": "image"}]},
        ],
        "max_tokens": 32,
    }
    assert estimate_input_tokens(body) == 15
    assert estimate_output_tokens(body) == 32
    assert estimate_tokens(body) == 47


def test_dashscope_native_reads_input_messages_and_parameters() -> None:
    body = {
        "input": {"messages": [{"role": "user", "content": "abcd" * 3}]},
        "parameters": {"max_tokens": 10},
    }
    assert estimate_tokens(body) == 13


def test_embeddings_produce_no_output_tokens() -> None:
    assert estimate_tokens({"input": ["abcd", "abcdabcd"]}) == 3


def test_completion_without_max_tokens_reserves_the_default() -> None:
    assert estimate_tokens({"prompt": "abcd"}) == 1 + DEFAULT_MAX_OUTPUT
    assert estimate_output_tokens({"prompt": "x", "max_completion_tokens": 7}) == 7


def test_a_max_tokens_json_read_as_a_float_is_still_the_cap() -> None:
    # 2 ** 64 does not fit JSON parsers' integers: it arrives as a float.
    huge = orjson.loads(b'{"prompt": "x", "max_tokens": 18446744073709551616}')
    assert estimate_output_tokens(huge) == 2**64
    assert estimate_output_tokens({"prompt": "x", "max_tokens": 512.0}) == 512
    assert estimate_output_tokens({"prompt": "x", "max_tokens": 0.5}) == DEFAULT_MAX_OUTPUT
