"""The batch phase of a ``--mode batch`` run: plan, submit, poll, collect.

    plan parts --> submit the due ones together --> poll the live ones
        ^                                              |
        +-------- follow-up parts, token-limit retries <+

The loop ends when every part is collected (the ordinary pipeline then
writes the output in input order from the results), on a signal (the batches
keep running: they are paid work; exit 75, and the next run attaches to
them) or when the provider refuses a file as a whole (exit 3, once the other
parts are collected).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from batchrun.batchmode.build import Answered, Body, KeyOf, plan_parts
from batchrun.batchmode.progress import BatchProgress
from batchrun.batchmode.record import (
    SETTLED,
    STATUSES,
    TERMINAL,
    BatchRecord,
    BatchState,
    Part,
)
from batchrun.batchmode.settle import BatchRefused, Settler
from batchrun.batchmode.standing import warn_of_undeleted
from batchrun.batchmode.submit import Submitter
from batchrun.config import RunConfig
from batchrun.errors import NEVER_SENT, FatalError, RequestError
from batchrun.resume import ResumePoint
from batchrun.timing import Clock

log = logging.getLogger("batchrun")

# Enqueued-token-limit refusals of one part before the run gives up.
MAX_TOKEN_LIMIT_TRIES = 8
# The longest pause between two tries of a refused part, in seconds.
MAX_TOKEN_LIMIT_PAUSE = 1800.0
# Part steps (upload, create, poll) that may fail in a row, each after its own
# retries, before the run stops (exit 3; the batches keep running).
MAX_FAILED_STEPS = 20
# Share of the poll interval added or taken at random, so runs do not poll in step.
JITTER = 0.2
# Seconds one process polls a batch that does not end before it stops (exit 3):
# the provider's 24 h window, and 6 h for it to expire the batch and write its
# files. A batch past that is the provider's fault, and polling would never end.
MAX_BATCH_WAIT = 30 * 3600.0


# What to do after an answer that is not about the input (a key, an account,
# a wrong --base-url, an outage): the parts are kept, so the run resumes.
_AGAIN = (
    "then run the same command again: it resumes, and batches already created are not created again"
)
_RESUME = f"Fix that (the key, the account, --base-url), {_AGAIN}"

# What to do after the provider refused a part's file as a whole.
_FIX_INPUT = (
    "Fix the input, then run the same command: the answers already collected are"
    " reused (--restart would pay for them again)"
)


@dataclass(slots=True)
class PhaseResult:
    """How the batch phase ended: ``complete``, or why not."""

    complete: bool = False
    aborted: str | None = None  # why the provider stopped it, and what to do: exit 3
    running: int = 0  # batches left running when stopped


def _stopped_by(exc: RequestError) -> str:
    """Why the phase stops after ``exc``, and that the same command resumes."""
    return f"{exc.stop_reason()}, {_AGAIN}"


class BatchJob:
    """Runs the parts of one batch-mode run to the end; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        *,
        record: BatchRecord,
        state: BatchState,
        submitter: Submitter,
        settler: Settler,
        progress: BatchProgress,
        clock: Clock,
    ) -> None:
        self.config = config
        self.record = record
        self.state = state
        self.submitter = submitter
        self.settler = settler
        self.progress = progress
        self.clock = clock
        self._due: dict[int, float] = {}  # part -> earliest retry after a token-limit refusal
        self._aborted: str | None = None
        self._failures = 0  # part steps failed in a row, each after its own retries
        self._reached = False  # a step of this run has had the provider's answer
        self._overdue = _Overdue(clock, config.out)

    async def plan(
        self,
        start: ResumePoint,
        body: Body,
        max_bytes: int,
        key_of: KeyOf,
        answered: Answered | None,
    ) -> None:
        """Write and record the parts, once per run (a crash while planning plans again).

        ``answered`` runs on the event loop's thread (the store is bound to it)."""
        if self.state.planned:
            return

        def in_loop(key: bytes) -> bool:
            assert answered is not None
            return anyio.from_thread.run_sync(answered, key)

        def write() -> list[Part]:
            check = in_loop if answered is not None else None
            # A stop (a signal cancels the phase's scope) ends planning at
            # once: the thread is not abandoned, so no file is written after.
            stop = anyio.from_thread.check_cancelled
            return plan_parts(self.config, self.record, start, body, max_bytes, key_of, check, stop)

        self.state.parts = await anyio.to_thread.run_sync(write)
        self.state.planned = True
        self.record.save(self.state)
        log.info(
            "batch mode: %d rows in %d parts",
            sum(part.rows for part in self.state.parts),
            len(self.state.parts),
        )

    async def run(self, *, resumed: bool) -> PhaseResult:
        """Submit, poll and collect until every part is collected or refused
        (then the run stops, exit 3); ``resumed``: an earlier process worked on
        these parts (see ``Submitter.reattach``)."""
        try:
            await self.submitter.reattach(resumed=resumed)
        except RequestError as exc:  # retried already: nothing to attach to is known
            never_reached = exc.code in NEVER_SENT
            return PhaseResult(
                aborted=self._unreachable(exc) if never_reached else _stopped_by(exc)
            )
        await self._clean_settled()
        while self._aborted is None:
            await self._submit_due()
            await self._poll()
            self.progress.show(self.state.parts)
            if all(part.status in SETTLED for part in self.state.parts):
                return self._settled()
            if self._aborted is None:
                await self.clock.sleep(self._interval())
        return PhaseResult(aborted=self._aborted)

    async def _clean_settled(self) -> None:
        """Delete the provider files that settled parts still name: a run
        stopped between collecting a part and deleting them left them."""
        left = [
            part
            for part in self.state.parts
            if part.status in SETTLED and (part.input_file_id or part.result_files)
        ]
        for part in left:
            await self.settler.cleanup(part)
        if left:
            self.record.save(self.state)

    async def _guarded(self, step: Callable[[Part], Awaitable[None]], part: Part) -> None:
        """Run one part's step; a refusal or fatal answer stops the phase, a
        transient failure is tried again next round (a bounded number of times)."""
        try:
            await step(part)
            self._failures = 0
            self._reached = True
        except BatchRefused as exc:  # the others go on: their answers are kept
            log.warning("%s; the other parts go on", exc)
        except FatalError as exc:
            self._aborted = _stopped_by(exc)
        except RequestError as exc:
            # No connection before any step had an answer points at the setup
            # (a wrong --base-url, a host down), which waiting will not fix:
            # stop at once, as online mode fails such rows after their retries.
            if not self._reached and exc.code in NEVER_SENT:
                self._aborted = self._unreachable(exc)
                return
            self._failures += 1
            log.warning("part %d: %s (%s); trying again at the next poll", part.id, exc, exc.code)
            if self._failures > MAX_FAILED_STEPS:
                self._aborted = f"the provider keeps failing: {exc.code}: {exc.message}. {_RESUME}"

    def _settled(self) -> PhaseResult:
        """Every part collected (complete), or some refused as a whole: the run
        stops, and stops so again until the input is fixed (a part refused
        stays refused, as the same file would be)."""
        refused = next((part for part in self.state.parts if part.status == "refused"), None)
        if refused is None:
            if not self.config.batch.keep_files:
                warn_of_undeleted(self.state)
            return PhaseResult(complete=True)
        reason = refused.refusal or f"the provider refused part {refused.id} as a whole"
        return PhaseResult(aborted=f"{reason.rstrip('.')}. {_FIX_INPUT}")

    def _unreachable(self, exc: RequestError) -> str:
        return (
            f"the provider at {self.submitter.api.base_url} cannot be reached"
            f" ({exc.code}: {exc.message}). {_RESUME}"
        )

    def running(self) -> int:
        return sum(part.live for part in self.state.parts)

    def _interval(self) -> float:
        base = self.config.batch.poll_interval
        return base * random.uniform(1 - JITTER, 1 + JITTER)

    async def _submit_due(self) -> None:
        """Submit every part ready to go, together."""
        due = [part for part in self.state.parts if self._ready(part)]
        async with anyio.create_task_group() as tasks:
            for part in due:
                tasks.start_soon(self._guarded, self.submitter.submit, part)

    def _ready(self, part: Part) -> bool:
        if part.status == "planned" or (part.status == "uploaded" and not part.tries):
            return True
        if part.status != "uploaded":
            return False
        # Refused for the enqueued-token limit: wait for our running batches, then a pause.
        return self.running() == 0 and self.clock.monotonic() >= self._due.get(part.id, 0.0)

    async def _poll(self) -> None:
        async with anyio.create_task_group() as tasks:
            for part in self.state.parts:
                if part.live:
                    tasks.start_soon(self._guarded, self._poll_one, part)
        self.record.save(self.state)

    async def _poll_one(self, part: Part) -> None:
        assert part.batch_id is not None
        batch = await self.submitter.api.get(part.batch_id)
        before = part.batch_status
        part.seen(batch)
        if part.batch_status != before and part.batch_status not in STATUSES:
            _warn_unknown(part)  # once per change: a batch polled on and on should say why
        if part.batch_status not in TERMINAL:
            self._aborted = self._aborted or self._overdue.check(part)
        elif not await self.settler.ended(part, batch):
            self._refused_for_tokens(part)

    def _refused_for_tokens(self, part: Part) -> None:
        if part.tries >= MAX_TOKEN_LIMIT_TRIES:  # not the input's fault: no --restart
            self._aborted = (
                f"part {part.id}: the provider's enqueued-token limit refused it"
                f" {part.tries} times; run the same command again later: it resumes"
            )
            return
        pause = min(self.config.batch.poll_interval * 2 ** (part.tries - 1), MAX_TOKEN_LIMIT_PAUSE)
        self._due[part.id] = self.clock.monotonic() + pause
        log.info(
            "part %d: enqueued-token limit reached; resubmitting after running batches end"
            " (try %d)",
            part.id,
            part.tries + 1,
        )


def _warn_unknown(part: Part) -> None:
    log.warning(
        "part %d: batch %s has the status %r, which batchrun does not know; it is polled on"
        " until it ends (at the latest when the provider's 24 h window does)",
        part.id,
        part.batch_id,
        part.batch_status,
    )


class _Overdue:
    """When each live batch was first polled by this process (``clock``'s
    monotonic seconds), to stop polling one that runs past ``MAX_BATCH_WAIT``."""

    def __init__(self, clock: Clock, out: Path) -> None:
        self.clock = clock
        self.out = out
        self._first: dict[str, float] = {}  # batch id -> first poll

    def check(self, part: Part) -> str | None:
        """Why the run stops for ``part``'s batch (still running), or None."""
        assert part.batch_id is not None
        now = self.clock.monotonic()
        first = self._first.setdefault(part.batch_id, now)
        if now - first <= MAX_BATCH_WAIT:
            return None
        return (
            f"part {part.id}: batch {part.batch_id} is still {part.batch_status} after"
            f" {MAX_BATCH_WAIT / 3600:.0f} h of polling, past the provider's 24 h window;"
            " batchrun stops polling and leaves it as it is. Check it at the provider, or"
            f" cancel it (batchrun cancel {self.out} keeps its finished rows), then run the same"
            " command again: it collects what the batch finished and resubmits the rest"
        )
