"""Batch mode's HTTP session (aiohttp), and its failures as batchrun errors.

The files and batches API uploads and downloads whole files, streams and
multipart forms that the rows' lean pool (``batchrun.connections``) does not
carry; aiohttp does, and is imported only by runs that use batch mode.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import anyio

from batchrun.client import socket_error, transport_error
from batchrun.config import Limits, Timeouts
from batchrun.errors import FatalError, RequestError, TransientError
from batchrun.tls import untrusted

__all__ = ["http_error", "open_http"]


@asynccontextmanager
async def open_http(
    limits: Limits, timeouts: Timeouts, tls: ssl.SSLContext | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """One pooled aiohttp session; closed, shielded from cancellation, on
    exit. ``tls`` verifies servers (default: the system's CAs)."""
    connector = aiohttp.TCPConnector(
        ssl=tls if tls is not None else True,
        limit=limits.pool_size,
        limit_per_host=limits.per_host,
        keepalive_timeout=timeouts.idle,
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
    )
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, raise_for_status=False
    ) as session:
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True):
                await session.close()


# aiohttp's failures without an answer, most specific first (the classes
# nest): the code and the message's start.
_TRANSIENT: tuple[tuple[type[aiohttp.ClientError], str, str], ...] = (
    (aiohttp.ConnectionTimeoutError, "connect_timeout", "connecting timed out"),
    (aiohttp.ServerTimeoutError, "read_timeout", "waiting for the response timed out"),
    (aiohttp.ClientPayloadError, "truncated_body", "the response body was cut short"),
    (aiohttp.ServerDisconnectedError, "server_disconnected", "the server closed the connection"),
    (aiohttp.ClientConnectorError, "connect_error", "cannot connect"),
)


def http_error(exc: BaseException) -> RequestError:
    """The batchrun error for an aiohttp or socket failure (no HTTP answer)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return untrusted(exc.host, exc.port, exc.certificate_error)
    if isinstance(exc, aiohttp.ClientSSLError):
        return FatalError("tls_error", f"the TLS handshake failed: {exc}")
    if isinstance(exc, aiohttp.InvalidURL):
        return FatalError("invalid_url", f"invalid URL: {text}")
    for kind, code, what in _TRANSIENT:
        if isinstance(exc, kind):
            return TransientError(code, f"{what}: {text}")
    if isinstance(exc, aiohttp.ClientError):
        return socket_error(exc, text)
    return transport_error(exc)
