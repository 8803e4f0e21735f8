"""A run from start to finish: key, lock, resume decision, session, pipeline,
publication and summary. The row-level work is in ``pipeline``."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import ssl
import sys
import threading
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO
from urllib.parse import urlsplit

import anyio
import orjson

from batchrun import crashpoint, eventloop
from batchrun.batchmode.standing import guard, known_results, unsettled
from batchrun.budget import Budget
from batchrun.client import Client, open_session
from batchrun.config import WHOLE, RunConfig
from batchrun.errors import CorruptStateError, DiskError, FatalError, TornOutputError, UsageError
from batchrun.eventloop import backend_options
from batchrun.fdlimit import make_room
from batchrun.hosts import HostPool
from batchrun.inputs import Stamp, check_input_file, check_readable, check_unchanged, stamp
from batchrun.journal import JournalContents, scan_journal
from batchrun.layout import state_dir
from batchrun.paths import Named, check_read_outside_state, check_written, replace_file
from batchrun.pipeline import Pipeline, RunEnding
from batchrun.progress import ProgressReporter
from batchrun.providers import Provider, get_provider
from batchrun.providers.base import checked_key
from batchrun.resume import ResumePoint, recover, spent_before
from batchrun.reuse import Answers, open_answers
from batchrun.rowsource import KnownLookup
from batchrun.schema import AnswerCheck
from batchrun.sender import RowSender
from batchrun.sharedlimits import SharedBudget, default_limits_key, open_lease_store
from batchrun.signals import SignalStop, with_signals
from batchrun.state import Checkpoint, FinishedRun, StateDir, changed_settings, fingerprint
from batchrun.stats import RunStats, Summary, money
from batchrun.store import STORE_FILE
from batchrun.threaded import loop_running, run_beside_loop
from batchrun.throttle import Throttle
from batchrun.timing import Clock
from batchrun.tls import client_context
from batchrun.writer import OutputFile

if TYPE_CHECKING:
    from batchrun.batchmode.job import PhaseResult

log = logging.getLogger("batchrun")

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_FATAL, EXIT_LOCKED = 0, 1, 2, 3, 4
EXIT_BUDGET = 5  # --max-cost reached: raise it and run the same command again
EXIT_DISK = 74  # EX_IOERR: a write failed (full disk, I/O error); resumable
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: run the same command again to resume

__all__ = ["Clock", "run", "run_async"]


def run(
    config: RunConfig, *, stream: TextIO | None = None, handle_signals: bool = False
) -> Summary:
    """Run a job to the end from synchronous code (a notebook cell, an Airflow
    task) and return its summary. Raises ``UsageError`` for bad settings and
    ``LockedError`` when another run holds the output. The event loop is
    ``config.loop``'s (``batchrun.eventloop``).

    Where an event loop already runs in this thread (a notebook), the job runs
    on a worker thread with its own loop (see ``threaded.run_beside_loop``):
    Ctrl-C then stops it resumably (exit code 75), a second Ctrl-C at once.
    """
    options = backend_options(config.loop)
    if loop_running():
        return run_beside_loop(
            lambda stop: run_async(config, stream=stream, stop=stop), backend_options=options
        )
    return anyio.run(
        lambda: run_async(config, stream=stream, handle_signals=handle_signals),
        backend_options=options,
    )


async def run_async(
    config: RunConfig,
    *,
    clock: Clock | None = None,
    stream: TextIO | None = None,
    handle_signals: bool = False,
    stop: anyio.Event | None = None,
) -> Summary:
    """Run (or resume) a job inside a running event loop; return its summary.

    ``handle_signals``: SIGINT/SIGTERM stop the run resumably (exit code 75)
    from before the output's lock is taken; only from the main thread.
    ``stop``: setting it does the same, from anywhere (online mode).
    The summary also goes to ``config.summary_path`` when it is set.
    """
    if handle_signals:
        if threading.current_thread() is not threading.main_thread():
            raise UsageError("handle_signals works only in the main thread: leave it out here")
        summary = await with_signals(lambda signals: _run(config, clock, stream, signals, stop))
    else:
        summary = await _run(config, clock, stream, None, stop)
    if config.summary_path is not None:
        write_summary(config.summary_path, summary)
    return summary


def write_summary(path: Path, summary: Summary) -> None:
    """The summary as JSON at ``path``; a failure to write it (checked
    writable at the start, but a directory can vanish) is a warning and
    changes no exit code: the rows are done and kept."""
    data = orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    try:
        replace_file(path, data)  # a reader sees the last summary or this one, never a part
    except OSError as exc:
        log.warning("could not write the summary %s: %s", path, exc)


async def _run(
    config: RunConfig,
    clock: Clock | None,
    stream: TextIO | None,
    signals: SignalStop | None,
    stop: anyio.Event | None,
) -> Summary:
    provider = get_provider(config.provider)
    api_key = resolve_api_key(provider, config)
    check_input_file(config.input)
    check_readable(config.input)
    check_run_paths(config)
    make_room(config.limits.pool_size)  # before anything is sent or written
    tls = _tls(config)
    state = StateDir(config.out)
    state.lock()
    crashpoint.signal_at("locked")
    try:
        guard(state.root, mode=config.mode, restart=config.restart)
        if config.restart:
            state.clear()
            state.drop_results()
        answers = open_answers(
            state.root,
            config.cache,
            resend_retryable=config.retry_failed,
            durable=config.fsync != "off",
        )
        try:
            before = stamp(config.input)  # before ``prepare`` reads it: a later edit shows
            prepared = prepare(state, config, provider, answers)
            if isinstance(prepared, Summary):
                return prepared
            config, start = prepared
            # A retry pass resumed without the flag (``prepare`` goes on with
            # it) still resends its retryable errors instead of reusing them.
            answers.resend_retryable = answers.resend_retryable or config.retry_failed
            job = _Job(config, provider, api_key, state, start, answers, clock or Clock(), stream)
            check = AnswerCheck(config.response_schema) if config.response_schema else None
            answers.judge = check.judge if check is not None else None
            job = job._replace(signals=signals, stop=stop, check=check, input_stamp=before)
            return await _execute(job, tls)
        finally:
            answers.close()
    finally:
        state.unlock()


def _tls(config: RunConfig) -> ssl.SSLContext | None:
    """The context that verifies HTTPS hosts; None when every host is plain
    HTTP, so a local server's run does not load the system's CAs (tens of
    milliseconds). A bad --ca-bundle stops the run before any request."""
    urls = config.base_urls
    if config.ca_bundle is None and urls and all(_plain(url) for url in urls):
        return None
    return client_context(config.ca_bundle)


def _plain(url: str) -> bool:
    return url.lower().startswith("http://")


def check_run_paths(config: RunConfig) -> None:
    """Every path the run writes differs from the input and from each other,
    is neither another run's output nor in a state directory, and can be
    written: checked before the lock, the metrics or any request."""
    files = [
        (name, path)
        for name, path in (
            ("--out", config.out),
            ("--summary", config.summary_path),
            ("--metrics-file", config.metrics_file),
        )
        if path is not None
    ]
    own = state_dir(config.out)
    directories = [("the state directory", own)]
    if config.cache is not None:
        directories.append(("--cache", config.cache))
    reads = _run_reads(config)
    for name, path in reads:
        check_read_outside_state(name, path)
    if config.cache is not None:  # its paid answers: none of the files may be written over
        store = config.cache / STORE_FILE
        for suffix in ("", "-wal", "-shm", "-journal"):
            reads.append(("the --cache store", store.with_name(store.name + suffix)))
    # --out may be a finished output and its state directory exist: a resume.
    check_written(reads, files, directories, own=(config.out, own))
    _check_not_foreign(config)


def _run_reads(config: RunConfig) -> list[Named]:
    """The files a run reads: the input, the job file, the response schema
    and the CA bundle."""
    reads: list[Named] = [("the input", config.input)]
    if config.job is not None:
        reads.append(("the job file", config.job))
    if config.response_schema is not None:
        reads.append(("--response-schema", config.response_schema.path))
    if config.ca_bundle is not None:
        reads.append(("--ca-bundle", config.ca_bundle))
    return reads


def _check_not_foreign(config: RunConfig) -> None:
    """An existing OUT without its state directory is not this run's to
    replace: another tool's file, or answers whose state (and so their result
    store) was deleted, which a run would pay for again. ``--restart`` says
    to replace it."""
    out = config.out
    if config.restart or not out.exists() or state_dir(out).exists():
        return
    raise UsageError(
        f"--out {out} exists but has no state directory ({state_dir(out)}): a run would"
        " replace it, and any answers in it would be paid for again. Move it away, or"
        " run with --restart to replace it"
    )


def resolve_api_key(provider: Provider, config: RunConfig) -> str | None:
    """The key from the environment variable the config names; never from a flag."""
    name = config.api_key_env or provider.default_key_env
    key = os.environ.get(name)
    if key:
        return checked_key(name, key)
    if provider.fallback_key is not None:
        return provider.fallback_key
    raise UsageError(
        f"no API key: set the environment variable {name} (or name another one with --api-key-env)"
    )


def _kept_output(config: RunConfig) -> Path:
    """The finished output an unfinished --retry-failed pass keeps its other
    rows from (they cost the pass nothing); refused when it is gone, as
    those rows would then be lost, or paid again by a --restart."""
    if not config.out.exists():
        raise UsageError(
            f"{config.out} is missing: the unfinished --retry-failed pass on it keeps the rows"
            " it does not resend from it. Put it back and run the same command again, or run"
            " with --restart to start over (every row is sent again)"
        )
    return config.out


def prepare(
    state: StateDir, config: RunConfig, provider: Provider, answers: Answers
) -> tuple[RunConfig, ResumePoint] | Summary:
    """Decide how this run starts: fresh, resumed, a retry pass, a new pass
    over a changed input that reuses stored answers, or a no-op (a
    ``Summary``) because the output is already complete. ``--restart`` has
    cleared the state before this."""
    current = fingerprint(config)
    # Whatever happens next, the journal's results go to the store first, as
    # they are read: only the rows' lines are kept (for the rows in doubt).
    journal = JournalContents()
    answers.salvage(scan_journal(state.journal_path, journal, after_line=0, keep_results=False))
    meta = state.read_meta()
    if meta is None:  # none yet, or a new pass was being started (``StateDir.start_pass``)
        if config.retry_failed:
            raise UsageError(f"--retry-failed needs a finished run's output; {config.out} has none")
        return config, _begin(state, current, "full", journal)
    changed = changed_settings(meta, current)
    if changed:
        _check_change(config, meta, current, changed, batches=unsettled(state.root) > 0)
        log.info(
            "%s changed since the run on %s: sending only requests without a stored answer",
            changed,
            config.out,
        )
        start = _begin(state, current, "full", journal)
        return dataclasses.replace(config, retry_failed=False), start
    finished = state.read_finished()
    if finished is not None:
        return _after_finish(state, config, current, finished)
    retry_pass = meta.get("pass") == "retry-failed"
    if config.retry_failed and not retry_pass:
        raise UsageError(
            f"the run on {config.out} has not finished: run it to the end first"
            " (the same command without --retry-failed)"
        )
    try:
        kept = _kept_output(config) if retry_pass else None
        start = recover(state, provider.usage, config.shard or WHOLE, kept=kept)
    except TornOutputError as torn:
        start = _start_over(state, current, str(meta.get("pass") or "full"), torn, journal)
    return dataclasses.replace(config, retry_failed=retry_pass), start


def _check_change(
    config: RunConfig,
    meta: dict[str, Any],
    current: dict[str, Any],
    changed: str,
    *,
    batches: bool,
) -> None:
    """Refuse a change of the job since the run on OUT began that a new pass
    (reusing stored answers) would get wrong: another shard (the output would
    hold other rows, paid again), a changed request under --retry-failed
    (which promises to resend failed rows only), or any change while a batch
    part is unsettled (its answers are not all in the store yet; once every
    part is collected or refused, a new pass reuses them by content)."""
    out = config.out
    if meta.get("shard") != current.get("shard"):
        raise UsageError(
            f"{out} holds the rows of {_shard_words(meta.get('shard'))}, and this run asks for"
            f" {_shard_words(current.get('shard'))}: run it with --shard as before, or give"
            " another --out"
        )
    if batches:
        raise UsageError(
            f"{changed} changed while batches of {out} are not written yet: run the same"
            " command as before (that input and settings) to collect them first, or cancel"
            " them (`batchrun cancel OUT`) and run with --restart"
        )
    if config.retry_failed and changed != "the input":
        raise UsageError(
            f"--retry-failed resends the failed rows as the run on {out} sent them, but"
            f" {changed}: run it with that run's settings, or without --retry-failed for a"
            " new pass (rows with a stored answer are not paid again)"
        )


def _shard_words(shard: object) -> str:
    return f"--shard {shard}" if shard else "the whole input (no --shard)"


def _start_over(
    state: StateDir,
    current: dict[str, Any],
    kind: str,
    torn: TornOutputError,
    journal: JournalContents,
) -> ResumePoint:
    """Begin the ordered output again at row 0, keeping the result store:
    the journal is salvaged into it by now, so every row answered before
    comes back from it, marked reused and not paid again; its rows in doubt
    stay in doubt."""
    if state.batch_path.exists():  # ``_begin`` would forget batches still paid for
        store = state.root / STORE_FILE
        raise CorruptStateError(
            f"{torn}, and batches of this output are on record, so it is not started over"
            f" here: run `batchrun cancel OUT`, move {store} (and any {store.name}-wal"
            " beside it) into a new directory DIR, and run the same command with"
            " --restart --cache DIR: every stored answer is reused, not paid again"
        )
    log.warning(
        "%s (a power loss or a damaged disk): starting the output over from row 0;"
        " rows answered before come from its result store, not sent again",
        torn,
    )
    return _begin(state, current, kind, journal)


def _after_finish(
    state: StateDir, config: RunConfig, current: dict[str, Any], finished: FinishedRun
) -> tuple[RunConfig, ResumePoint] | Summary:
    if state.partial_path.exists():  # stopped between the marker and the rename
        _publish(state, config.out, durable=config.fsync != "off")
    if config.retry_failed:
        if not config.out.exists():
            raise UsageError(f"--retry-failed: {config.out} does not exist any more")
        return config, _begin(state, current, "retry-failed")
    if config.out.exists():
        return _already_done(finished, config.out)
    log.info("%s was removed after its run finished: running the job again", config.out)
    return config, _begin(state, current, "full")


def _begin(
    state: StateDir,
    current: dict[str, Any],
    kind: str,
    journal: JournalContents | None = None,
) -> ResumePoint:
    """Start a pass at row 0, the result store kept. The rows the last pass's
    ``journal`` left in flight, and those resent after earlier stops, stay
    counted: the new pass sends every row without a stored answer, so it
    resends them (unless the input lost them), and may be billed twice."""
    in_doubt = journal.in_doubt if journal is not None else set()
    resent = _resent_before(state)
    state.start_pass({**current, "pass": kind}, in_doubt=in_doubt, resent=resent)
    return ResumePoint(
        checkpoint=Checkpoint(in_doubt=resent), journal=JournalContents(begun=in_doubt)
    )


def _resent_before(state: StateDir) -> int:
    """The rows resent after stops, over the runs the checkpoint counts, or
    the finished run's summary once its output was published (publishing
    drops the checkpoint); 0 when they are damaged: the rows of the journal
    are still counted."""
    try:
        resent = state.read_checkpoint().in_doubt
        finished = state.read_finished()
    except CorruptStateError:
        return 0
    if finished is not None:
        counted = finished.summary.extra.get("in doubt (all runs)", 0)
        if type(counted) is int:
            resent = max(resent, counted)
    return resent


def _already_done(finished: FinishedRun, out: Path) -> Summary:
    extra: dict[str, object] = {"already finished at": finished.at, "requests sent": 0}
    # Nothing is in doubt now; what the runs that made the output left in
    # doubt stays reported, as every run of it reports it.
    extra["in doubt"] = 0
    extra["in doubt (all runs)"] = finished.summary.extra.get("in doubt (all runs)", 0)
    return finished.summary.replay(output=str(out), extra=extra)


class _Job(NamedTuple):
    """One run's settings and the state it runs on, as the steps below need them."""

    config: RunConfig
    provider: Provider
    api_key: str | None
    state: StateDir
    start: ResumePoint
    answers: Answers
    clock: Clock
    stream: TextIO | None
    signals: SignalStop | None = None  # the run's SIGINT and SIGTERM, when it takes them
    stop: anyio.Event | None = None
    check: AnswerCheck | None = None  # --response-schema's, for batches and online alike
    input_stamp: Stamp | None = None  # the input as the run began (``inputs.stamp``)


async def _execute(job: _Job, tls: ssl.SSLContext | None) -> Summary:
    config, clock = job.config, job.clock
    async with AsyncExitStack() as stack:
        base_urls = await _base_urls(stack, job)
        session = await stack.enter_async_context(open_session(config.limits, config.timeouts, tls))
        started = clock.monotonic()
        if config.mode == "batch":
            await _check_shared_limits(config, base_urls[0])
            phase = await _batch_phase(job, tls, base_urls[0])
            if not phase.complete:
                return _batch_stopped(config, job.start, phase, clock.monotonic() - started)
        client = Client(
            session,
            job.provider,
            hosts=HostPool(base_urls, clock=clock.monotonic),
            api_key=job.api_key,
            request_timeout=config.timeouts.request,
            max_response_bytes=config.max_response_bytes,
        )
        rate_budget = await _shared_budget(stack, config, base_urls[0], clock)
        known = known_results(job.state.root, config.limits.pool_size)
        if known is not None:
            stack.callback(known.close)
        return await _online(job, client, Throttle(config, clock, rate_budget), known, started)
    raise AssertionError("unreachable")  # pragma: no cover - the stack never swallows


async def _base_urls(stack: AsyncExitStack, job: _Job) -> tuple[str, ...]:
    """The hosts to send to: the configured ones, the provider's, or the embedded mock's."""
    base_urls = job.config.base_urls
    if not base_urls:
        provider = job.provider
        embedded = provider.embedded_server
        default = await _start_mock_server(stack) if embedded else provider.default_base_url
        base_urls = (default,)
    for base_url in base_urls:
        _warn_plain_http(base_url, job.api_key)
    return base_urls


async def _batch_phase(job: _Job, tls: ssl.SSLContext | None, base_url: str) -> PhaseResult:
    # Imported here: batch mode's HTTP (aiohttp) costs an online run's start-up a tenth of a second.
    from batchrun.batchmode.http import open_http
    from batchrun.batchmode.phase import run_phase

    config, answers, provider = job.config, job.answers, job.provider
    async with open_http(config.limits, config.timeouts, tls) as session:
        return await run_phase(
            config,
            session=session,
            provider=provider,
            api_key=job.api_key,
            base_url=base_url,
            state_root=job.state.root,
            start=job.start,
            clock=job.clock,
            stream=job.stream or sys.stderr,
            signals=job.signals,
            answered=_stored(answers) if answers.lookup else None,
            answers=answers,
            check=job.check,
        )


async def _online(
    job: _Job, client: Client, throttle: Throttle, known: KnownLookup | None, started: float
) -> Summary:
    """Send the rows still to do and conclude the run."""
    config, clock, start, provider = job.config, job.clock, job.start, job.provider
    reporter = _reporter(config, start, clock, job.stream, throttle)
    sender = _sender(config, client, provider, throttle, clock, reporter.stats, job.check)
    budget = Budget(config.costs.max_cost, spent=spent_before(start, provider.usage))
    pipeline = Pipeline(
        config,
        sender=sender,
        answers=job.answers,
        clock=clock,
        reporter=reporter,
        state=job.state,
        start=start,
        budget=budget,
        signals=job.signals,
        known=known,
        stop=job.stop,
    )
    ending = await pipeline.run()
    parts = _Parts(reporter.stats, sender, budget, known)
    summary = _conclude(config, ending, parts, clock.monotonic() - started)
    if ending.complete and ending.disk_error is None:
        if job.input_stamp is not None:
            check_unchanged(config.input, job.input_stamp)  # before the output is published
        job.state.write_finished(summary)
        _publish(job.state, config.out, durable=config.fsync != "off")
    return summary


def _stored(answers: Answers) -> Callable[[bytes], bool]:
    """Whether a content key has a stored answer: batch mode leaves it to the writer."""

    def answered(key: bytes) -> bool:
        return answers.find(key) is not None

    return answered


def _batch_stopped(
    config: RunConfig, start: ResumePoint, phase: PhaseResult, duration: float
) -> Summary:
    """The summary of a batch phase that stopped before every part was collected."""
    stats = RunStats.resumed(start.checkpoint.rows, start.checkpoint.counts)
    if phase.aborted is not None:
        exit_code, aborted = EXIT_FATAL, phase.aborted
    else:
        exit_code = EXIT_INTERRUPTED
        aborted = _stopped_note(phase.running)
    return Summary.from_stats(
        stats,
        duration_s=duration,
        exit_code=exit_code,
        aborted=aborted,
        output=str(config.out),
        extra={"batches running": phase.running},
    )


def _stopped_note(running: int) -> str:
    """What a signal's stop of the batch phase left, and how to go on."""
    if not running:
        return "stopped; no batch of this run is running. Run the same command again to go on"
    return (
        f"stopped; {running} batches keep running on the provider."
        " Run the same command again to attach to them and collect the answers"
    )


async def _shared_budget(
    stack: AsyncExitStack, config: RunConfig, base_url: str, clock: Clock
) -> SharedBudget | None:
    """The budget shared through Redis with ``--shared-limits``, checked before
    any request (``UsageError`` when Redis is unreachable or refuses); else None."""
    limits = config.limits
    if limits.shared_limits is None:
        return None
    key = limits.limits_key or default_limits_key(config.provider, base_url, config.model)
    store = await stack.enter_async_context(open_lease_store(limits.shared_limits, key))
    budget = SharedBudget(
        store, rpm=limits.rpm, tpm=limits.tpm, clock=clock.monotonic, sleep=clock.sleep
    )
    return await stack.enter_async_context(budget.running())


async def _check_shared_limits(config: RunConfig, base_url: str) -> None:
    """Batch mode's early check of ``--shared-limits`` (``UsageError`` as in
    ``_shared_budget``): the online phase after the batches opens the budget
    itself, and a mistyped URL must not wait that long to show."""
    limits = config.limits
    if limits.shared_limits is not None:
        key = limits.limits_key or default_limits_key(config.provider, base_url, config.model)
        async with open_lease_store(limits.shared_limits, key):
            pass


def _reporter(
    config: RunConfig, start: ResumePoint, clock: Clock, stream: TextIO | None, throttle: Throttle
) -> ProgressReporter:
    stats = RunStats.resumed(start.checkpoint.rows, start.checkpoint.counts)
    out_stream = stream or sys.stderr
    mode = ProgressReporter.choose_mode(config.progress, out_stream)

    def extra() -> str:
        level = throttle.level()
        if not config.costs.priced:
            return level
        spend = f"cost {money(stats.cost)}"
        return f"{level}, {spend}" if level else spend

    return ProgressReporter(stats, mode=mode, stream=out_stream, clock=clock.monotonic, extra=extra)


def _sender(
    config: RunConfig,
    client: Client,
    provider: Provider,
    throttle: Throttle,
    clock: Clock,
    stats: RunStats,
    check: AnswerCheck | None,
) -> RowSender:
    return RowSender(
        client,
        provider,
        throttle,
        config.retry,
        clock=clock,
        stats=stats,
        answers=check,
    )


class _Parts(NamedTuple):
    """What the summary reads from the parts of a finished pipeline."""

    stats: RunStats
    sender: RowSender
    budget: Budget
    known: KnownLookup | None


def _ending_code(ending: RunEnding, parts: _Parts) -> tuple[int, str | None]:
    """The exit code and, unless the run is complete, what stopped it."""
    if ending.disk_error is not None:
        return EXIT_DISK, disk_advice(ending.disk_error)
    if ending.complete:
        return (EXIT_FAILED_ROWS if parts.stats.failed else EXIT_OK), None
    if ending.aborted is not None:
        return EXIT_FATAL, _fatal_advice(ending.aborted)
    if ending.budget_reached:
        return EXIT_BUDGET, _budget_advice(parts.budget)
    reason = ending.stop_reason or "stopped"
    return EXIT_INTERRUPTED, f"{reason}; run the same command again to resume"


def _batched(stats: RunStats, known: KnownLookup | None) -> int:
    """Count the spend of the rows answered in batches as this run's (the
    writer counted them as its work, ``record_batched``); how many there were."""
    if known is None:
        return 0
    stats.cost += known.spent
    return known.found


def _conclude(config: RunConfig, ending: RunEnding, parts: _Parts, duration: float) -> Summary:
    stats, sender = parts.stats, parts.sender
    batched = _batched(stats, parts.known)
    exit_code, aborted = _ending_code(ending, parts)
    summary = Summary.from_stats(
        stats,
        duration_s=duration,
        exit_code=exit_code,
        aborted=aborted,
        output=str(config.out),
        priced=config.costs.priced,
        extra={
            "in doubt": ending.in_doubt,
            "in doubt (all runs)": ending.in_doubt_all,
            **sender.throttle.report(),
            "stale connections retried": sender.client.stale_retries,
            "event loop": eventloop.running(),
            **_answers_report(sender),
            **({"answered in batches": batched} if config.mode == "batch" else {}),
            **_hosts_report(sender.client),
            **ending.held,
        },
    )
    return summary


def _answers_report(sender: RowSender) -> dict[str, object]:
    answers = sender.answers
    return dict(answers.report()) if answers is not None else {}


def _hosts_report(client: Client) -> dict[str, object]:
    pool = client.hosts
    return {"hosts": pool.report()} if len(pool.hosts) > 1 else {}


def _budget_advice(budget: Budget) -> str:
    return (
        f"budget reached: {money(budget.spent)} spent of --max-cost {money(budget.cap or 0.0)}"
        " (all runs on this output); raise --max-cost and run the same command again"
    )


def disk_advice(error: DiskError) -> str:
    """What to do after a write failed for want of space or by an I/O error."""
    return (
        f"{error}. Free some space (or fix the disk), then run the same command again:"
        " the run resumes where it stopped"
    )


def _fatal_advice(error: FatalError) -> str:
    return f"{error.stop_reason()}, then run the same command again: it resumes where it stopped"


def _publish(state: StateDir, out: Path, *, durable: bool) -> None:
    OutputFile(out).publish(durable=durable)
    state.drop_progress_files()


async def _start_mock_server(stack: AsyncExitStack) -> str:
    from batchrun.mock.server import MockServer

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
