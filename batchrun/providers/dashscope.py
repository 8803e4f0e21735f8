"""DashScope's native API (Alibaba Cloud Model Studio, Qwen models)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchrun.providers.base import (
    Classified,
    Provider,
    Verdict,
    int_field,
    join_url,
    plain_usage,
    status_verdict,
)
from batchrun.records import Request

GENERATION_PATH = "/services/aigc/text-generation/generation"
EMBEDDING_PATH = "/services/embeddings/text-embedding/text-embedding"

# DashScope error codes that decide the verdict by themselves.
# The account, not the row: every later request would fail the same way (the
# billing ones with a 400, which would otherwise be each row's own error).
_FATAL_CODES = frozenset(
    {
        "InvalidApiKey",
        "Arrearage",
        "PrepaidBillOverdue",
        "PostpaidBillOverdue",
        "AccessDenied",
        "AccessDenied.Unpurchased",
    }
)
_TRANSIENT_PREFIXES = ("Throttling", "InternalError", "ServiceUnavailable", "RequestTimeOut")


class DashScopeProvider(Provider):
    name = "dashscope"
    default_base_url = "https://dashscope.aliyuncs.com/api/v1"
    default_key_env = "DASHSCOPE_API_KEY"

    def url(self, request: Request, base_url: str) -> str:
        path = EMBEDDING_PATH if request.kind == "embeddings" else GENERATION_PATH
        return join_url(base_url, path)

    def body(self, request: Request) -> dict[str, Any]:
        """Native lines go as they are; other forms are translated."""
        body = request.body
        if request.kind == "dashscope":
            return body
        if request.kind == "embeddings":
            texts = body["input"]
            rest = {k: v for k, v in body.items() if k not in ("model", "input")}
            if "dimensions" in rest and "dimension" not in rest:  # OpenAI's name for it
                rest["dimension"] = rest.pop("dimensions")
            return _native(body, {"texts": texts if isinstance(texts, list) else [texts]}, rest)
        if request.kind == "completions":
            prompt = body["prompt"]
            text = prompt if isinstance(prompt, str) else "\n".join(map(str, prompt))
            messages: list[Any] = [{"role": "user", "content": text}]
            rest = {k: v for k, v in body.items() if k not in ("model", "prompt")}
        else:
            messages = body["messages"]
            rest = {k: v for k, v in body.items() if k not in ("model", "messages")}
        return _native(body, {"messages": messages}, {"result_format": "message", **rest})

    def classify(self, status: int, body: Any) -> Classified:
        code = body.get("code") if isinstance(body, Mapping) else None
        message = body.get("message") if isinstance(body, Mapping) else None
        code_text = str(code) if code else f"http_{status}"
        verdict: Verdict
        if code_text in _FATAL_CODES:
            verdict = "fatal"
        elif code_text.startswith(_TRANSIENT_PREFIXES):
            verdict = "transient"
        else:
            verdict = status_verdict(status)
        return Classified(verdict, code_text, str(message or f"HTTP {status}"))

    def usage(self, body: Any) -> tuple[int, int]:
        plain = plain_usage(body, "input_tokens", "output_tokens")
        if plain is not None:
            return plain
        usage = body.get("usage") if isinstance(body, dict | Mapping) else None
        tokens_in = int_field(usage, "input_tokens", "prompt_tokens")
        tokens_out = int_field(usage, "output_tokens", "completion_tokens")
        if not tokens_in and not tokens_out:  # a native embedding reports total_tokens only
            tokens_in = int_field(usage, "total_tokens")
        return tokens_in, tokens_out


def _native(
    body: Mapping[str, Any], given: dict[str, Any], parameters: dict[str, Any]
) -> dict[str, Any]:
    native: dict[str, Any] = {"input": given, "parameters": parameters}
    if "model" in body:
        native["model"] = body["model"]
    return native
