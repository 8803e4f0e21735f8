"""The mock provider's files and batches API, on a fast clock, with faults.

Routes, under every OpenAI-dialect prefix of ``MockServer`` (``/v1/`` and
``/compatible-mode/v1/``): ``POST files`` (multipart ``purpose``, ``file``),
``GET files`` (``purpose``, ``limit``, ``after``), ``GET files/{id}/content``,
``DELETE files/{id}``, ``POST batches``, ``GET
batches`` (``limit``, ``after``; newest first), ``GET batches/{id}``, ``POST
batches/{id}/cancel``.

A batch is ``validating`` for the first tenth of ``BatchFaults.seconds``,
then ``in_progress`` (its ``request_counts.completed`` grows with time), and
ends ``seconds`` after its creation. Its fate is decided when it is created:

* the first ``token_limit_first`` batches turn ``failed`` with
  ``token_limit_exceeded`` (creation itself succeeds, as providers do);
* a file with a line the provider refuses turns ``failed`` at validation:
  a line that is not a request, a repeated ``custom_id``, another model or
  endpoint, or a prompt with ``mock:invalid`` names its line; a prompt with
  ``mock:invalid_file`` fails the file with no line named;
* the next ``expire_first`` batches expire with the last ``expire_share`` of
  their rows unfinished (in the error file, code ``batch_expired``);
* the others complete. A row's answer is the online answer to the same body
  (``mock:fail=CODE`` rows go to the error file with their response); with
  ``lose_share``, the last share of their rows is in neither file (never
  answered), and a batch with no row answered has no output file.

``lost_creates``: the first creates make their batch but answer HTTP 502,
as a gateway that lost the provider's answer would; ``lost_uploads`` the
same for uploads, which keep their file.

``no_id`` makes answers lack what the call returns, with HTTP 200: ``files``
keeps the uploaded file but answers ``{"object": "file"}`` without its id;
``batches`` creates the batch but answers it without its id; ``error``
creates nothing and answers an ``{"error": ...}`` body.

Every answered row counts in ``MockStats.by_digest`` and ``batch_rows``, so a
test sees a row paid twice, in two batches or in a batch and online.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from batchrun.contentkey import canonical_json
from batchrun.mock.script import Call, openai_error, parse_directives, prompt_parts
from batchrun.mock.script import success_body as _success_body
from batchrun.records import BATCH_URLS, Kind

_JSON: Final = "application/json"


class Counters(Protocol):
    """The server's counters this module adds to (``MockStats``)."""

    by_digest: Any
    batch_rows: int


@dataclass(slots=True)
class BatchFaults:
    """How the mock's batches behave; see the module docstring. Seconds."""

    seconds: float = 1.0
    token_limit_first: int = 0
    expire_first: int = 0
    expire_share: float = 0.5
    no_id: str = ""  # "", "files", "batches" or "error"
    lose_share: float = 0.0  # of a completed batch's rows: missing from its result files
    lost_creates: int = 0  # the first creates make their batch but answer 502, as a gateway may
    lost_uploads: int = 0  # the first uploads keep their file but answer 502, likewise


@dataclass(slots=True)
class _Row:
    custom_id: str
    kind: Kind
    raw: bytes  # the body's canonical JSON (see ``script.digest_of``)


@dataclass(slots=True)
class _Batch:
    info: dict[str, Any]
    rows: list[_Row]
    created: float
    fate: str  # completed, expired, failed (token limit), invalid
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancelled: float | None = None
    settled: bool = False


class MockFiles:
    """The uploaded and result files of one mock server."""

    def __init__(self, ids: Iterator[int], faults: BatchFaults) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.uploads = 0  # files ever uploaded
        self._ids = ids
        self._faults = faults

    def add_routes(self, app: web.Application, prefix: str) -> None:
        app.router.add_post(prefix + "files", self._upload)
        app.router.add_get(prefix + "files", self._list)
        app.router.add_get(prefix + "files/{id}/content", self._content)
        app.router.add_delete(prefix + "files/{id}", self._delete)

    def new_file(self, purpose: str, filename: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{next(self._ids):06d}"
        info = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
        }
        self.files[file_id] = info
        self.contents[file_id] = data
        return info

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or purpose != "batch":
            return _fail(400, "send multipart fields purpose=batch and file")
        with upload.file:  # aiohttp leaves it open: unclosed, it warns when collected
            data = upload.file.read()
        self.uploads += 1
        info = self.new_file("batch", upload.filename, data)
        if self._faults.no_id == "files":
            return _ok({"object": "file", "purpose": "batch"})
        if self.uploads <= self._faults.lost_uploads:
            return _fail(502, "mock fault: the file was kept, its answer lost")
        return _ok(info)

    async def _list(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        ids = [key for key, info in self.files.items() if purpose in (None, info["purpose"])]
        return _ok(_page(sorted(ids, reverse=True), request, self.files.__getitem__))

    async def _content(self, request: web.Request) -> web.Response:
        data = self.contents.get(request.match_info["id"])
        if data is None:
            return _fail(404, "no such file", "not_found")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _delete(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if self.files.pop(file_id, None) is None:
            return _fail(404, "no such file", "not_found")
        del self.contents[file_id]
        return _ok({"id": file_id, "object": "file", "deleted": True})


class MockBatches:
    """The files and batches of one mock server; ``add_routes`` serves them."""

    def __init__(
        self,
        stats: Counters,
        faults: BatchFaults | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.faults = faults or BatchFaults()
        self.stats = stats
        self.batches: dict[str, _Batch] = {}
        self.created = 0  # batches ever created
        self._ids = itertools.count(1)
        self._files = MockFiles(self._ids, self.faults)
        self._clock = clock

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """The files on the mock now, by id."""
        return self._files.files

    @property
    def contents(self) -> dict[str, bytes]:
        return self._files.contents

    @property
    def uploads(self) -> int:
        """Files ever uploaded."""
        return self._files.uploads

    def add_routes(self, app: web.Application, prefix: str) -> None:
        self._files.add_routes(app, prefix)
        app.router.add_post(prefix + "batches", self._create)
        app.router.add_get(prefix + "batches", self._list)
        app.router.add_get(prefix + "batches/{id}", self._get)
        app.router.add_post(prefix + "batches/{id}/cancel", self._cancel)

    # -- batches --------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        try:
            given = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _fail(400, "the body is not JSON")
        file_id = given.get("input_file_id") if isinstance(given, dict) else None
        endpoint = given.get("endpoint") if isinstance(given, dict) else None
        if file_id not in self.contents or endpoint not in BATCH_URLS:
            return _fail(400, "input_file_id must name an uploaded file; endpoint a batch url")
        if self.faults.no_id == "error":
            return _ok(openai_error(500, "mock fault: an error body with HTTP 200"))
        batch_id = f"batch_{next(self._ids):06d}"
        info = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "input_file_id": file_id,
            "completion_window": given.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "metadata": given.get("metadata") or {},
            "errors": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        rows, errors = _read_rows(self.contents[file_id], endpoint)
        self.batches[batch_id] = _Batch(info, rows, self._clock(), self._fate(errors), errors)
        if self.faults.no_id == "batches":
            return _ok({key: value for key, value in info.items() if key != "id"})
        if self.created <= self.faults.lost_creates:
            return _fail(502, "mock fault: the batch was made, its answer lost")
        return _ok(info)

    def _fate(self, errors: list[dict[str, Any]]) -> str:
        self.created += 1
        faults = self.faults
        if self.created <= faults.token_limit_first:
            return "failed"
        if errors:
            return "invalid"
        if self.created <= faults.token_limit_first + faults.expire_first:
            return "expired"
        return "completed"

    async def _get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _fail(404, "no such batch", "not_found")
        return _ok(self._advance(batch))

    async def _list(self, request: web.Request) -> web.Response:
        ids = sorted(self.batches, reverse=True)  # newest first: ids grow
        return _ok(_page(ids, request, lambda key: self._advance(self.batches[key])))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _fail(404, "no such batch", "not_found")
        info = self._advance(batch)
        if info["status"] in ("validating", "in_progress"):
            batch.cancelled = self._clock()
            info["status"] = "cancelling"
        return _ok(info)

    # -- the clock ------------------------------------------------------------

    def _advance(self, batch: _Batch) -> dict[str, Any]:
        """The batch as it is now, settled once its time has come."""
        info, seconds = batch.info, self.faults.seconds
        if batch.settled:
            return info
        now = self._clock()
        elapsed = now - batch.created
        if batch.cancelled is not None:
            if now - batch.cancelled >= seconds / 10:
                share = min(1.0, (batch.cancelled - batch.created) / seconds)
                self._settle(batch, "cancelled", share)
            return info
        if elapsed < seconds / 10:
            return info
        if batch.fate in ("failed", "invalid"):
            self._fail_batch(batch)
        elif elapsed >= seconds:
            lost = self.faults.expire_share if batch.fate == "expired" else self.faults.lose_share
            self._settle(batch, batch.fate, 1 - lost)
        else:
            info["status"] = "in_progress"
            total = len(batch.rows)
            info["request_counts"] = {
                "total": total,
                "completed": int(total * elapsed / seconds),
                "failed": 0,
            }
        return info

    def _fail_batch(self, batch: _Batch) -> None:
        if batch.fate == "failed":
            message = "Enqueued token limit reached for this model. Try again later."
            errors = [{"code": "token_limit_exceeded", "message": message, "line": None}]
        else:
            errors = batch.errors
        batch.info["status"] = "failed"
        batch.info["errors"] = {"object": "list", "data": errors}
        batch.settled = True

    def _settle(self, batch: _Batch, status: str, share: float) -> None:
        """End the batch: its first ``share`` of rows answered, the rest not
        (in the error file, unless it ``completed``: then in no file)."""
        done = math.floor(len(batch.rows) * share + 1e-9)
        output: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for row in batch.rows[:done]:
            line, ok = _answer(row, self.stats)
            (output if ok else failures).append(line)
        code = "batch_expired" if status == "expired" else "batch_cancelled"
        for row in batch.rows[done:] if status != "completed" else []:
            error = {"code": code, "message": f"This request could not be executed: {code}."}
            failures.append(
                {"id": None, "custom_id": row.custom_id, "response": None, "error": error}
            )
        info = batch.info
        info["status"] = status
        info["request_counts"] = {
            "total": len(batch.rows),
            "completed": len(output),
            "failed": len(failures),
        }
        if output:
            info["output_file_id"] = self._result_file(output, "output")["id"]
        if failures:
            info["error_file_id"] = self._result_file(failures, "error")["id"]
        batch.settled = True
        batch.rows = []  # answered: a long benchmark must not keep every request

    def _result_file(self, lines: list[dict[str, Any]], what: str) -> dict[str, Any]:
        data = b"".join(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE) for line in lines)
        return self._files.new_file("batch_output", f"{what}.jsonl", data)


def _answer(row: _Row, stats: Counters) -> tuple[dict[str, Any], bool]:
    """The result line of one row, and whether it succeeded."""
    digest = hashlib.sha256(row.raw).hexdigest()
    stats.by_digest[digest] += 1
    stats.batch_rows += 1
    body = orjson.loads(row.raw)
    call = Call(row.kind, digest, stats.by_digest[digest], body, [])
    call.parts = prompt_parts(row.kind, body)
    rules = parse_directives("\n".join(call.parts))
    status, answer = 200, None
    if rules.fail is not None and (rules.fail_times is None or call.attempt <= rules.fail_times):
        status = rules.fail
        answer = openai_error(status, f"mock fault: HTTP {status}")
    response = {
        "status_code": status,
        "request_id": call.request_id,
        "body": answer if answer is not None else _success_body(call, rules),
    }
    line = {"id": f"batch_req_{digest[:12]}", "custom_id": row.custom_id}
    return {**line, "response": response, "error": None}, status < 400


def _read_rows(data: bytes, endpoint: str) -> tuple[list[_Row], list[dict[str, Any]]]:
    """The file's requests, and the validation errors of its lines."""
    rows: list[_Row] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[bytes | None] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        problem, row = _read_row(raw, endpoint, seen, models)
        if problem == "file":
            message = "The input file is malformed: the provider refused it as a whole."
            return [], [{"code": "invalid_file", "message": message, "line": None}]
        if problem is not None:
            errors.append({"code": "invalid_request", "message": problem, "line": number})
        elif row is not None:
            rows.append(row)
    return rows, errors


def _read_row(
    raw: bytes, endpoint: str, seen: set[str], models: set[bytes | None]
) -> tuple[str | None, _Row | None]:
    try:
        line = orjson.loads(raw)
        custom_id, url, body = line["custom_id"], line["url"], line["body"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "the line is not a batch request", None
    if custom_id in seen:
        return f"custom_id {custom_id!r} is repeated in the file", None
    seen.add(custom_id)
    # As JSON: a line's model may be a list or an object, which no set holds.
    models.add(canonical_json(body.get("model")) if isinstance(body, dict) else None)
    if url != endpoint or not isinstance(body, dict) or len(models) > 1:
        return "every line must have the batch's endpoint and one model", None
    kind = BATCH_URLS[endpoint]
    text = "\n".join(prompt_parts(kind, body))
    if "mock:invalid_file" in text:
        return "file", None
    if "mock:invalid" in text:
        return "mock fault: the provider refuses this line", None
    # Canonical, as ``script.digest_of`` hashes it. orjson's result keeps a
    # spare buffer of about 4 KiB: keep an exact copy.
    canonical = canonical_json(body)
    return None, _Row(custom_id, kind, bytes(memoryview(canonical)))


def _page(
    ids: list[str], request: web.Request, show: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """One page of a list answer: ``limit`` items after the id ``after``."""
    limit = min(int(request.query.get("limit", "20")), 100)
    after = request.query.get("after")
    if after in ids:
        ids = ids[ids.index(after) + 1 :]
    page = [show(key) for key in ids[:limit]]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ids) > limit,
    }


def _ok(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type=_JSON)


def _fail(status: int, message: str, code: str | None = None) -> web.Response:
    body = orjson.dumps(openai_error(status, message, code))
    return web.Response(status=status, body=body, content_type=_JSON)
