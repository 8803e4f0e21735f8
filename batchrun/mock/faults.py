"""How the mock provider answers: errors in each dialect, and the faults a row
scripts (the ``mock:`` tokens listed in ``batchrun.mock.server``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Final

import orjson
from aiohttp import web

from batchrun.mock.script import Call, Directives, openai_error, success_body
from batchrun.records import Kind

JSON_TYPE: Final = "application/json"
_BAD_JSON: Final = b'{"choices": ['
_ODD_BODIES: Final[tuple[Any, ...]] = (None, [], "fine, thanks")
# What a gateway passing an upstream failure on answers with a 200.
_ERROR_BODY: Final = {"error": {"message": "model overloaded", "code": "overloaded"}}
# SO_LINGER on with a zero timeout makes close() send an RST instead of a FIN.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# How long a hang102 answer stays silent: longer than any test's timeout.
_SILENCE: Final = 3600.0
_HUGE_PIECE: Final = 1 << 16
_DASHSCOPE_CODES: Final = {401: "InvalidApiKey", 403: "AccessDenied", 429: "Throttling.RateQuota"}


def _json(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=JSON_TYPE, headers=headers
    )


def error_answer(
    kind: Kind, headers: dict[str, str], status: int, message: str, code: str | None = None
) -> web.Response:
    """An error answer in the dialect of ``kind``; ``code`` overrides the default."""
    if kind == "dashscope":
        default = "InternalError" if status >= 500 else "InvalidParameter"
        code = code or _DASHSCOPE_CODES.get(status, default)
        body = {"code": code, "message": message, "request_id": headers["x-request-id"]}
        return _json(status, body, headers)
    return _json(status, openai_error(status, message, code), headers)


def auth_error(kind: Kind, headers: dict[str, str], key: str) -> web.Response:
    # Real providers echo (part of) a rejected key; the full echo tests redaction.
    if kind == "dashscope":
        message = f"Invalid API-key provided: {key}" if key else "No API-key provided."
        return error_answer(kind, headers, 401, message, "InvalidApiKey")
    message = (
        f"Incorrect API key provided: {key}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
        if key
        else "You didn't provide an API key: send 'Authorization: Bearer KEY'."
    )
    return error_answer(kind, headers, 401, message, "invalid_api_key")


def _fault(call: Call, rules: Directives, overloaded: bool) -> web.Response | None:
    """The error answer a row's directives or the fail rate force, if any."""
    headers = {"x-request-id": call.request_id}
    if rules.retry_after:
        headers["Retry-After"] = rules.retry_after
    if rules.quota and call.kind == "dashscope":
        return error_answer(
            call.kind, headers, 400, "Access denied: account in arrears.", "Arrearage"
        )
    if rules.quota:
        message = "You exceeded your current quota, please check your plan and billing details."
        return error_answer(call.kind, headers, 429, message, "insufficient_quota")
    if rules.fail is not None and (rules.fail_times is None or call.attempt <= rules.fail_times):
        return error_answer(call.kind, headers, rules.fail, f"mock fault: HTTP {rules.fail}")
    if overloaded:
        return error_answer(
            call.kind, headers, 503, "The server is overloaded, please retry later."
        )
    return None


def reset_connection(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()
    # Never sent: aiohttp finds the transport closing and drops the answer quietly.
    return web.Response(status=204)


async def _truncated(request: web.Request, call: Call) -> web.StreamResponse:
    full = orjson.dumps(success_body(call))
    response = web.StreamResponse(headers={"x-request-id": call.request_id})
    response.content_type = JSON_TYPE
    response.content_length = len(full)
    response.force_close()
    await response.prepare(request)
    await response.write(full[: len(full) // 2])
    # close(), not abort(): the partial body must reach the client before the FIN.
    if request.transport is not None:
        request.transport.close()
    return response


async def _hang_after_102(request: web.Request) -> web.StreamResponse:
    """An informational answer, then silence until the client gives up."""
    if request.transport is not None:
        request.transport.write(b"HTTP/1.1 102 Processing\r\n\r\n")
    await asyncio.sleep(_SILENCE)
    return reset_connection(request)


async def _streamed(
    request: web.Request, call: Call, body: bytes, *, pace: float, piece: int, length: bool
) -> web.StreamResponse:
    """A 200 sent ``piece`` bytes at a time, ``pace`` seconds apart."""
    response = web.StreamResponse(headers={"x-request-id": call.request_id})
    response.content_type = JSON_TYPE
    if length:
        response.content_length = len(body)
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(body), piece):
        if pace:
            await asyncio.sleep(pace)
        await response.write(body[start : start + piece])
    await response.write_eof()
    return response


def _padded(call: Call, size: int) -> bytes:
    """The success body grown to ``size`` bytes with a padding field."""
    answer = success_body(call)
    bare = len(orjson.dumps({**answer, "padding": ""}))
    return orjson.dumps({**answer, "padding": "x" * max(0, size - bare)})


async def _slow_or_big(
    request: web.Request, call: Call, rules: Directives
) -> web.StreamResponse | None:
    """A trickled or huge success answer, when the row asks for one."""
    if rules.trickle and (rules.trickle_times is None or call.attempt <= rules.trickle_times):
        body = orjson.dumps(success_body(call, rules))
        return await _streamed(request, call, body, pace=rules.trickle, piece=1, length=True)
    if rules.huge:
        body = _padded(call, rules.huge)
        length = not rules.chunked
        return await _streamed(request, call, body, pace=0, piece=_HUGE_PIECE, length=length)
    return None


async def scripted_answer(
    request: web.Request, call: Call, rules: Directives, overloaded: bool
) -> web.StreamResponse:
    """Answer an authorised request whose body is a JSON object."""
    if call.attempt <= rules.reset:
        return reset_connection(request)
    if call.attempt <= rules.hang102:
        return await _hang_after_102(request)
    fault = _fault(call, rules, overloaded)
    if fault is not None:
        return fault
    if call.attempt <= rules.truncate:
        return await _truncated(request, call)
    headers = {"x-request-id": call.request_id}
    if rules.redirect is not None:
        headers["Location"] = "/moved" + request.path
        return web.Response(status=rules.redirect, headers=headers)
    if call.attempt <= rules.badjson:
        return web.Response(body=_BAD_JSON, content_type=JSON_TYPE, headers=headers)
    if call.attempt <= rules.oddbody:
        return _json(200, _ODD_BODIES[(call.attempt - 1) % len(_ODD_BODIES)], headers)
    if call.attempt <= rules.errbody:
        return _json(200, _ERROR_BODY, headers)
    special = await _slow_or_big(request, call, rules)
    if special is not None:
        return special
    return _json(200, success_body(call, rules), headers)
