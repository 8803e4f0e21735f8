"""The provider's files and batches API over the run's pooled session.

Every call goes through ``_call``: the one place where transport failures and
HTTP answers become batchrun errors (``http.http_error`` and the
provider's own ``classify``), and where calls are bounded: each within
``--request-timeout`` (an upload by its progress instead, see
``upload.watched``), each answer read up to ``_MAX_ANSWER`` bytes.
Idempotent calls are retried while the error is transient; ``create`` is
not (a batch has no idempotency key): its caller looks the batch up by
metadata before trying again.

Every field read from an answer goes through ``checked``: a 2xx answer
without an id (or with an ``error`` body instead of the object asked for) is
a ``FatalError`` naming the call and quoting the answer, never a ``KeyError``.
A batch or file this module hands out has its ``id`` (and a batch its
``status``) as strings.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

import aiohttp
import anyio
import orjson

from batchrun import crashpoint
from batchrun.batchmode.http import http_error
from batchrun.batchmode.upload import watched
from batchrun.config import RetryPolicy, Timeouts
from batchrun.errors import (
    NEVER_SENT,
    FatalError,
    RequestError,
    RowError,
    TransientError,
    disk_writes,
)
from batchrun.providers import Provider
from batchrun.providers.base import join_url
from batchrun.rateheaders import pause_hint
from batchrun.retry import retrying
from batchrun.timing import Sleep

# Batches listed per page, and pages read at most when looking one up.
LIST_PAGE = 100
LIST_PAGES = 50
# Bytes read at a time from a result file.
_CHUNK = 1 << 16
# Bytes a JSON answer (a batch, a page of the list) may have.
_MAX_ANSWER = 64 << 20
# Characters of a malformed answer quoted in its error.
_QUOTED = 300
# The code of an answer that lacks what the call must return.
INVALID_ANSWER = "invalid_answer"

T = TypeVar("T")


def checked(
    answer: Mapping[str, Any], name: str, what: str, kind: type[T], default: T | None = None
) -> T:
    """``answer[name]`` if it is a ``kind`` (a string: not empty); ``default``
    when it is absent or null and a default is given. Otherwise a
    ``FatalError`` naming the call ``what`` and quoting the answer: a 2xx
    without what the call returns says nothing about what the provider did,
    so guessing could pay twice (the run resumes and looks it up instead)."""
    value = answer.get(name)
    if value is None and default is not None:
        return default
    if isinstance(value, kind) and value != "":
        return value
    raise FatalError(
        INVALID_ANSWER,
        f"{what} answered without a valid {name!r}: {_quote(answer)}",
        status=200,
        body=dict(answer),
    )


def _quote(answer: Mapping[str, Any]) -> str:
    text = orjson.dumps(answer, default=str).decode()
    return text if len(text) <= _QUOTED else text[:_QUOTED] + "..."


def _batch(answer: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A batch object, its id, status and result file ids checked; a result
    file id ``""`` is no file (None), as gateways that write every field
    (Go's zero value) say so: refusing it would stop every run, and
    ``batchrun cancel``, for as long as the batch is listed."""
    checked(answer, "id", what, str)
    checked(answer, "status", what, str)
    batch = dict(answer)
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name) == "":
            batch[name] = None
        elif batch.get(name) is not None:
            checked(answer, name, what, str)
    return batch


def metadata_of(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A listed batch's metadata; ``{}`` when it has none, or something
    other than an object: the list holds every batch of the account, and
    another program's odd batch must neither stop the run nor match."""
    given = batch.get("metadata")
    return given if isinstance(given, dict) else {}


def made_with(batch: Mapping[str, Any], metadata: dict[str, str], file_id: str | None) -> bool:
    """Whether a listed batch is the one created with ``metadata`` on the
    file ``file_id``: its metadata holds every pair or, where the list shows
    none (some gateways drop it), it runs on that file, which was uploaded
    for one part alone. Reading "none" as "not there" would create the
    batch again, paid twice; a ``failed`` batch ran nothing, and may be an
    earlier try's (refused for the enqueued-token limit) on the same file."""
    given = metadata_of(batch)
    if given:
        return all(given.get(key) == value for key, value in metadata.items())
    same_file = file_id is not None and batch.get("input_file_id") == file_id
    return same_file and batch.get("status") != "failed"


def batch_base_url(provider: str, base_url: str) -> str:
    """The OpenAI-compatible base URL that serves batches for ``base_url``:
    DashScope's native ``.../api/v1`` becomes ``.../compatible-mode/v1``."""
    trimmed = base_url.rstrip("/")
    if provider == "dashscope" and trimmed.endswith("/api/v1"):
        return trimmed[: -len("/api/v1")] + "/compatible-mode/v1"
    return trimmed


@dataclass(slots=True)
class Doubt:
    """Whether an upload may have stored its file on the provider: a try
    whose answer was lost (a 5xx, a timeout) may have, a refusal or a
    connection never made did not."""

    stored: bool = False


def _nothing_stored(exc: RequestError) -> bool:
    """Whether a failed upload surely stored nothing: no connection, or a
    refusal (a 4xx other than a timeout), which the provider did not act on."""
    if exc.code in NEVER_SENT:
        return True
    return exc.status is not None and 400 <= exc.status < 500 and exc.status != 408


class BatchApi:
    """Files and batches at ``base_url`` (an OpenAI-compatible ``.../v1``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        provider: Provider,
        base_url: str,
        *,
        api_key: str | None,
        retry: RetryPolicy,
        timeouts: Timeouts,
        sleep: Sleep,
    ) -> None:
        self._session = session
        self._timeouts = timeouts
        self._provider = provider
        self.base_url = base_url
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._retry = retry
        self._sleep = sleep

    async def upload(self, path: Path, name: str, doubt: Doubt | None = None) -> str:
        """Upload a batch input file under the file name ``name``; its
        provider file id. An upload the provider stops taking fails (see
        ``upload.watched``). While the file may be stored already (``doubt``:
        an earlier try's answer was lost), it is looked for by its name
        first: a second copy would be left there. ``doubt`` tells the caller
        afterwards whether a failed upload may have stored it."""
        doubt = doubt or Doubt()

        async def send(handle: BinaryIO) -> Any:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", handle, filename=name)
            return await self._call("POST", "files", whole=False, data=form)

        async def once() -> Any:
            if doubt.stored:
                # A lookup that fails leaves the doubt: the file may be there.
                found = await self.file_named(name)
                if found is not None:
                    return found
                doubt.stored = False
            try:
                return await watched(path, self._timeouts, send)
            except RequestError as exc:
                doubt.stored = not _nothing_stored(exc)
                raise

        answer: dict[str, Any] = await retrying(self._retry, sleep=self._sleep)(once)
        # A 2xx: the file is stored, even if the answer names no valid id.
        doubt.stored = True
        return checked(answer, "id", "POST files", str)

    async def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        """Create a batch (one attempt: not idempotent)."""
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }
        return _batch(await self._call("POST", "batches", json=body), "POST batches")

    async def get(self, batch_id: str) -> dict[str, Any]:
        what = f"GET batches/{batch_id}"
        return _batch(await self._retried("GET", f"batches/{batch_id}"), what)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        what = f"POST batches/{batch_id}/cancel"
        return _batch(await self._retried("POST", f"batches/{batch_id}/cancel"), what)

    async def download(self, file_id: str, path: Path) -> None:
        """A result file's content into ``path``, streamed (each try starts it afresh)."""

        async def once() -> None:
            url = join_url(self.base_url, f"files/{file_id}/content")
            try:
                async with self._session.get(url, headers=self._auth) as answer:
                    if answer.status != 200:
                        self._raise(answer.status, answer.headers, await _body(answer), url)
                    # A full disk is no network failure: DiskError is no OSError.
                    with disk_writes(path), path.open("wb") as handle:
                        async for chunk in answer.content.iter_chunked(_CHUNK):
                            fault = crashpoint.disk_fault("download")
                            if fault is not None:
                                raise fault
                            handle.write(chunk)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise http_error(exc) from exc

        await retrying(self._retry, sleep=self._sleep)(once)

    async def delete(self, file_id: str) -> None:
        """Delete a file; one already gone is fine."""
        try:
            await self._retried("DELETE", f"files/{file_id}")
        except RowError as exc:
            if exc.status != 404:
                raise

    async def batches(self) -> AsyncIterator[dict[str, Any]]:
        """Every batch, newest first, at most ``LIST_PAGES`` pages."""
        async for batch in self._pages("batches", {}):
            yield _batch(batch, "GET batches")

    async def files(self) -> AsyncIterator[dict[str, Any]]:
        """Every batch input file, at most ``LIST_PAGES`` pages."""
        async for file in self._pages("files", {"purpose": "batch"}):
            yield file

    async def _pages(self, path: str, query: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        after: str | None = None
        used: set[str] = set()
        for _ in range(LIST_PAGES):
            params = {**query, "limit": str(LIST_PAGE), **({"after": after} if after else {})}
            page = await self._retried("GET", path, params=params)
            data = _items(page, f"GET {path}")
            for item in data:
                yield item
            if not checked(page, "has_more", f"GET {path}", bool, False) or not data:
                return
            if after is not None:
                used.add(after)
            after = data[-1]["id"]
            if after in used:
                _no_progress(path, after)

    async def file_named(self, name: str) -> dict[str, Any] | None:
        """A batch input file uploaded under the name ``name``."""
        async for file in self.files():
            if file.get("filename") == name:
                return file
        return None

    async def find(
        self, metadata: dict[str, str], file_id: str | None = None
    ) -> dict[str, Any] | None:
        """The newest batch created with ``metadata`` on the file ``file_id``
        (see ``made_with``)."""
        async for batch in self.batches():
            if made_with(batch, metadata, file_id):
                return batch
        return None

    async def _retried(self, method: str, path: str, **kwargs: Any) -> Any:
        async def once() -> Any:
            return await self._call(method, path, **kwargs)

        return await retrying(self._retry, sleep=self._sleep)(once)

    async def _call(self, method: str, path: str, *, whole: bool = True, **kwargs: Any) -> Any:
        """One HTTP call; its parsed JSON object or a classified error. With
        ``whole``, the call must end within ``--request-timeout`` (an upload,
        bounded by its progress instead, passes False); its answer may hold
        at most ``_MAX_ANSWER`` bytes."""
        url = join_url(self.base_url, path)
        within = self._timeouts.request if whole else math.inf
        try:
            with anyio.move_on_after(within) as bound:
                async with self._session.request(method, url, headers=self._auth, **kwargs) as got:
                    data, status, headers = await _body(got), got.status, got.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise http_error(exc) from exc
        if bound.cancelled_caught:
            raise TransientError(
                "request_timeout", f"{method} {path}: no whole answer within {within:g} s"
            )
        if not 200 <= status < 300:
            self._raise(status, headers, data, f"{method} {path}")
        return _parse(data, status)

    def _raise(self, status: int, headers: Any, data: bytes, what: str) -> NoReturn:
        """The classified error of a non-2xx answer (the one place statuses are mapped)."""
        body = _try_parse(data)
        verdict = self._provider.classify(status, body)
        error_type = {"transient": TransientError, "row": RowError, "fatal": FatalError}
        raise error_type[verdict.verdict](
            verdict.code,
            f"{what}: {verdict.message}",
            status=status,
            body=body,
            retry_after=pause_hint(headers, status=status),
        )


def _no_progress(path: str, after: str) -> NoReturn:
    """A list whose next page starts where an earlier one did: the rest of
    the list cannot be read, and a lookup that stopped there could miss a
    batch or file that exists, and make it again (paid twice)."""
    raise FatalError(
        INVALID_ANSWER,
        f"GET {path} pages do not advance (more after {after!r} again): the list"
        " cannot be read to its end",
        status=200,
    )


def _items(page: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    """A list answer's items, each an object with an id: a page without its
    ``data`` must not read as "nothing there" (that would create again)."""
    data = checked(page, "data", what, list)
    for item in data:
        if not isinstance(item, dict):
            raise FatalError(INVALID_ANSWER, f"{what} listed {_quote({'item': item})}", status=200)
        checked(item, "id", what, str)
    return data


def _try_parse(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


async def _body(answer: aiohttp.ClientResponse) -> bytes:
    """``answer``'s body, read only up to ``_MAX_ANSWER`` bytes: a longer one
    is ``answer_too_large`` (a JSON answer that size is no batch or page)."""
    data = bytearray()
    async for chunk in answer.content.iter_chunked(_CHUNK):
        data += chunk
        if len(data) > _MAX_ANSWER:
            raise TransientError(
                "answer_too_large", f"HTTP {answer.status} with over {_MAX_ANSWER:,} bytes"
            )
    return bytes(data)


def _parse(data: bytes, status: int) -> Any:
    parsed = _try_parse(data)
    if not isinstance(parsed, dict):
        raise TransientError("invalid_json", f"HTTP {status} with a body that is not a JSON object")
    return parsed
