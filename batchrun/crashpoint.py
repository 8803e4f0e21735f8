"""Deliberate crashes and disk faults at named points, for the tests that
prove crash safety and a clean stop on a full disk.

Inactive unless the environment variable ``BATCHRUN_CRASH_AT`` is set to
``NAME`` or ``NAME:N``: the Nth time (default the first) the code passes
point ``NAME``, the process kills itself with SIGKILL, as a machine or an
OOM killer would. Points: ``after_response`` (a response received, not yet
journaled), ``journal_torn`` (half a journal record written),
``output_torn`` (half an output line written), ``before_publish`` (the
output complete, not yet renamed into place),
``between_checkpoint_and_compaction`` (a checkpoint written, the journal
not yet compacted), ``after_upload`` (a batch
input file uploaded, its id not yet recorded), ``after_batch_create`` (a
provider batch created, its id not yet recorded).

Signals: ``BATCHRUN_SIGNAL_AT`` set to ``NAME``, ``NAME:N`` or
``NAME:N:SIGTERM`` makes the process send itself SIGINT (or SIGTERM) the Nth
time it passes point ``NAME``, as a user's Ctrl-C or a scheduler's stop at
that moment would. Points: ``locked`` (the output's lock just taken),
``request`` (a request about to be sent).

Disk faults: ``BATCHRUN_DISK_FAULT`` set to ``NAME``, ``NAME:N`` or
``NAME:N:EIO`` makes the Nth write at point ``NAME`` and every later one
fail as a full disk would (``ENOSPC``, or ``EIO``), after writing half its
bytes. Points: ``journal`` (a journal write), ``output`` (a flush of the
ordered output), ``batch`` (a file of batch mode's record, before it is
written) and ``download`` (a chunk of a batch's result file).
"""

from __future__ import annotations

import errno
import os
import signal

_SPEC = os.environ.get("BATCHRUN_CRASH_AT", "")
_NAME, _, _COUNT = _SPEC.partition(":")
_remaining = int(_COUNT) if _NAME and _COUNT.isdigit() else 1 if _NAME else 0
# Whether any crash point is armed: a point on the per-row path checks this
# first, so an unarmed run pays an attribute read there, not a call.
ARMED = bool(_NAME)


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


_SIGNAL_NAME, _, _SIGNAL_REST = os.environ.get("BATCHRUN_SIGNAL_AT", "").partition(":")
_SIGNAL_COUNT, _, _SIGNAL_KIND = _SIGNAL_REST.partition(":")
_signal_remaining = int(_SIGNAL_COUNT) if _SIGNAL_COUNT.isdigit() else 1
SIGNALS_ARMED = bool(_SIGNAL_NAME)  # as ``ARMED``, for ``signal_at``


def signal_at(name: str) -> None:
    """Count a pass through point ``name``; on the chosen one, signal this
    process (delivered once the event loop next looks)."""
    global _signal_remaining
    if name != _SIGNAL_NAME or not _signal_remaining:
        return
    _signal_remaining -= 1
    if not _signal_remaining:
        os.kill(os.getpid(), signal.SIGTERM if _SIGNAL_KIND == "SIGTERM" else signal.SIGINT)


_FAULT_NAME, _, _FAULT_REST = os.environ.get("BATCHRUN_DISK_FAULT", "").partition(":")
_FAULT_COUNT, _, _FAULT_KIND = _FAULT_REST.partition(":")
_fault_remaining = int(_FAULT_COUNT) if _FAULT_COUNT.isdigit() else 1
_FAULT_ERRNO = errno.EIO if _FAULT_KIND == "EIO" else errno.ENOSPC


def disk_fault(name: str) -> OSError | None:
    """Count a write at point ``name``; the error it must fail with, from the
    chosen write on (the disk stays full), else None."""
    global _fault_remaining
    if name != _FAULT_NAME:
        return None
    _fault_remaining = max(0, _fault_remaining - 1)
    if _fault_remaining:
        return None
    return OSError(_FAULT_ERRNO, os.strerror(_FAULT_ERRNO))
