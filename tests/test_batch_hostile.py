"""--mode batch behind a gateway that bends the files and batches API: a
loopback proxy in front of the mock rewrites its answers as real gateways
and providers do (empty strings for absent ids, odd metadata on other
programs' batches, lists whose pages never end, result lines that are no
answer, deletions that fail)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from batchrun.mock.batches import BatchFaults
from batchrun.mock.server import MockServer
from batchrun.runner import run_async
from tests.conftest import chat, make_config, read_jsonl

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

FAST = {"mode": "batch", "poll_interval": 0.05, "max_attempts": 2, "backoff_initial": 0.01}
# What a test may answer instead of the mock: the call ("GET batches"), its
# count so far, then the mock's parsed answer (None before it is asked).
Early = Callable[[str, int], web.Response | None]
Rewrite = Callable[[str, Any], Any]


@dataclass
class Gateway:
    """How the proxy bends answers; ``calls`` counts each call."""

    early: Early = lambda call, count: None
    rewrite: Rewrite = lambda call, answer: answer
    content: Callable[[bytes], bytes] = lambda data: data
    calls: Counter[str] = field(default_factory=Counter)


def call_of(method: str, path: str) -> str:
    """``GET batch`` for ``/v1/batches/ID``, ``GET batches`` for the list, and so on."""
    parts = path.split("/")[2:]
    if parts[0] == "files" and len(parts) == 3:
        return "GET content"
    single = {"files": "file", "batches": "batch"}[parts[0]]
    return f"{method} {parts[0] if len(parts) == 1 else single}"


@asynccontextmanager
async def bent(
    bend: Gateway, faults: BatchFaults | None = None
) -> AsyncIterator[tuple[MockServer, str]]:
    """A mock (batches ending in 0.2 s by default) behind a proxy to its
    ``/v1`` bent by ``bend``: the mock and the proxy's base URL."""
    mock = MockServer(batch_faults=faults or BatchFaults(seconds=0.2))
    async with mock, aiohttp.ClientSession() as session:

        async def forward(request: web.Request) -> web.StreamResponse:
            call = call_of(request.method, request.path)
            bend.calls[call] += 1
            early = bend.early(call, bend.calls[call])
            if early is not None:
                return early
            url = f"{mock.origin}{request.path_qs}"
            headers = {"Authorization": request.headers.get("Authorization", "")}
            if "Content-Type" in request.headers:
                headers["Content-Type"] = request.headers["Content-Type"]
            data = await request.read()
            async with session.request(request.method, url, headers=headers, data=data) as got:
                status, body = got.status, await got.read()
            if call == "GET content" and status == 200:
                return web.Response(body=bend.content(body))
            answer = bend.rewrite(call, orjson.loads(body))
            return web.json_response(
                answer, status=status, dumps=lambda v: orjson.dumps(v).decode()
            )

        app = web.Application(client_max_size=1 << 26)
        app.router.add_route("*", "/v1/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield mock, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        finally:
            await runner.cleanup()


def rows(count: int) -> list[dict[str, Any]]:
    return [chat(f"row {i}", model="m") for i in range(count)]


def fail(status: int) -> web.Response:
    return web.json_response(
        {"error": {"message": "gateway fault", "type": "server_error"}}, status=status
    )


def items(answer: Any) -> list[dict[str, Any]]:
    """The batches of a batch answer or a list answer."""
    return answer["data"] if answer.get("object") == "list" else [answer]


async def test_empty_result_file_ids_are_no_files(tmp_path: Path) -> None:
    # A gateway writing every field gives "" for a file not made yet: the
    # batch runs (and is paid) all the same, and its answers are collected.
    def empty(call: str, answer: Any) -> Any:
        for batch in items(answer) if "batch" in call else []:
            for name in ("output_file_id", "error_file_id"):
                batch[name] = batch[name] or ""
        return answer

    async with bent(Gateway(rewrite=empty)) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0, summary.aborted
    assert [row["line"] for row in read_jsonl(config.out)] == [1, 2, 3]
    assert mock.batches.created == 1


def foreign(metadata: Any, number: int = 0) -> dict[str, Any]:
    """Another program's batch, as the list shows it."""
    return {
        "id": f"batch_other{number}",
        "object": "batch",
        "status": "completed",
        "metadata": metadata,
    }


def with_foreign_first(call: str, answer: Any) -> Any:
    if call == "GET batches":
        answer["data"] = [foreign("not an object"), *answer["data"]]
    return answer


def losing_first_create(bend: Gateway, also: Rewrite) -> Rewrite:
    """A rewrite that loses the first create's answer (the batch is made)."""

    def rewrite(call: str, answer: Any) -> Any:
        if call == "POST batches" and bend.calls[call] == 1:
            raise web.HTTPBadGateway()
        return also(call, answer)

    return rewrite


async def test_a_lost_create_is_found_past_a_batch_with_odd_metadata(tmp_path: Path) -> None:
    # The create reaches the provider, its answer is lost: the lookup by
    # metadata must pass over another program's batch whose metadata is no
    # object, find this run's batch and not create a second one.
    bend = Gateway()
    bend.rewrite = losing_first_create(bend, with_foreign_first)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0, summary.aborted
    assert mock.batches.created == 1
    assert bend.calls["GET batches"] >= 1


def without_metadata(call: str, answer: Any) -> Any:
    """The batches list as gateways that drop metadata show it."""
    for batch in answer["data"] if call == "GET batches" else []:
        del batch["metadata"]
    return answer


async def test_a_lost_create_is_found_by_its_file_where_the_list_shows_no_metadata(
    tmp_path: Path,
) -> None:
    # The part's input file is its own: a batch listed without metadata
    # that runs on it is the one the lost create made, not a reason to
    # create (and pay for) a second one.
    bend = Gateway()
    bend.rewrite = losing_first_create(bend, without_metadata)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0, summary.aborted
    assert mock.batches.created == 1
    assert mock.stats.batch_rows == 3


@pytest.mark.parametrize("listing", [with_foreign_first, without_metadata])
async def test_a_resume_finds_its_unrecorded_batch_in_a_bent_list(
    tmp_path: Path, listing: Rewrite
) -> None:
    # The first run stops with the batch made but its id unknown (exit 3);
    # the next one lists batches to attach to it: past a foreign batch with
    # odd metadata, or by its input file where the list shows no metadata.
    faults = BatchFaults(seconds=0.2, no_id="batches")
    async with bent(Gateway(rewrite=listing), faults) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        assert (await run_async(config)).exit_code == 3
        faults.no_id = ""
        summary = await run_async(config)
    assert summary.exit_code == 0, summary.aborted
    assert mock.batches.created == 1
    assert mock.stats.batch_rows == 3


async def test_a_lost_create_is_looked_for_again_at_the_next_round(tmp_path: Path) -> None:
    # The create's answer is lost and so is the lookup's (the list fails
    # past its retries): the next round must look again before creating,
    # or the batch the lost create made runs unrecorded and is paid twice.
    def list_down(call: str, count: int) -> web.Response | None:
        return fail(500) if call == "GET batches" and count <= 2 else None

    bend = Gateway(early=list_down)
    bend.rewrite = losing_first_create(bend, lambda call, answer: answer)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0, summary.aborted
    assert bend.calls["GET batches"] == 3
    assert mock.batches.created == 1


async def test_a_lost_upload_is_found_by_its_name_not_uploaded_again(tmp_path: Path) -> None:
    # The provider stored the file, its answer was lost: a second upload
    # would leave the first copy there, named by no record.
    def lose_first_upload(call: str, answer: Any) -> Any:
        if call == "POST files" and bend.calls[call] == 1:
            raise web.HTTPBadGateway()
        return answer

    bend = Gateway(rewrite=lose_first_upload)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0, summary.aborted
    assert mock.batches.uploads == 1
    assert bend.calls["GET files"] == 1
    assert not mock.batches.files  # every file deleted once collected


async def test_a_list_whose_pages_never_end_stops_instead_of_creating_again(
    tmp_path: Path,
) -> None:
    # The create's answer is lost, and the list's next page is the same
    # page forever: the batch made may be past it, so another create could
    # pay twice. The run stops; with the list mended, it attaches.
    endless = {"object": "list", "data": [foreign({}, n) for n in range(3)], "has_more": True}
    broken = True

    def early(call: str, count: int) -> web.Response | None:
        return web.json_response(endless) if call == "GET batches" and broken else None

    bend = Gateway(early=early)
    bend.rewrite = losing_first_create(bend, lambda call, answer: answer)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        summary = await run_async(config)
        assert summary.exit_code == 3
        assert summary.aborted is not None
        assert "GET batches pages do not advance" in summary.aborted
        assert bend.calls["GET batches"] == 2
        broken = False
        assert (await run_async(config)).exit_code == 0
    assert mock.batches.created == 1
    assert mock.stats.batch_rows == 3


async def with_responses(tmp_path: Path, name: str, value: Any) -> tuple[Any, list[Any]]:
    """The summary and output of a two-row run whose result lines all have
    ``response[name]`` set to ``value``."""

    def bend(data: bytes) -> bytes:
        lines = [orjson.loads(raw) for raw in data.splitlines()]
        for line in lines:
            line["response"][name] = value
        return b"".join(orjson.dumps(line) + b"\n" for line in lines)

    async with bent(Gateway(content=bend)) as (mock, url):
        config = make_config(tmp_path, rows(2), mock, base_url=url, **FAST)
        summary = await run_async(config)
    return summary, read_jsonl(config.out)


@pytest.mark.parametrize("body", [None, "text", [1]])
async def test_a_2xx_result_that_is_no_object_is_no_answer(tmp_path: Path, body: Any) -> None:
    # As online mode reads such an answer: a retryable row error, never an
    # answer counted ok and stored for reuse.
    summary, records = await with_responses(tmp_path, "body", body)
    assert summary.exit_code == 1
    assert [row["error"]["code"] for row in records] == ["invalid_body", "invalid_body"]
    assert all(row["error"]["retryable"] for row in records)


async def test_files_a_finished_run_could_not_delete_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The batch record that names them is dropped with the published
    # output: no later run would delete them, so the run names them.
    def early(call: str, count: int) -> web.Response | None:
        return fail(500) if call == "DELETE file" else None

    async with bent(Gateway(early=early)) as (mock, url):
        config = make_config(tmp_path, rows(2), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0
    left = sorted(mock.batches.files)
    assert len(left) == 2  # the input file and the output file
    assert f"2 file(s) could not be deleted on the provider at {url}: " in caplog.text
    assert all(file_id in caplog.text for file_id in left)


async def test_a_result_whose_status_is_a_boolean_is_no_answer_and_no_http_error(
    tmp_path: Path,
) -> None:
    # ``true`` is no status code: the row did not run as far as batchrun can
    # tell (sent again, then given up on), never an ``http_True`` error.
    summary, records = await with_responses(tmp_path, "status_code", True)
    assert summary.exit_code == 1
    assert {row["error"]["code"] for row in records} == {"batch_unfinished"}
    assert all(row["response"] is None for row in records)


async def test_a_status_batchrun_does_not_know_is_polled_on_and_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def paused(call: str, answer: Any) -> Any:
        if call == "GET batch" and bend.calls[call] <= 3:
            answer["status"] = "paused"
        return answer

    bend = Gateway(rewrite=paused)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(2), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0
    assert caplog.text.count("has the status 'paused', which batchrun does not know") == 1


async def test_a_refused_lookup_after_a_lost_upload_keeps_the_upload_recorded(
    tmp_path: Path,
) -> None:
    # The provider stored the file, its answer was lost; the lookup by name
    # is then refused (a gateway without a files list: 404). The refusal is
    # the lookup's, not the upload's: the file may be there, so the next
    # round looks again instead of uploading a second copy no record names.
    def lose_first_upload(call: str, answer: Any) -> Any:
        if call == "POST files" and bend.calls[call] == 1:
            raise web.HTTPBadGateway()
        return answer

    def list_refused(call: str, count: int) -> web.Response | None:
        return fail(404) if call == "GET files" and count == 1 else None

    bend = Gateway(early=list_refused, rewrite=lose_first_upload)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        summary = await run_async(config)
    assert summary.exit_code == 0, summary.aborted
    assert mock.batches.uploads == 1
    assert not mock.batches.files  # every file deleted once collected


async def test_an_upload_answered_without_an_id_is_named_when_its_record_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The provider stored the file and answered 200 without its id: that
    # answer says nothing of what it did, so the upload stays recorded as
    # started, and --restart, which drops the record, names the file.
    def strip_first_id(call: str, answer: Any) -> Any:
        if call == "POST files" and bend.calls[call] == 1:
            return {key: value for key, value in answer.items() if key != "id"}
        return answer

    bend = Gateway(rewrite=strip_first_id)
    async with bent(bend) as (mock, url):
        config = make_config(tmp_path, rows(3), mock, base_url=url, **FAST)
        first = await run_async(config)
        assert first.aborted is not None
        assert "answered without a valid 'id'" in first.aborted
        assert mock.batches.uploads == 1
        restarted = dataclasses.replace(config, restart=True)
        assert (await run_async(restarted)).exit_code == 0
    assert "may have left 1 file(s)" in caplog.text
