"""The OpenAI dialect, also spoken by DashScope's compatible mode and by most
self-hosted servers (vLLM, llama.cpp, Ollama ...)."""

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

_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}

# Error codes whose verdict differs from what the status alone implies.
_FATAL_CODES = frozenset({"insufficient_quota", "invalid_api_key", "account_deactivated"})


class OpenAIProvider(Provider):
    name = "openai"
    default_base_url = "https://api.openai.com/v1"
    default_key_env = "OPENAI_API_KEY"

    def url(self, request: Request, base_url: str) -> str:
        """A bare line goes to ``{base_url}/chat/completions`` (``/completions``,
        ``/embeddings``) whatever the base path (``/v1``, ``/v1beta/openai``,
        a gateway's prefix). Only a batch line's url resolves as OpenAI's batch
        API does: ``/v1/x`` against a base URL ending in ``/v1`` gives ``{base}/x``."""
        if request.url is None:
            return join_url(base_url, _PATHS.get(request.kind, _PATHS["chat"]))
        path = request.url
        if base_url.rstrip("/").endswith("/v1") and path.startswith("/v1/"):
            path = path[len("/v1") :]
        return join_url(base_url, path)

    def body(self, request: Request) -> dict[str, Any]:
        if request.kind == "dashscope":
            return _native_to_chat(request.body)
        body = request.body
        if request.kind == "embeddings" and "dimension" in body and "dimensions" not in body:
            # DashScope's native name (a native line carries it): this API reads ``dimensions``.
            body = {("dimensions" if key == "dimension" else key): v for key, v in body.items()}
        return body

    def classify(self, status: int, body: Any) -> Classified:
        error = body.get("error") if isinstance(body, Mapping) else None
        code = message = None
        if isinstance(error, Mapping):
            code = error.get("code") or error.get("type")
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        code_text = str(code) if code else f"http_{status}"
        verdict: Verdict = "fatal" if code_text in _FATAL_CODES else status_verdict(status)
        return Classified(verdict, code_text, str(message or f"HTTP {status}"))

    def usage(self, body: Any) -> tuple[int, int]:
        plain = plain_usage(body, "prompt_tokens", "completion_tokens")
        if plain is not None:
            return plain
        usage = body.get("usage") if isinstance(body, dict | Mapping) else None
        return int_field(usage, "prompt_tokens"), int_field(usage, "completion_tokens")


class CompatibleModeProvider(OpenAIProvider):
    """DashScope's OpenAI-compatible mode, which batch mode speaks for
    ``--provider dashscope``. Its batches take chat and embeddings only, so a
    completion row goes as a chat request (one user message), as DashScope's
    native API gets it online."""

    def body(self, request: Request) -> dict[str, Any]:
        body = super().body(request)
        if request.kind == "completions":
            prompt = body.get("prompt")
            text = prompt if isinstance(prompt, str) else "\n".join(map(str, prompt or []))
            # Every other parameter goes as given, as online: the answer is
            # stored under the request's key, so it must answer that request.
            rest = {key: value for key, value in body.items() if key != "prompt"}
            return {**rest, "messages": [{"role": "user", "content": text}]}
        return body


def _native_to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A DashScope native body sent to an OpenAI-dialect server."""
    parameters = dict(body.get("parameters") or {})
    parameters.pop("result_format", None)
    chat: dict[str, Any] = {**parameters, "messages": body["input"]["messages"]}
    if "model" in body:
        chat["model"] = body["model"]
    return chat
