"""The run: one task group of a reader, a pool of workers and an ordered writer.

    reader --(window slot, request)--> workers x max_async --(outcome)--> writer

The reader takes a slot of the reorder window before each row and the writer
gives it back once the row is written, so at most ``reorder_window`` rows are
between reading and writing whatever the completion order: memory stays flat
for any input size. Workers are exactly ``max_async`` tasks, which is the
in-flight cap.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO, cast
from urllib.parse import urlsplit

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

from batchrun.client import Client, open_session
from batchrun.config import RunConfig
from batchrun.errors import FatalError, RequestError, UsageError
from batchrun.progress import ProgressReporter, RunStats, Summary
from batchrun.providers import Provider, get_provider
from batchrun.records import (
    Defaults,
    LineError,
    Outcome,
    Request,
    Response,
    line_error_outcome,
    output_line,
    parse_line,
)
from batchrun.retry import Sleep, retrying
from batchrun.writer import OutputFile, ReorderBuffer

log = logging.getLogger("batchrun")

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3


@dataclass(frozen=True, kw_only=True, slots=True)
class Clock:
    """Time as the runner sees it; tests inject fakes so nothing really waits."""

    sleep: Sleep = anyio.sleep
    monotonic: Callable[[], float] = time.monotonic


def run(config: RunConfig, *, stream: TextIO | None = None) -> Summary:
    """Run a job to the end from synchronous code (a notebook cell, an Airflow
    task) and return its summary. Raises ``UsageError`` for bad settings."""
    return anyio.run(lambda: run_async(config, stream=stream))


async def run_async(
    config: RunConfig, *, clock: Clock | None = None, stream: TextIO | None = None
) -> Summary:
    """Run a job to the end inside a running event loop; return its summary."""
    clock = clock or Clock()
    provider = get_provider(config.provider)
    api_key = resolve_api_key(provider, config)
    _check_input(config.input)
    async with AsyncExitStack() as stack:
        base_url = config.base_url or provider.default_base_url
        if not base_url:
            base_url = await _start_mock_server(stack)
        _warn_plain_http(base_url, api_key)
        session = await stack.enter_async_context(open_session(config.limits, config.timeouts))
        client = Client(
            session,
            provider,
            base_url=base_url,
            api_key=api_key,
            write_timeout=config.timeouts.write,
        )
        return await Pipeline(config, client, provider, clock, stream).run()
    raise AssertionError("unreachable")  # pragma: no cover - AsyncExitStack never swallows


def resolve_api_key(provider: Provider, config: RunConfig) -> str | None:
    """The key from the environment variable the config names; never from a flag."""
    name = config.api_key_env or provider.default_key_env
    key = os.environ.get(name)
    if key:
        return key
    if provider.fallback_key is not None:
        return provider.fallback_key
    raise UsageError(
        f"no API key: set the environment variable {name} (or name another one with --api-key-env)"
    )


def _check_input(path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"input file {path} does not exist or is not a file")


async def _start_mock_server(stack: AsyncExitStack) -> str:
    from batchrun.mock_server import MockServer

    server = await stack.enter_async_context(MockServer())
    return server.base_url


def _warn_plain_http(base_url: str, api_key: str | None) -> None:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not api_key:
        return
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("sending the API key over plain http to %s: use https", host)


def open_input(path: Path) -> BinaryIO:
    """The input as bytes; ``.gz`` files are decompressed on the fly."""
    if path.suffix == ".gz":
        return cast(BinaryIO, gzip.open(path, "rb"))
    return path.open("rb")


def iter_lines(handle: BinaryIO) -> Iterator[bytes]:
    """Input lines without their line endings; streamed, never loaded whole."""
    for raw in handle:
        yield raw.rstrip(b"\r\n")


def count_lines(path: Path) -> int:
    """Lines in the input (a final line without newline counts)."""
    count, last = 0, b"\n"
    with open_input(path) as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


Work = tuple[int, Request]
Done = tuple[int, Outcome]


class Pipeline:
    """One run's reader, workers and writer, wired by bounded streams."""

    def __init__(
        self,
        config: RunConfig,
        client: Client,
        provider: Provider,
        clock: Clock,
        stream: TextIO | None,
    ) -> None:
        self.config = config
        self.client = client
        self.provider = provider
        self.clock = clock
        self.stats = RunStats()
        out_stream = stream or sys.stderr
        mode = ProgressReporter.choose_mode(config.progress, out_stream)
        self.reporter = ProgressReporter(
            self.stats, mode=mode, stream=out_stream, clock=clock.monotonic
        )
        self.window = anyio.Semaphore(config.reorder_window)
        self.output = OutputFile(config.out)
        self.aborted: str | None = None

    async def run(self) -> Summary:
        started = self.clock.monotonic()
        self.output.open()
        try:
            await self._run_tasks()
        finally:
            self.reporter.close()
        duration = self.clock.monotonic() - started
        if self.aborted is None:
            self.output.publish()
        else:
            self.output.close()
        return Summary.from_stats(
            self.stats,
            duration_s=duration,
            exit_code=self._exit_code(),
            aborted=self.aborted,
            output=str(self.config.out),
        )

    def _exit_code(self) -> int:
        if self.aborted is not None:
            return EXIT_FATAL
        return EXIT_FAILED_ROWS if self.stats.failed else EXIT_OK

    async def _run_tasks(self) -> None:
        limits = self.config.limits
        work_tx, work_rx = anyio.create_memory_object_stream[Work](limits.max_async)
        done_tx, done_rx = anyio.create_memory_object_stream[Done](limits.max_async)
        try:
            async with done_rx, anyio.create_task_group() as tasks:
                tasks.start_soon(self._count_total)
                if self.reporter.mode != "off":
                    tasks.start_soon(self.reporter.heartbeat, self.clock.sleep)
                async with work_tx, work_rx, done_tx:
                    tasks.start_soon(self._read, work_tx.clone(), done_tx.clone())
                    for _ in range(limits.max_async):
                        tasks.start_soon(self._work, work_rx.clone(), done_tx.clone())
                await self._write(done_rx)
                # Every row is written; only the heartbeat and the counter are left.
                tasks.cancel_scope.cancel()
        except* FatalError as group:
            fatal = group.exceptions[0]
            assert isinstance(fatal, FatalError)
            self.aborted = f"{fatal.code}: {fatal.message}"

    async def _count_total(self) -> None:
        self.stats.total = await anyio.to_thread.run_sync(
            count_lines, self.config.input, abandon_on_cancel=True
        )

    async def _read(self, work: ObjectSendStream[Work], done: ObjectSendStream[Done]) -> None:
        defaults = Defaults(model=self.config.model, params=self.config.params)
        async with work, done:
            with open_input(self.config.input) as handle:
                for index, raw in enumerate(iter_lines(handle)):
                    await self.window.acquire()
                    parsed = parse_line(raw, index + 1, defaults)
                    if isinstance(parsed, LineError):
                        await done.send((index, line_error_outcome(parsed)))
                    else:
                        await work.send((index, parsed))

    async def _work(self, work: ObjectReceiveStream[Work], done: ObjectSendStream[Done]) -> None:
        async with work, done:
            async for index, request in work:
                await done.send((index, await self.process(request)))

    async def process(self, request: Request) -> Outcome:
        """One row to its outcome, retrying transient failures.

        ``FatalError`` propagates: it aborts the run.
        """
        attempts = 0
        started = self.clock.monotonic()

        async def attempt() -> Response:
            nonlocal attempts
            attempts += 1
            self.stats.in_flight += 1
            try:
                return await self.client.send(request)
            finally:
                self.stats.in_flight -= 1

        try:
            response: Response = await retrying(self.config.retry, sleep=self.clock.sleep)(attempt)
        except FatalError:
            raise
        except RequestError as exc:
            return _failed(request, exc, attempts, self.clock.monotonic() - started)
        tokens_in, tokens_out = self.provider.usage(response.body)
        return Outcome(
            line=request.line,
            custom_id=request.custom_id,
            response=response,
            attempts=attempts,
            latency_s=self.clock.monotonic() - started,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )

    async def _write(self, done: MemoryObjectReceiveStream[Done]) -> None:
        # The stream stays open if this task is cancelled, so that a worker
        # finishing at that instant blocks (and is cancelled) instead of
        # failing on a closed stream.
        reorder: ReorderBuffer[Outcome] = ReorderBuffer()
        async for index, outcome in done:
            for ready in reorder.push(index, outcome):
                self._emit(ready)
            if done.statistics().current_buffer_used == 0:
                self.output.flush()

    def _emit(self, outcome: Outcome) -> None:
        self.output.write(output_line(outcome))
        self.window.release()
        self.stats.record_outcome(
            ok=outcome.ok,
            error_code=outcome.error_code,
            attempts=outcome.attempts,
            latency_s=outcome.latency_s,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
        )
        self.reporter.update()


def _failed(request: Request, exc: RequestError, attempts: int, latency: float) -> Outcome:
    response = None
    if exc.status is not None:
        response = Response(status_code=exc.status, request_id=exc.request_id, body=exc.body)
    return Outcome(
        line=request.line,
        custom_id=request.custom_id,
        response=response,
        error_code=exc.code,
        error_message=exc.message,
        attempts=attempts,
        latency_s=latency,
    )
