"""The content key of a request: what makes two rows "the same request".

A row's key is the SHA-256 of the canonical JSON (sorted keys, no whitespace,
UTF-8) of ``[dialect, endpoint, body]``:

* ``dialect``: the provider dialect's name (``openai``, ``dashscope``, ``mock``);
* ``endpoint``: the path the request goes to, without the host (so replicas
  and base URLs share answers);
* ``body``: the JSON body actually sent, after the job's defaults (model,
  ``[params]``) and any translation into the dialect.

The key never depends on the row's line number or ``custom_id``: moving,
renaming or duplicating a row keeps its key; changing one byte of what is
sent changes it. Pure: no I/O. Online runs and batch mode use the same key,
so an answer paid in one is found by the other (see ``batchrun.store``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from batchrun.providers import Provider
from batchrun.records import Request

__all__ = ["KEY_BYTES", "canonical_json", "content_key", "json_key", "request_key"]

KEY_BYTES = 32  # a key is a SHA-256 digest; ``.hex()`` gives 64 characters


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON: sorted keys, no whitespace, UTF-8.

    Raises ``TypeError`` for values JSON cannot hold (a parsed input line
    never has any).
    """
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def content_key(dialect: str, endpoint: str, body: Mapping[str, Any]) -> bytes:
    """The 32-byte key of sending ``body`` to ``endpoint`` in ``dialect``."""
    return hashlib.sha256(canonical_json([dialect, endpoint, body])).digest()


def json_key(dialect: str, endpoint: str, body_json: bytes) -> bytes:
    """``content_key(dialect, endpoint, body)`` from ``canonical_json(body)``,
    for callers that serialise the body anyway."""
    return hashlib.sha256(_key_head(dialect, endpoint) + body_json + b"]").digest()


@functools.lru_cache(maxsize=256)
def _key_head(dialect: str, endpoint: str) -> bytes:
    # A list's canonical JSON is its items' with commas, no spaces: the key's
    # text is this head, then the body's canonical JSON, then "]".
    return orjson.dumps([dialect, endpoint])[:-1] + b","


def request_key(provider: Provider, request: Request) -> bytes:
    """The key of ``request`` as ``provider`` would send it."""
    return content_key(provider.name, provider.url(request, ""), provider.body(request))
