"""Tests of batchrun.providers: URLs, body translation, error classification, usage."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchrun.providers import Classified, Verdict, get_provider
from batchrun.providers.base import Provider, join_url, status_verdict
from batchrun.providers.dashscope import EMBEDDING_PATH, GENERATION_PATH, DashScopeProvider
from batchrun.providers.mock import MockProvider
from batchrun.providers.openai import OpenAIProvider
from batchrun.records import Defaults, Kind, Request, parse_line

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def request(kind: Kind, body: dict[str, Any], url: str | None = None) -> Request:
    return Request(line=1, custom_id="c", kind=kind, body=body, url=url)


def parsed(line: bytes) -> Request:
    result = parse_line(line, 1, Defaults())
    assert isinstance(result, Request)
    return result


openai = OpenAIProvider()
dashscope = DashScopeProvider()


# --- get_provider and headers ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("openai", OpenAIProvider), ("dashscope", DashScopeProvider), ("mock", MockProvider)],
)
def test_get_provider(name: str, cls: type[Provider]) -> None:
    provider = get_provider(name)
    assert type(provider) is cls
    assert provider.name == name


def test_get_provider_unknown() -> None:
    with pytest.raises(KeyError):
        get_provider("azure")


def test_provider_attributes() -> None:
    assert openai.default_base_url == "https://api.openai.com/v1"
    assert openai.default_key_env == "OPENAI_API_KEY"
    assert dashscope.default_base_url == "https://dashscope.aliyuncs.com/api/v1"
    assert dashscope.default_key_env == "DASHSCOPE_API_KEY"
    mock = MockProvider()
    assert mock.embedded_server
    assert not openai.embedded_server
    assert mock.fallback_key == "mock-key"
    assert mock.default_key_env == "BATCHRUN_MOCK_KEY"


@pytest.mark.parametrize("provider", [openai, dashscope, MockProvider()])
def test_headers_carry_bearer_key(provider: Provider) -> None:
    assert provider.headers("sk-test") == {
        "Content-Type": "application/json",
        "Authorization": "Bearer sk-test",
    }
    assert provider.headers(None) == {"Content-Type": "application/json"}
    assert provider.headers("") == {"Content-Type": "application/json"}


# --- OpenAI URLs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base", "expected"),
    [
        ("/v1/chat/completions", "https://host/x/v1", "https://host/x/v1/chat/completions"),
        ("/v1/chat/completions", "https://host/x/v1/", "https://host/x/v1/chat/completions"),
        (
            "/v1/chat/completions",
            "http://localhost:8000",
            "http://localhost:8000/v1/chat/completions",
        ),
        (
            "/v1/chat/completions",
            "http://localhost:8000/",
            "http://localhost:8000/v1/chat/completions",
        ),
        ("/v1/embeddings", "https://api.openai.com/v1", "https://api.openai.com/v1/embeddings"),
        ("/v1/completions", "http://h:1/v1", "http://h:1/v1/completions"),
        (
            "/v1/chat/completions",
            "https://dashscope.aliyuncs.com/compatible-mode/v1",
            "https://dashscope.aliyuncs.com/compatible-mode/v1/chat/completions",
        ),
    ],
)
def test_openai_batch_url_resolution(url: str, base: str, expected: str) -> None:
    assert openai.url(request("chat", {}, url=url), base) == expected


@pytest.mark.parametrize(
    ("kind", "base", "expected"),
    [
        ("chat", "https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("completions", "https://api.openai.com/v1", "https://api.openai.com/v1/completions"),
        ("embeddings", "https://api.openai.com/v1/", "https://api.openai.com/v1/embeddings"),
        ("chat", "http://localhost:8000", "http://localhost:8000/chat/completions"),
        ("embeddings", "http://localhost:8000", "http://localhost:8000/embeddings"),
        ("dashscope", "https://host/v1", "https://host/v1/chat/completions"),
        # Another base path (Gemini's OpenAI-compatible endpoint, a gateway): kept as given.
        ("chat", "http://h/ok/v1beta/openai", "http://h/ok/v1beta/openai/chat/completions"),
        ("embeddings", "https://gw/llm/", "https://gw/llm/embeddings"),
    ],
)
def test_openai_bare_kind_urls(kind: Kind, base: str, expected: str) -> None:
    assert openai.url(request(kind, {}), base) == expected


def test_openai_url_from_parsed_lines() -> None:
    batch = parsed(b'{"custom_id":"a","url":"/v1/embeddings","body":{"input":"x"}}')
    assert openai.url(batch, "https://h/v1") == "https://h/v1/embeddings"
    bare = parsed(b'{"prompt":"x"}')
    assert openai.url(bare, "https://h/v1") == "https://h/v1/completions"


def test_mock_provider_speaks_openai() -> None:
    mock = MockProvider()
    assert mock.url(request("chat", {}), "http://127.0.0.1:5555/v1") == (
        "http://127.0.0.1:5555/v1/chat/completions"
    )


def test_join_url() -> None:
    assert join_url("http://h/a/", "/b") == "http://h/a/b"
    assert join_url("http://h/a", "b") == "http://h/a/b"
    assert join_url("http://h/a//", "//b") == "http://h/a/b"


# --- OpenAI bodies ---------------------------------------------------------------


def test_openai_body_passes_openai_forms_through() -> None:
    body = {"model": "gpt", "messages": MESSAGES, "temperature": 0}
    assert openai.body(request("chat", body)) == body
    assert openai.body(request("embeddings", {"input": "x"})) == {"input": "x"}


def test_openai_translates_native_line_to_chat() -> None:
    native = parsed(
        b'{"model":"qwen-plus","input":{"messages":[{"role":"user","content":"hi"}]},'
        b'"parameters":{"result_format":"message","temperature":0.3,"max_tokens":20}}'
    )
    assert native.kind == "dashscope"
    assert openai.body(native) == {
        "temperature": 0.3,
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}],
        "model": "qwen-plus",
    }


def test_openai_translates_native_without_model_or_parameters() -> None:
    body = {"input": {"messages": MESSAGES}}
    assert openai.body(request("dashscope", body)) == {"messages": MESSAGES}
    assert openai.body(request("dashscope", {**body, "parameters": None})) == {"messages": MESSAGES}


# --- DashScope URLs and bodies ---------------------------------------------------


def test_dashscope_paths() -> None:
    assert GENERATION_PATH == "/services/aigc/text-generation/generation"
    assert EMBEDDING_PATH == "/services/embeddings/text-embedding/text-embedding"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("chat", "https://dashscope.aliyuncs.com/api/v1/services/aigc/text-generation/generation"),
        (
            "completions",
            "https://dashscope.aliyuncs.com/api/v1/services/aigc/text-generation/generation",
        ),
        (
            "dashscope",
            "https://dashscope.aliyuncs.com/api/v1/services/aigc/text-generation/generation",
        ),
        (
            "embeddings",
            "https://dashscope.aliyuncs.com/api/v1/services/embeddings/text-embedding/text-embedding",
        ),
    ],
)
@pytest.mark.parametrize(
    "base", ["https://dashscope.aliyuncs.com/api/v1", "https://dashscope.aliyuncs.com/api/v1/"]
)
def test_dashscope_url(kind: Kind, base: str, expected: str) -> None:
    assert dashscope.url(request(kind, {}), base) == expected


def test_dashscope_url_ignores_batch_url() -> None:
    batch = request("chat", {}, url="/v1/chat/completions")
    assert dashscope.url(batch, "http://localhost:9/api/v1") == (
        "http://localhost:9/api/v1/services/aigc/text-generation/generation"
    )


def test_dashscope_chat_translation() -> None:
    body = {"model": "qwen-plus", "messages": MESSAGES, "temperature": 0.5, "max_tokens": 10}
    assert dashscope.body(request("chat", body)) == {
        "model": "qwen-plus",
        "input": {"messages": MESSAGES},
        "parameters": {"result_format": "message", "temperature": 0.5, "max_tokens": 10},
    }


def test_dashscope_chat_translation_line_result_format_wins_and_no_model() -> None:
    body = {"messages": MESSAGES, "result_format": "text"}
    assert dashscope.body(request("chat", body)) == {
        "input": {"messages": MESSAGES},
        "parameters": {"result_format": "text"},
    }


def test_a_native_embedding_line_goes_to_dashscope_as_it_was_written() -> None:
    line = {
        "model": "text-embedding-v3",
        "input": {"texts": ["a"]},
        "parameters": {"dimension": 64},
    }
    parsed = parse_line(orjson.dumps(line), 1, Defaults())
    assert isinstance(parsed, Request)
    assert dashscope.body(parsed) == line
    assert dashscope.url(parsed, "https://h/api/v1") == "https://h/api/v1" + EMBEDDING_PATH


def test_an_embeddings_size_goes_by_the_name_each_api_reads() -> None:
    # The native API reads parameters.dimension; the OpenAI-compatible mode
    # (DashScope's batches) reads dimensions, as OpenAI does.
    from batchrun.providers.openai import CompatibleModeProvider

    native = {
        "model": "text-embedding-v4",
        "input": {"texts": ["a"]},
        "parameters": {"dimension": 64},
    }
    parsed = parse_line(orjson.dumps(native), 1, Defaults())
    assert isinstance(parsed, Request)
    compatible = CompatibleModeProvider()
    assert compatible.body(parsed) == {
        "model": "text-embedding-v4",
        "input": ["a"],
        "dimensions": 64,
    }
    bare = request("embeddings", {"model": "text-embedding-v4", "input": "a", "dimensions": 64})
    assert dashscope.body(bare)["parameters"] == {"dimension": 64}
    assert compatible.body(bare) == bare.body
    assert OpenAIProvider().body(parsed) == compatible.body(parsed)  # any OpenAI-dialect server


def test_a_completion_row_goes_to_dashscopes_batches_as_chat() -> None:
    from batchrun.batchmode.plan import batch_line
    from batchrun.providers.openai import CompatibleModeProvider

    row = request("completions", {"model": "q", "prompt": ["a", "b"], "seed": 2})
    body = CompatibleModeProvider().body(row)
    assert body == {"model": "q", "seed": 2, "messages": [{"role": "user", "content": "a\nb"}]}
    assert batch_line(row, body)[0].endpoint == "/v1/chat/completions"
    # Elsewhere a completion row stays one, whatever else its body holds.
    odd = request("completions", {"model": "q", "prompt": "p", "messages": []})
    assert batch_line(odd, OpenAIProvider().body(odd))[0].endpoint == "/v1/completions"


def test_dashscope_native_sent_as_is() -> None:
    body = {
        "model": "qwen-plus",
        "input": {"messages": MESSAGES},
        "parameters": {"result_format": "text", "seed": 3},
    }
    assert dashscope.body(request("dashscope", body)) == {
        "model": "qwen-plus",
        "input": {"messages": MESSAGES},
        "parameters": {"result_format": "text", "seed": 3},
    }


def test_dashscope_completions_prompt_becomes_user_message() -> None:
    body = {"model": "qwen-turbo", "prompt": "Tell me a joke", "temperature": 1}
    assert dashscope.body(request("completions", body)) == {
        "model": "qwen-turbo",
        "input": {"messages": [{"role": "user", "content": "Tell me a joke"}]},
        "parameters": {"result_format": "message", "temperature": 1},
    }


def test_dashscope_completions_prompt_list_joined() -> None:
    native = dashscope.body(request("completions", {"prompt": ["a", "b", 3]}))
    assert native == {
        "input": {"messages": [{"role": "user", "content": "a\nb\n3"}]},
        "parameters": {"result_format": "message"},
    }


@pytest.mark.parametrize(("given", "texts"), [("one", ["one"]), (["a", "b"], ["a", "b"])])
def test_dashscope_embeddings_translation(given: Any, texts: list[str]) -> None:
    body = {"model": "text-embedding-v3", "input": given, "dimension": 512}
    assert dashscope.body(request("embeddings", body)) == {
        "model": "text-embedding-v3",
        "input": {"texts": texts},
        "parameters": {"dimension": 512},
    }


def test_dashscope_translation_of_parsed_batch_line_with_defaults() -> None:
    result = parse_line(
        b'{"custom_id":"q","url":"/v1/chat/completions","body":{"messages":[{"role":"user",'
        b'"content":"x"}]}}',
        1,
        Defaults(model="qwen-plus", params={"top_p": 0.5}),
    )
    assert isinstance(result, Request)
    assert dashscope.body(result) == {
        "model": "qwen-plus",
        "input": {"messages": [{"role": "user", "content": "x"}]},
        "parameters": {"result_format": "message", "top_p": 0.5},
    }


# --- classification --------------------------------------------------------------


def openai_error(code: str | None, etype: str | None = None, message: str = "m") -> Any:
    return {"error": {"message": message, "type": etype, "code": code, "param": None}}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            429,
            openai_error("rate_limit_exceeded", "requests", "Rate limit reached"),
            Classified("transient", "rate_limit_exceeded", "Rate limit reached"),
        ),
        (
            429,
            openai_error("insufficient_quota", "insufficient_quota", "You exceeded your quota"),
            Classified("fatal", "insufficient_quota", "You exceeded your quota"),
        ),
        (
            401,
            openai_error("invalid_api_key", "invalid_request_error", "Incorrect API key"),
            Classified("fatal", "invalid_api_key", "Incorrect API key"),
        ),
        (401, openai_error(None, "auth_error"), Classified("fatal", "auth_error", "m")),
        (
            403,
            openai_error("unsupported_country_region_territory"),
            Classified("fatal", "unsupported_country_region_territory", "m"),
        ),
        (
            400,
            openai_error(None, "invalid_request_error", "bad messages"),
            Classified("row", "invalid_request_error", "bad messages"),
        ),
        (404, openai_error("model_not_found"), Classified("row", "model_not_found", "m")),
        (500, openai_error(None, "server_error"), Classified("transient", "server_error", "m")),
        (503, {"error": "overloaded"}, Classified("transient", "http_503", "overloaded")),
        (408, {}, Classified("transient", "http_408", "HTTP 408")),
        (409, {"detail": "x"}, Classified("transient", "http_409", "HTTP 409")),
        (502, None, Classified("transient", "http_502", "HTTP 502")),
        (429, None, Classified("transient", "http_429", "HTTP 429")),
        (400, None, Classified("row", "http_400", "HTTP 400")),
        (401, None, Classified("fatal", "http_401", "HTTP 401")),
        (403, None, Classified("fatal", "http_403", "HTTP 403")),
        (422, ["not", "a", "dict"], Classified("row", "http_422", "HTTP 422")),
    ],
)
def test_openai_classify(status: int, body: Any, expected: Classified) -> None:
    assert openai.classify(status, body) == expected


def ds_error(code: str, message: str = "msg") -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": "rid"}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, ds_error("Throttling", "Requests throttling triggered."), "transient"),
        (429, ds_error("Throttling.RateQuota"), "transient"),
        (429, ds_error("Throttling.AllocationQuota"), "transient"),
        (400, ds_error("Throttling.RateQuota"), "transient"),
        (500, ds_error("InternalError"), "transient"),
        (500, ds_error("InternalError.Algo"), "transient"),
        (503, ds_error("ServiceUnavailable"), "transient"),
        (400, ds_error("InvalidParameter"), "row"),
        (400, ds_error("DataInspectionFailed"), "row"),
        (404, ds_error("ModelNotFound"), "row"),
        (401, ds_error("InvalidApiKey"), "fatal"),
        (400, ds_error("InvalidApiKey"), "fatal"),
        (400, ds_error("Arrearage"), "fatal"),
        (400, ds_error("PrepaidBillOverdue"), "fatal"),
        (400, ds_error("PostpaidBillOverdue"), "fatal"),
        (403, ds_error("AccessDenied"), "fatal"),
        (400, ds_error("AccessDenied"), "fatal"),
        (403, ds_error("AccessDenied.Unpurchased"), "fatal"),
    ],
)
def test_dashscope_classify_codes(status: int, body: dict[str, Any], expected: Verdict) -> None:
    assert dashscope.classify(status, body) == Classified(expected, body["code"], body["message"])


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, None, Classified("transient", "http_500", "HTTP 500")),
        (429, None, Classified("transient", "http_429", "HTTP 429")),
        (401, None, Classified("fatal", "http_401", "HTTP 401")),
        (400, None, Classified("row", "http_400", "HTTP 400")),
        (400, {"code": "", "message": ""}, Classified("row", "http_400", "HTTP 400")),
        (502, "<html>bad gateway</html>", Classified("transient", "http_502", "HTTP 502")),
    ],
)
def test_dashscope_classify_without_code(status: int, body: Any, expected: Classified) -> None:
    assert dashscope.classify(status, body) == expected


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (400, "row"),
        (401, "fatal"),
        (403, "fatal"),
        (404, "row"),
        (408, "transient"),
        (409, "transient"),
        (413, "row"),
        (422, "row"),
        (425, "transient"),
        (429, "transient"),
        (500, "transient"),
        (503, "transient"),
        (504, "transient"),
        (599, "transient"),
    ],
)
def test_status_verdict(status: int, verdict: str) -> None:
    assert status_verdict(status) == verdict


# --- usage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}, (12, 5)),
        ({"usage": {"prompt_tokens": 8, "total_tokens": 8}}, (8, 0)),
        ({"usage": {"prompt_tokens": True, "completion_tokens": "5"}}, (0, 0)),
        ({"usage": {"prompt_tokens": 3, "completion_tokens": False}}, (3, 0)),
        ({"usage": None}, (0, 0)),
        # A broken server's counts are no counts: a negative one made --max-cost's
        # spend go down (the cap then never held), a huge one put --tpm in debt
        # for centuries (the run waited forever, no row bound applying).
        ({"usage": {"prompt_tokens": -(10**12), "completion_tokens": 5}}, (0, 5)),
        ({"usage": {"prompt_tokens": 2**63 - 1, "completion_tokens": 2**63 - 1}}, (0, 0)),
        ({}, (0, 0)),
        (None, (0, 0)),
        ([1, 2], (0, 0)),
    ],
)
def test_openai_usage(body: Any, expected: tuple[int, int]) -> None:
    assert openai.usage(body) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}}, (7, 3)),
        ({"usage": {"prompt_tokens": 4, "completion_tokens": 2}}, (4, 2)),
        ({"usage": {"input_tokens": 9, "prompt_tokens": 1}}, (9, 0)),
        ({"usage": {"input_tokens": True, "prompt_tokens": 1, "output_tokens": 2}}, (1, 2)),
        ({"usage": {"total_tokens": 6}}, (6, 0)),  # a native embedding: all input
        ({"output": {"text": "x"}}, (0, 0)),
        (None, (0, 0)),
    ],
)
def test_dashscope_usage(body: Any, expected: tuple[int, int]) -> None:
    assert dashscope.usage(body) == expected
