"""``batchrun cancel OUT``: cancel the batches of the run on OUT, on purpose.

Batches are paid work, so nothing else ever cancels them (a signal leaves
them running). Cancelled batches keep their finished rows: the next run on OUT
collects them and resubmits the rest (or sends it online with
``--fallback online``).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from batchrun.batchmode.api import BatchApi
from batchrun.batchmode.phase import dialect
from batchrun.batchmode.record import BatchRecord, BatchState
from batchrun.client import open_session
from batchrun.config import Limits, RetryPolicy, Timeouts
from batchrun.errors import LockedError, UsageError
from batchrun.providers import get_provider
from batchrun.state import StateDir

# Attempts per cancel call: a person is waiting.
_ATTEMPTS = 3


async def cancel_batches(out: Path) -> list[tuple[str, str]]:
    """Ask the provider to cancel every live batch of the run on ``out``;
    each batch id with the status the provider answered."""
    state_dir = StateDir(out)
    record = BatchRecord(state_dir.root)
    state = record.load()
    if state is None:
        raise UsageError(f"no batches for {out} (looked in {record.root})")
    provider = get_provider(state.provider)
    key_env = state.api_key_env or provider.default_key_env
    key = os.environ.get(key_env) or provider.fallback_key
    if not key:
        raise UsageError(f"no API key: set the environment variable {key_env}")
    cancelled: list[tuple[str, str]] = []
    async with open_session(Limits(), Timeouts()) as session:
        api = BatchApi(
            session,
            dialect(provider),
            state.base_url,
            api_key=key,
            retry=RetryPolicy(max_attempts=_ATTEMPTS),
            sleep=anyio.sleep,
        )
        for part in state.parts:
            if part.live and part.batch_id:
                batch = await api.cancel(part.batch_id)
                part.batch_status = str(batch.get("status"))
                cancelled.append((part.batch_id, part.batch_status))
    _save_unless_running(state_dir, record, state)
    return cancelled


def _save_unless_running(state_dir: StateDir, record: BatchRecord, state: BatchState) -> None:
    """Record the statuses, unless a live run owns the record (it polls them itself)."""
    try:
        state_dir.lock()
    except LockedError:
        return
    try:
        record.save(state)
    finally:
        state_dir.unlock()
