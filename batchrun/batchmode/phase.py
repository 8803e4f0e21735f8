"""Batch mode's entry points for the runner and the CLI.

``run_phase`` runs the batch phase of a run inside the runner's session;
``guard`` keeps online mode and ``--restart`` away from live batches;
``known_results`` hands the collected answers to the row source;
``cancel`` cancels a run's batches on purpose (``batchrun cancel OUT``).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import anyio

from batchrun.batchmode.api import BatchApi, batch_base_url
from batchrun.batchmode.build import Answered, Body, KeyOf
from batchrun.batchmode.job import BatchJob, PhaseResult
from batchrun.batchmode.plan import DEFAULT_MAX_BYTES
from batchrun.batchmode.progress import BatchProgress
from batchrun.batchmode.record import BatchRecord, BatchState
from batchrun.batchmode.results import Reading, Usage
from batchrun.batchmode.settle import Settler
from batchrun.batchmode.submit import Submitter
from batchrun.config import RunConfig
from batchrun.contentkey import content_key, json_key
from batchrun.errors import DISK_ERRNOS, DiskError, UsageError, sole_usage_error
from batchrun.providers import Provider
from batchrun.providers.openai import CompatibleModeProvider
from batchrun.records import Request
from batchrun.resume import ResumePoint
from batchrun.reuse import Answers
from batchrun.schema import AnswerCheck
from batchrun.signals import SignalStop
from batchrun.timing import Clock

log = logging.getLogger("batchrun")


def _settler(
    config: RunConfig,
    api: BatchApi,
    record: BatchRecord,
    state: BatchState,
    talk: Provider,
    answers: Answers | None,
    reading: Reading,
) -> Settler:
    return Settler(
        api,
        record,
        state,
        talk,
        keep_files=config.batch.keep_files,
        fallback_online=config.batch.fallback == "online",
        answers=answers,
        reading=reading,
    )


def _reading(config: RunConfig, usage: Usage, check: AnswerCheck | None) -> Reading:
    """How the run reads its batches' answers: tokens by the run's provider,
    the response schema's check, and, with prices, the batch price."""
    costs = config.costs
    return Reading(usage=usage, check=check, price=costs.batch_price if costs.priced else None)


def _api(
    config: RunConfig,
    session: aiohttp.ClientSession,
    talk: Provider,
    base_url: str,
    api_key: str | None,
    clock: Clock,
) -> BatchApi:
    """The files and batches API at ``base_url``, with the run's retries and timeouts."""
    return BatchApi(
        session,
        talk,
        base_url,
        api_key=api_key,
        retry=config.retry,
        timeouts=config.timeouts,
        sleep=clock.sleep,
    )


def dialect(provider: Provider) -> Provider:
    """The dialect batches speak: OpenAI's, also on DashScope's compatible mode."""
    return CompatibleModeProvider() if provider.name == "dashscope" else provider


async def run_phase(
    config: RunConfig,
    *,
    session: aiohttp.ClientSession,
    provider: Provider,
    api_key: str | None,
    base_url: str,
    state_root: Path,
    start: ResumePoint,
    clock: Clock,
    stream: TextIO,
    signals: SignalStop | None,
    answered: Answered | None = None,
    answers: Answers | None = None,
    check: AnswerCheck | None = None,
) -> PhaseResult:
    """Plan, submit, poll and collect the run's batches (see ``job``).

    ``answered`` tells a request with a stored answer: it is not put in a
    batch; ``answers`` files every batch answer under its content key;
    ``check`` (``--response-schema``) checks every answer."""
    record = BatchRecord(state_root)
    earlier = record.load()
    url = batch_base_url(provider.name, base_url)
    if earlier is not None and earlier.base_url != url:
        _move(record, earlier, url)
    state = earlier or record.new(
        provider=provider.name,
        base_url=url,
        api_key_env=config.api_key_env or provider.default_key_env,
    )
    talk = dialect(provider)
    api = _api(config, session, talk, state.base_url, api_key, clock)
    job = BatchJob(
        config,
        record=record,
        state=state,
        submitter=Submitter(api, record, state, retry=config.retry, sleep=clock.sleep),
        settler=_settler(
            config, api, record, state, talk, answers, _reading(config, provider.usage, check)
        ),
        progress=BatchProgress(enabled=config.progress, stream=stream, clock=clock.monotonic),
        clock=clock,
    )
    max_bytes = config.batch.bytes or DEFAULT_MAX_BYTES[provider.name]
    try:
        plan = (start, talk.body, max_bytes, _key_of(provider), answered)
        return await _until_stopped(job, plan, signals, resumed=earlier is not None)
    finally:
        job.progress.close()


def _move(record: BatchRecord, state: BatchState, url: str) -> None:
    """Go on at ``url``, the batches API of a ``--base-url`` other than the
    recorded run's, when the provider holds nothing of the run there (no file
    uploaded, no batch running: a run stopped because that URL could not be
    reached, say); else a usage error, since its batches live at the old URL."""
    held = [part for part in state.parts if part.status in ("uploaded", "submitted")]
    if held:
        raise UsageError(
            f"{len(held)} parts of this output have files or batches at {state.base_url},"
            f" not at {url} (--base-url): run with --base-url {state.base_url} to go on with"
            " them; to start over at the new URL, cancel them with `batchrun cancel OUT`,"
            " then run with --restart"
        )
    log.info("batch mode: nothing of this run is at %s; going on at %s", state.base_url, url)
    state.base_url = url
    record.save(state)


async def _until_stopped(
    job: BatchJob,
    plan: tuple[ResumePoint, Body, int, KeyOf, Answered | None],
    signals: SignalStop | None,
    *,
    resumed: bool,
) -> PhaseResult:
    result = PhaseResult()
    # A scope, not a task group: the phase starts no task of its own, and its
    # errors (an unreadable input while planning) come out as they are.
    try:
        with anyio.CancelScope() as scope, _signals_handled(signals, scope):
            await job.plan(*plan)
            result = await job.run(resumed=resumed)
    except (OSError, BaseExceptionGroup) as exc:
        disk = _disk_failure(exc, job.record.root)
        if disk is not None:
            raise disk from exc  # every step is recorded before the next: the run resumes
        # A step's damaged part file fails in the steps' group: one line, exit 2.
        usage = sole_usage_error(exc) if isinstance(exc, BaseExceptionGroup) else None
        if usage is None:
            raise
        raise usage from exc
    if not result.complete:
        result.running = job.running()  # stopped or aborted: they keep running
    return result


def _disk_failure(exc: BaseException, root: Path) -> DiskError | None:
    """The full disk or I/O error that ``exc`` is or holds (a task group's
    steps fail in a group), naming its file, or else ``root``; None if none."""
    if isinstance(exc, BaseExceptionGroup):
        found = (_disk_failure(inner, root) for inner in exc.exceptions)
        return next((disk for disk in found if disk is not None), None)
    if isinstance(exc, DiskError):
        return exc
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return DiskError(Path(exc.filename) if exc.filename else root, exc)
    return None


def _signals_handled(
    signals: SignalStop | None, scope: anyio.CancelScope
) -> AbstractContextManager[None]:
    """A signal stops the phase at once: every step is recorded, batches keep running."""
    if signals is None:
        return nullcontext()

    def stop(reason: str) -> None:
        log.info("%s: stopping; the batches keep running", reason)
        scope.cancel()

    return signals.handled_by(stop)


def _key_of(provider: Provider) -> KeyOf:
    def key_of(request: Request, sent: dict[str, Any], sent_json: bytes) -> bytes:
        body, endpoint = provider.body(request), provider.url(request, "")
        if body is sent:  # the batch line sends the very body the key is of
            return json_key(provider.name, endpoint, sent_json)
        return content_key(provider.name, endpoint, body)

    return key_of
