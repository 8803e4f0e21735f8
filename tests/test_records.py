"""Tests of batchrun.records: input forms, defaults, malformed lines, output records."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.records import (
    Defaults,
    LineError,
    Outcome,
    Request,
    Response,
    answer_line,
    line_error_outcome,
    output_line,
    output_record,
    parse_line,
)

NO_DEFAULTS = Defaults()
MESSAGES = [{"role": "user", "content": "hi"}]


def dumps(data: Any) -> bytes:
    return orjson.dumps(data)


def parse_ok(data: Any, line: int = 1, defaults: Defaults = NO_DEFAULTS) -> Request:
    result = parse_line(dumps(data), line, defaults)
    assert isinstance(result, Request), result
    return result


def parse_err(raw: bytes, line: int = 1, defaults: Defaults = NO_DEFAULTS) -> LineError:
    result = parse_line(raw, line, defaults)
    assert isinstance(result, LineError), result
    return result


# --- OpenAI batch request form ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "body"),
    [
        ("/v1/chat/completions", "chat", {"model": "gpt-4o-mini", "messages": MESSAGES}),
        ("/v1/completions", "completions", {"model": "m", "prompt": "Once"}),
        ("/v1/embeddings", "embeddings", {"model": "e", "input": "text"}),
    ],
)
def test_batch_request_kinds(url: str, kind: str, body: dict[str, Any]) -> None:
    request = parse_ok({"custom_id": "req-1", "method": "POST", "url": url, "body": body}, 7)
    assert request == Request(line=7, custom_id="req-1", kind=kind, body=body, url=url)


def test_batch_request_method_defaults_to_post() -> None:
    body = {"messages": MESSAGES}
    request = parse_ok({"custom_id": "a", "url": "/v1/chat/completions", "body": body})
    assert request.kind == "chat"
    assert request.body == body
    assert request.url == "/v1/chat/completions"


CHAT_NEEDS = '"messages" (a non-empty list)'


@pytest.mark.parametrize(
    ("url", "body", "needs"),
    [
        # A native DashScope body in an OpenAI batch line: no chat request.
        ("/v1/chat/completions", {"input": {"messages": MESSAGES}}, CHAT_NEEDS),
        ("/v1/chat/completions", {"messages": []}, CHAT_NEEDS),
        ("/v1/chat/completions", {"messages": "hi"}, CHAT_NEEDS),
        ("/v1/embeddings", {"model": "e"}, '"input" (non-empty text or a non-empty list)'),
        ("/v1/embeddings", {"input": ""}, '"input" (non-empty text or a non-empty list)'),
        ("/v1/completions", {"model": "m"}, '"prompt" (text or a list)'),
        ("/v1/completions", {"prompt": 3}, '"prompt" (text or a list)'),
    ],
)
def test_a_batch_request_body_must_hold_the_request_its_url_names(
    url: str, body: dict[str, Any], needs: str
) -> None:
    # Every provider reads that field: without it, the line is no request.
    error = parse_err(dumps({"custom_id": "b", "url": url, "body": body}), line=2)
    assert error == LineError(line=2, custom_id="b", message=f"line 2: a {url} body needs {needs}")


def test_batch_request_without_custom_id_uses_line_number() -> None:
    request = parse_ok({"url": "/v1/embeddings", "body": {"input": ["a"]}}, line=12)
    assert request.custom_id == "line-12"


def test_batch_request_method_must_be_post() -> None:
    raw = dumps({"custom_id": "g", "method": "GET", "url": "/v1/chat/completions", "body": {}})
    error = parse_err(raw, line=4)
    assert error == LineError(
        line=4, custom_id="g", message="line 4: method must be POST, got 'GET'"
    )


def test_batch_request_unknown_url() -> None:
    raw = dumps({"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {}})
    error = parse_err(raw, line=2)
    assert error.custom_id == "r"
    assert error.code == "invalid_line"
    assert error.message == (
        "line 2: url must be one of /v1/chat/completions, /v1/completions, /v1/embeddings,"
        " got '/v1/responses'"
    )


def test_batch_request_url_not_a_string() -> None:
    error = parse_err(dumps({"custom_id": "r", "url": 5, "body": {}}), line=3)
    assert error.message.startswith("line 3: url must be one of")
    assert error.message.endswith("got 5")


@pytest.mark.parametrize("body", [[], "text", None, 3])
def test_batch_request_body_must_be_object(body: Any) -> None:
    raw = dumps({"custom_id": "b", "url": "/v1/chat/completions", "body": body})
    error = parse_err(raw, line=9)
    assert error == LineError(line=9, custom_id="b", message="line 9: body must be a JSON object")


def _asking(stream: object) -> list[dict[str, Any]]:
    batch_body = {"messages": MESSAGES, "stream": stream}
    return [
        {"custom_id": "s", "url": "/v1/chat/completions", "body": batch_body},
        {"custom_id": "s", "messages": MESSAGES, "stream": stream},
        {"custom_id": "s", "prompt": "Once", "stream": stream},
    ]


@pytest.mark.parametrize("form", range(3))
def test_a_line_asking_for_a_streamed_answer_is_refused(form: int) -> None:
    error = parse_err(dumps(_asking(True)[form]), line=4)
    assert error.custom_id == "s"
    assert error.message == (
        'line 4: asks for a streamed answer ("stream": true); batchrun reads whole answers: drop it'
    )
    assert isinstance(parse_line(dumps(_asking(False)[form]), 4, NO_DEFAULTS), Request)


# --- bare bodies -----------------------------------------------------------------


def test_bare_chat_strips_custom_id_and_id() -> None:
    request = parse_ok({"custom_id": "c1", "id": "other", "model": "m", "messages": MESSAGES}, 5)
    assert request == Request(
        line=5, custom_id="c1", kind="chat", body={"model": "m", "messages": MESSAGES}
    )
    assert request.url is None


def test_bare_completions_uses_id_as_custom_id() -> None:
    request = parse_ok({"id": "req-7", "prompt": "Say hi"})
    assert request.custom_id == "req-7"
    assert request.kind == "completions"
    assert request.body == {"prompt": "Say hi"}


def test_bare_completions_prompt_list() -> None:
    request = parse_ok({"prompt": ["a", "b"]})
    assert request.kind == "completions"


@pytest.mark.parametrize("given_input", ["a text", ["one", "two"]])
def test_bare_embeddings(given_input: Any) -> None:
    request = parse_ok({"id": 42, "input": given_input, "model": "text-embedding-v3"})
    assert request.custom_id == "42"
    assert request.kind == "embeddings"
    assert request.body == {"input": given_input, "model": "text-embedding-v3"}


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ({}, "line-3"),
        ({"id": 0}, "0"),
        ({"id": -5}, "-5"),
        ({"id": True}, "line-3"),
        ({"id": 1.5}, "line-3"),
        ({"id": ""}, "line-3"),
        ({"custom_id": "", "id": 5}, "5"),
        ({"custom_id": None, "id": "x"}, "x"),
        ({"custom_id": 9, "id": "x"}, "9"),
    ],
)
def test_custom_id_choice(ids: dict[str, Any], expected: str) -> None:
    request = parse_ok({**ids, "messages": MESSAGES}, line=3)
    assert request.custom_id == expected
    assert request.body == {"messages": MESSAGES}


def test_dashscope_native_form() -> None:
    data = {
        "custom_id": "n1",
        "model": "qwen-plus",
        "input": {"messages": MESSAGES},
        "parameters": {"temperature": 0.1},
    }
    request = parse_ok(data, line=8)
    assert request == Request(
        line=8,
        custom_id="n1",
        kind="dashscope",
        body={
            "model": "qwen-plus",
            "input": {"messages": MESSAGES},
            "parameters": {"temperature": 0.1},
        },
    )


def test_a_dashscope_native_embedding_is_read_as_the_bare_embeddings_body() -> None:
    data = {
        "custom_id": "e1",
        "model": "text-embedding-v3",
        "input": {"texts": ["a", "b"]},
        "parameters": {"dimension": 512},
    }
    request = parse_ok(data, line=2)
    assert request == Request(
        line=2,
        custom_id="e1",
        kind="embeddings",
        body={"model": "text-embedding-v3", "dimension": 512, "input": ["a", "b"]},
    )
    assert not isinstance(
        parse_line(orjson.dumps({"input": {"texts": []}}), 1, Defaults()), Request
    )


def test_dashscope_native_without_parameters_gets_empty_parameters() -> None:
    request = parse_ok({"input": {"messages": MESSAGES}})
    assert request.kind == "dashscope"
    assert request.body == {"input": {"messages": MESSAGES}, "parameters": {}}


# --- defaults --------------------------------------------------------------------


def test_defaults_fill_what_the_line_leaves_out() -> None:
    defaults = Defaults(model="qwen-plus", params={"temperature": 0.2, "max_tokens": 64})
    request = parse_ok({"messages": MESSAGES}, defaults=defaults)
    assert request.body == {
        "model": "qwen-plus",
        "temperature": 0.2,
        "max_tokens": 64,
        "messages": MESSAGES,
    }


def test_defaults_line_wins() -> None:
    defaults = Defaults(model="qwen-plus", params={"temperature": 0.2, "max_tokens": 64})
    request = parse_ok(
        {"model": "qwen-max", "temperature": 0.9, "messages": MESSAGES}, defaults=defaults
    )
    assert request.body == {
        "model": "qwen-max",
        "temperature": 0.9,
        "max_tokens": 64,
        "messages": MESSAGES,
    }


def test_defaults_model_beats_params_model() -> None:
    request = parse_ok(
        {"prompt": "x"}, defaults=Defaults(model="chosen", params={"model": "from-params"})
    )
    assert request.body == {"model": "chosen", "prompt": "x"}


def test_defaults_apply_to_batch_request_body() -> None:
    defaults = Defaults(model="m-default", params={"seed": 1})
    request = parse_ok(
        {"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": MESSAGES}},
        defaults=defaults,
    )
    assert request.body == {"model": "m-default", "seed": 1, "messages": MESSAGES}


def test_defaults_do_not_mutate_the_line_dict() -> None:
    defaults = Defaults(model="m", params={"seed": 1})
    request = parse_ok({"messages": MESSAGES}, defaults=defaults)
    again = parse_ok({"messages": MESSAGES}, defaults=NO_DEFAULTS)
    assert request.body != again.body
    assert again.body == {"messages": MESSAGES}


def test_native_defaults_go_into_parameters() -> None:
    defaults = Defaults(model="qwen-plus", params={"temperature": 0.2, "top_p": 0.8})
    request = parse_ok(
        {"input": {"messages": MESSAGES}, "parameters": {"temperature": 0.7}}, defaults=defaults
    )
    assert request.body == {
        "model": "qwen-plus",
        "input": {"messages": MESSAGES},
        "parameters": {"temperature": 0.7, "top_p": 0.8},
    }


def test_native_line_model_wins() -> None:
    request = parse_ok(
        {"model": "qwen-max", "input": {"messages": MESSAGES}},
        defaults=Defaults(model="qwen-plus"),
    )
    assert request.body == {
        "model": "qwen-max",
        "input": {"messages": MESSAGES},
        "parameters": {},
    }


def test_a_model_in_the_params_goes_beside_a_native_lines_input() -> None:
    # As for the other forms: a "model" in [params] or --param is the model,
    # not a parameter; --model beats it, and the line beats both.
    native = {"input": {"messages": MESSAGES}}
    request = parse_ok(native, defaults=Defaults(params={"model": "qwen-max", "seed": 1}))
    assert request.body == {"model": "qwen-max", **native, "parameters": {"seed": 1}}
    both = Defaults(model="qwen-plus", params={"model": "qwen-max"})
    assert parse_ok(native, defaults=both).body["model"] == "qwen-plus"
    own = parse_ok({"model": "mine", **native}, defaults=both)
    assert (own.body["model"], own.body["parameters"]) == ("mine", {})


@pytest.mark.parametrize(
    "line",
    [
        {"input": {"messages": MESSAGES}, "parameters": "oops"},
        {"input": {"texts": ["a"]}, "parameters": [1]},
    ],
)
def test_a_native_lines_parameters_must_be_an_object(line: dict[str, Any]) -> None:
    error = parse_err(dumps({"custom_id": "p", **line}), line=3)
    assert error.message == "line 3: a native line's parameters must be a JSON object"


@pytest.mark.parametrize("form", [{"messages": MESSAGES}, {"texts": ["a"]}])
def test_a_native_lines_null_parameters_are_none(form: dict[str, Any]) -> None:
    request = parse_ok({"input": form, "parameters": None})
    assert request.body.get("parameters", {}) == {}


def test_a_native_line_asking_for_a_stream_in_its_parameters_is_refused() -> None:
    line = {"input": {"messages": MESSAGES}, "parameters": {"stream": True}}
    assert "streamed answer" in parse_err(dumps(line)).message
    embedding = {"input": {"texts": ["a"]}, "parameters": {"stream": True}}
    assert "streamed answer" in parse_err(dumps(embedding)).message


# --- malformed lines -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "blank line"),
        (b"   \t  ", "blank line"),
        (b"{not json", "not valid JSON ("),
        (b'{"messages": [1]', "not valid JSON ("),
        (b"[1, 2]", "expected a JSON object, got array"),
        (b"12", "expected a JSON object, got number"),
        (b"1.5", "expected a JSON object, got number"),
        (b'"text"', "expected a JSON object, got string"),
        (b"null", "expected a JSON object, got null"),
        (b"true", "expected a JSON object, got boolean"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "x": '
            + b"[" * 300
            + b"]" * 300
            + b"}",
            "nested too deeply (more than 240 levels)",
        ),
        (b"\xff\xfe", "not UTF-8 text (byte 0)"),
        (b'{"a": "\xc3"}', "not UTF-8 text (byte 7)"),
        (b"{}", "no recognisable request"),
        (b'{"foo": 1}', "no recognisable request"),
        (b'{"messages": []}', "no recognisable request"),
        (b'{"input": ""}', "no recognisable request"),
        (b'{"input": []}', "no recognisable request"),
        (b'{"prompt": 5}', "no recognisable request"),
        (b'{"url": "/v1/chat/completions"}', "no recognisable request"),
    ],
)
def test_malformed_lines(raw: bytes, reason: str) -> None:
    error = parse_err(raw, line=17)
    assert error.line == 17
    assert error.custom_id == "line-17"
    assert error.code == "invalid_line"
    assert error.message.startswith(f"line 17: {reason}")


def test_unrecognised_object_keeps_its_custom_id() -> None:
    error = parse_err(b'{"custom_id": "keep-me", "foo": 1}', line=2)
    assert error.custom_id == "keep-me"
    assert error.message.startswith("line 2: no recognisable request")


# --- output records --------------------------------------------------------------


def test_output_record_success() -> None:
    outcome = Outcome(
        line=3,
        custom_id="req-3",
        response=Response(status_code=200, request_id="rid-9", body={"choices": []}),
        attempts=2,
        latency_s=0.5,
        tokens_in=10,
        tokens_out=4,
    )
    assert outcome.ok is True
    assert output_record(outcome) == {
        "id": "batch_req_3",
        "custom_id": "req-3",
        "line": 3,
        "response": {"status_code": 200, "request_id": "rid-9", "body": {"choices": []}},
        "error": None,
        "attempts": 2,
    }


def test_output_record_failed_http_answer_keeps_response() -> None:
    outcome = Outcome(
        line=1,
        custom_id="c",
        response=Response(status_code=400, request_id=None, body={"error": {"code": "bad"}}),
        error_code="bad",
        error_message="Bad request",
        attempts=1,
    )
    assert outcome.ok is False
    assert output_record(outcome) == {
        "id": "batch_req_1",
        "custom_id": "c",
        "line": 1,
        "response": {"status_code": 400, "request_id": None, "body": {"error": {"code": "bad"}}},
        "error": {"code": "bad", "message": "Bad request", "retryable": False},
        "attempts": 1,
    }


def test_output_record_transport_error_has_null_response() -> None:
    outcome = Outcome(
        line=6,
        custom_id="t",
        error_code="read_timeout",
        error_message="timed out",
        retryable=True,
        attempts=6,
    )
    assert output_record(outcome) == {
        "id": "batch_req_6",
        "custom_id": "t",
        "line": 6,
        "response": None,
        "error": {"code": "read_timeout", "message": "timed out", "retryable": True},
        "attempts": 6,
    }


def test_line_error_outcome_and_output_line() -> None:
    error = parse_err(b"oops", line=5)
    data = output_line(line_error_outcome(error))
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    record = orjson.loads(data)
    assert record["id"] == "batch_req_5"
    assert record["custom_id"] == "line-5"
    assert record["line"] == 5
    assert record["response"] is None
    assert record["error"]["code"] == "invalid_line"
    assert record["error"]["message"].startswith("line 5: not valid JSON (")
    assert record["attempts"] == 0
    assert list(record) == ["id", "custom_id", "line", "response", "error", "attempts"]


def test_output_line_roundtrip_non_ascii() -> None:
    outcome = Outcome(
        line=2,
        custom_id="中文-✓",
        response=Response(status_code=200, request_id="r", body={"text": "línea\nnueva"}),
        attempts=1,
    )
    data = output_line(outcome)
    assert data.endswith(b"}\n")
    assert b"\n" not in data[:-1]
    assert orjson.loads(data) == output_record(outcome)


# --- properties ------------------------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)
# "url" + "body" together would make the line a batch request, a different form.
_extra_keys = _text.filter(lambda key: key not in ("messages", "url"))


@given(
    extra=st.dictionaries(_extra_keys, _json, max_size=6),
    messages=st.lists(_json, min_size=1, max_size=4),
    line=st.integers(min_value=1, max_value=10**9),
)
def test_property_messages_object_is_a_chat_request(
    extra: dict[str, Any], messages: list[Any], line: int
) -> None:
    data = {**extra, "messages": messages}
    result = parse_line(orjson.dumps(data), line, NO_DEFAULTS)
    assert isinstance(result, Request)
    assert result.kind == "chat"
    assert result.line == line
    assert result.body == {k: v for k, v in data.items() if k not in ("custom_id", "id")}
    assert result.custom_id


@given(raw=st.binary(max_size=64), line=st.integers(min_value=1, max_value=10**6))
def test_property_arbitrary_bytes_never_raise(raw: bytes, line: int) -> None:
    result = parse_line(raw, line, Defaults(model="m", params={"temperature": 0}))
    assert isinstance(result, Request | LineError)
    if isinstance(result, LineError):
        assert result.message.startswith(f"line {line}: ")


@given(data=st.dictionaries(_text, _json, max_size=6), line=st.integers(min_value=1))
def test_property_arbitrary_objects_never_raise(data: dict[str, Any], line: int) -> None:
    result = parse_line(orjson.dumps(data), line, Defaults(model="m", params={"seed": 1}))
    assert isinstance(result, Request | LineError)
    assert result.line == line


_bodies = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.integers(1, 10**9),
    st.text(max_size=10),
    st.integers(200, 299),
    st.none() | st.text(max_size=10),
    _bodies,
    st.none() | st.floats(0, 1e6),
)
def test_an_answer_line_is_the_output_line_of_its_outcome(
    line: int, custom_id: str, status: int, request_id: str | None, body: Any, cost: float | None
) -> None:
    """Batch results build their records without an Outcome: byte for byte the same."""
    response = Response(status_code=status, request_id=request_id, body=body)
    outcome = Outcome(line=line, custom_id=custom_id, response=response, attempts=1, cost=cost)
    assert answer_line(line, custom_id, status, request_id, body, cost) == output_line(outcome)
