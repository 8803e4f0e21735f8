"""The mock provider: the OpenAI dialect against batchrun's embedded mock server.

The run starts the server itself (see ``batchrun.mock.server``) on an ephemeral
loopback port unless a ``--base-url`` points at one already running.
"""

from __future__ import annotations

from batchrun.providers.openai import OpenAIProvider


class MockProvider(OpenAIProvider):
    name = "mock"
    embedded_server = True
    default_key_env = "BATCHRUN_MOCK_KEY"
    fallback_key = "mock-key"
