"""Provider dialects, one module each; ``get_provider`` picks one by name."""

from __future__ import annotations

from batchrun.providers.base import Classified, Provider, Verdict
from batchrun.providers.dashscope import DashScopeProvider
from batchrun.providers.mock import MockProvider
from batchrun.providers.openai import OpenAIProvider

__all__ = ["Classified", "Provider", "Verdict", "get_provider"]

_PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "dashscope": DashScopeProvider,
    "mock": MockProvider,
}


def get_provider(name: str) -> Provider:
    """The provider dialect called ``name`` (config validation checked the name)."""
    return _PROVIDERS[name]()
