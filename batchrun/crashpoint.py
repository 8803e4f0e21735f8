"""Deliberate crashes at named points, for the tests that prove crash safety.

Inactive unless the environment variable ``BATCHRUN_CRASH_AT`` is set to
``NAME`` or ``NAME:N``: the Nth time (default the first) the code passes
point ``NAME``, the process kills itself with SIGKILL, as a machine or an
OOM killer would. Points: ``after_response`` (a response received, not yet
journaled), ``journal_torn`` (half a journal record written),
``output_torn`` (half an output line written), ``before_publish`` (the
output complete, not yet renamed into place), ``after_upload`` (a batch
input file uploaded, its id not yet recorded), ``after_batch_create`` (a
provider batch created, its id not yet recorded).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("BATCHRUN_CRASH_AT", "")
_NAME, _, _COUNT = _SPEC.partition(":")
_remaining = int(_COUNT) if _NAME and _COUNT.isdigit() else 1 if _NAME else 0


def armed(name: str) -> bool:
    """Count a pass through point ``name``; True when this pass must crash."""
    global _remaining
    if not _remaining or name != _NAME:
        return False
    _remaining -= 1
    return _remaining == 0


def hit(name: str) -> None:
    """Crash here if this pass through ``name`` is the chosen one."""
    if armed(name):
        die()


def die() -> None:
    """Stop the process at once, with no cleanup: the state a SIGKILL leaves."""
    os.kill(os.getpid(), signal.SIGKILL)
