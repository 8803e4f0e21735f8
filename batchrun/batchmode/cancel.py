"""``batchrun cancel OUT``: cancel the batches of the run on OUT, on purpose.

Batches are paid work, so nothing else ever cancels them (a signal leaves
them running). Cancelled batches keep their finished rows: the next run on OUT
collects them and resubmits the rest (or sends it online with
``--fallback online``).

Cancelling takes OUT's lock, as a run does: while a run holds it, that run
would see its batches end ``cancelled`` and resubmit their rows as new paid
batches, undoing the cancel. So a live run makes cancel refuse (exit 4): stop
the run first (SIGINT or SIGTERM leaves the batches running, exit 75).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from batchrun.batchmode.api import BatchApi
from batchrun.batchmode.http import open_http
from batchrun.batchmode.phase import dialect
from batchrun.batchmode.record import NOT_CREATED, BatchRecord, BatchState
from batchrun.batchmode.submit import attach, metadata
from batchrun.config import Limits, RetryPolicy, Timeouts
from batchrun.errors import LockedError, UsageError
from batchrun.providers import get_provider
from batchrun.providers.base import checked_key
from batchrun.state import StateDir

# Attempts per cancel call: a person is waiting.
_ATTEMPTS = 3


async def cancel_batches(out: Path) -> list[tuple[str, str]]:
    """Ask the provider to cancel every live batch of the run on ``out``;
    each batch id with the status the provider answered. ``LockedError``
    while a run holds ``out`` (see the module docstring)."""
    state_dir = StateDir(out)
    record = BatchRecord(state_dir.root)
    if record.load() is None:
        raise UsageError(f"no batches for {out} (looked in {record.root})")
    try:
        state_dir.lock()
    except LockedError:
        raise LockedError(
            f"a run on {out} is live ({state_dir.holder() or 'holder unknown'}) and would"
            " resubmit the rows of cancelled batches: stop it first (Ctrl-C or SIGTERM"
            " leaves its batches running), then run batchrun cancel again"
        ) from None
    try:
        state = record.load()  # again: the run that held the lock may have changed it
        if state is None:  # it finished meanwhile: its batches are collected
            raise UsageError(f"no batches for {out} any more: its run has finished")
        cancelled = await _cancel(state)
        record.save(state)
    finally:
        state_dir.unlock()
    return cancelled


async def _cancel(state: BatchState) -> list[tuple[str, str]]:
    """Cancel the live batches of ``state``, recording each answered status."""
    provider = get_provider(state.provider)
    key_env = state.api_key_env or provider.default_key_env
    given = os.environ.get(key_env)
    key = checked_key(key_env, given) if given else provider.fallback_key
    if not key:
        raise UsageError(f"no API key: set the environment variable {key_env}")
    cancelled: list[tuple[str, str]] = []
    async with open_http(Limits(), Timeouts()) as session:
        api = BatchApi(
            session,
            dialect(provider),
            state.base_url,
            api_key=key,
            retry=RetryPolicy(max_attempts=_ATTEMPTS),
            timeouts=Timeouts(),
            sleep=anyio.sleep,
        )
        for part in state.parts:
            if part.status == "uploaded":
                # A stop between creating its batch and recording it leaves the
                # batch running unrecorded: find it by its metadata, as a resume does.
                found = await api.find(metadata(state, part), part.input_file_id)
                if found is None:
                    part.batch_status = NOT_CREATED
                else:
                    attach(part, found)
            if part.live and part.batch_id:
                batch = await api.cancel(part.batch_id)
                part.seen(batch)
                cancelled.append((part.batch_id, batch["status"]))
    return cancelled
