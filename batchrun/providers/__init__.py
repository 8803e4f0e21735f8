"""Provider dialects, one module each; ``get_provider`` picks one by name."""

from __future__ import annotations

from batchrun.providers.base import Classified, Provider, Verdict
from batchrun.providers.dashscope import DashScopeProvider
from batchrun.providers.mock import MockProvider
from batchrun.providers.openai import OpenAIProvider

__all__ = ["Classified", "Provider", "Verdict", "get_provider"]

# Keyed by each dialect's own name; settings.ProviderName lists the names a
# setting accepts, and tests/test_settings.py checks the two agree.
_PROVIDERS: dict[str, type[Provider]] = {
    provider.name: provider for provider in (OpenAIProvider, DashScopeProvider, MockProvider)
}


def get_provider(name: str) -> Provider:
    """The provider dialect called ``name`` (config validation checked the name)."""
    return _PROVIDERS[name]()
