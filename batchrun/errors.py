"""batchrun's error hierarchy.

Transport failures and HTTP answers become these types in exactly one place,
``batchrun.client``; everything downstream (retry, sender, workers, pipeline,
runner) speaks only these types. Three verdicts matter for a request:

* ``TransientError``: worth another attempt (timeouts, resets, 429, 5xx ...).
* ``RowError``: this row failed for good; record it and go on.
* ``FatalError``: every later row would fail the same way (bad key, no
  quota); abort the run.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class BatchrunError(Exception):
    """Base class of every error batchrun raises on purpose."""


class UsageError(BatchrunError):
    """Bad configuration, flags, job file or input file (exit code 2)."""


class CorruptStateError(UsageError):
    """A state file is damaged other than by a torn final write (exit code 2)."""


class TornOutputError(CorruptStateError):
    """``output.partial`` does not hold the rows its checkpoint counts (a power
    loss with ``--fsync off``, a damaged disk): the output cannot be resumed
    by position. The runner starts it over, its result store kept."""


class LockedError(BatchrunError):
    """Another live process runs on this output (exit code 4)."""


class RequestError(BatchrunError):
    """A request's failure, with what the output record needs.

    ``code`` is a short stable machine name (``rate_limited``, ``read_timeout``,
    a provider's own code ...); ``status`` is the HTTP status when there was an
    answer; ``retry_after`` is the server's requested pause in seconds.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        body: Any = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.body = body
        self.request_id = request_id
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r})"

    def stop_reason(self) -> str:
        """Why a run stops after this error, then what to fix, ending in a
        clause the caller goes on with (", then run ...")."""
        message = self.message.rstrip(".")
        if self.status is None:  # no answer at all: the connection (TLS, the URL) is at fault
            return (
                f"no request could reach the provider ({self.code}): {message}."
                " Fix that (--base-url, --ca-bundle or the network)"
            )
        return (
            f"the provider answered {self.status} {self.code}: {message}."
            " Fix that (the key, the account, the quota or --base-url)"
        )


# Failure codes of a request that found no connection: no byte of it left,
# so the provider cannot have seen it, let alone billed it.
NEVER_SENT = frozenset({"connect_error", "connect_timeout"})


class TransientError(RequestError):
    """A failure that another attempt may cure."""


class RowError(RequestError):
    """A failure of this row alone that no retry will cure."""


class FatalError(RequestError):
    """A failure that dooms every row: the run aborts (exit code 3)."""


def sole_usage_error(group: BaseExceptionGroup) -> UsageError | None:
    """The ``UsageError`` a task group failed with, when it holds nothing else:
    then the user sees its one-line message, not a group's traceback."""
    found, rest = group.split(UsageError)
    if found is None or rest is not None:
        return None
    leaf: BaseException = found
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, UsageError) else None


# A write that fails with one of these stops the run resumably (exit 74).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS})


class DiskError(BatchrunError):
    """Writing one of the run's files failed for want of space or by an I/O
    error: the run stops, its state resumable once the disk is fixed."""

    def __init__(self, path: Path, cause: OSError) -> None:
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        name = errno.errorcode.get(cause.errno or 0, "error")
        super().__init__(f"cannot write {path}: {reason} ({name})")
        self.path = path
        self.errno = cause.errno


@contextmanager
def disk_writes(path: Path) -> Iterator[None]:
    """Turn a full disk or an I/O error inside the block into ``DiskError``
    naming ``path``; other ``OSError``s pass unchanged."""
    try:
        yield
    except DiskError:
        raise
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise DiskError(path, exc) from exc
        raise


def find_disk_error(group: BaseExceptionGroup) -> DiskError | None:
    """A ``DiskError`` anywhere in a task group's failure, if any."""
    found, _ = group.split(DiskError)
    leaf: BaseException | None = found
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, DiskError) else None
