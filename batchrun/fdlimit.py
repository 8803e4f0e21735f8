"""Room for the run's open files: every pooled connection is a socket.

A run keeps up to ``--connection-pool-size`` connections open, and besides
them its journal, output, result stores (with their WAL and shared-memory
files), input and a few more. Past the process's limit on open files
(``ulimit -n``, often 1,024 by default) a connection or a store's file
fails to open in the middle of a run, so the limit is checked before
anything is sent: raised (its soft value, up to the hard one) when that is
allowed, else the run is refused with what to change.
"""

from __future__ import annotations

import sys

from batchrun.errors import UsageError

if sys.platform != "win32":
    import resource

__all__ = ["FILES_BESIDE_CONNECTIONS", "files_needed", "make_room"]

# Files a run opens besides its connections: the input, output, journal,
# state files, two stores with their WAL and shared-memory files, the
# event loop's own, Redis and the interpreter's, with a wide margin.
FILES_BESIDE_CONNECTIONS = 256


def files_needed(pool_size: int) -> int:
    """Open files a run with ``pool_size`` pooled connections may hold at once."""
    return pool_size + FILES_BESIDE_CONNECTIONS


def make_room(pool_size: int, *, parts: int = 0) -> None:
    """Let this process open ``files_needed(pool_size)`` files, and one more
    per collected batch part's results file (``parts``: all are read at once):
    raise the soft limit up to the hard one if it is lower; ``UsageError``
    naming the setting when the hard limit is too low. A no-op without POSIX
    limits."""
    if sys.platform == "win32":
        return
    needed = files_needed(pool_size) + parts
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _at_least(soft, needed):
        return
    if not _at_least(hard, needed):
        if parts:
            raise UsageError(
                f"the {parts:,} batch parts' results files are read at once, and with"
                f" {pool_size:,} connections and the run's own files that needs about"
                f" {needed:,} open files; this process may open at most {hard:,}"
                " (ulimit -n). Raise that limit and run the same command again"
                " (a larger --batch-rows makes fewer parts next time)"
            )
        raise UsageError(
            f"--connection-pool-size {pool_size} keeps up to {pool_size:,} connections"
            f" open, and with the run's own files it needs about {needed:,} open files;"
            f" this process may open at most {hard:,} (ulimit -n). Raise that limit,"
            " or lower --connection-pool-size and --max-async-requests"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _at_least(limit: int, needed: int) -> bool:
    return limit == resource.RLIM_INFINITY or limit >= needed
