"""A result store: output records findable by their request's content key.

One SQLite database (WAL mode) holds one row per content key
(``batchrun.contentkey``): the output record of the answer that key got, with
its verdict, cost and when it was stored. Every output keeps one in its state
directory (``OUT.batchrun/results.sqlite``); ``--cache DIR`` adds one shared by
many jobs and outputs (``DIR/results.sqlite``).

Contract:

* Lookups go through the index on ``key``: nothing is loaded into memory,
  whatever the store's size. Records are appended in insertion order and
  only the small index takes random inserts, which keeps writing cheap.
* Several processes may read and write one store at once (WAL, a busy
  timeout; each ``put_many`` is one short transaction). Opening retries,
  for up to the busy timeout, while another process holds a lock the busy
  timeout does not wait for (two processes making one new store at once
  race to switch it to WAL, and the loser gets "database is locked" at
  once); a store still locked after that is said to be locked, not damaged.
* A result replaces a stored one unless it is a retryable error and the
  stored one is not: a transient failure never hides a good answer.
* A process killed mid-write leaves the store as of its last commit (SQLite
  drops a torn WAL tail itself). A file that is not a readable database, or a
  place the store cannot be written, raises ``StoreError`` (a usage error,
  exit code 2) naming the file, at ``open``, before any request is sent.

Used by the run pipeline (through ``batchrun.reuse``) and open to other
modes (batch mode): ``open_store``, ``get``, ``put_many``, ``put_rows``.
"""

from __future__ import annotations

import errno
import functools
import itertools
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from batchrun.errors import DiskError, UsageError

__all__ = [
    "STORE_FILE",
    "ResultStore",
    "StoreError",
    "StoreRow",
    "StoreStats",
    "Stored",
    "open_store",
    "store_row",
]

STORE_FILE = "results.sqlite"
SCHEMA_VERSION = 1

# Milliseconds a writer waits for another process's transaction to end.
BUSY_TIMEOUT_MS = 30_000

# Waits between attempts to open a store another process holds locked:
# seconds, random up to doubling bounds (concurrent openers spread out).
_OPEN_WAIT = wait_random_exponential(multiplier=0.005, max=0.5)
# Opening gives up after the busy timeout, or this many attempts.
_OPEN_ATTEMPTS = 1_000

# Page cache per open store, KiB: keeps the upper levels of the key index
# in memory for random inserts; bounded whatever the store's size.
CACHE_KIB = 16_384

# Page size of a new store, bytes (a store keeps the size it was made with).
# Records are a few hundred bytes: 8 KiB pages cut the pages a commit writes,
# and with them the store's write time, by about a sixth against SQLite's 4 KiB.
PAGE_BYTES = 8192

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    record BLOB NOT NULL,
    ok INTEGER NOT NULL,
    retryable INTEGER NOT NULL,
    cost REAL,
    created REAL NOT NULL
)
"""

# Rows put by one INSERT statement. SQLite's cost is mostly per statement:
# 128 rows at once cost less than half as much per row as one at a time.
# 128 rows are 768 parameters, under the 999 that the oldest SQLite builds allow.
ROWS_PER_STATEMENT = 128

_COLUMNS = "results (key, record, ok, retryable, cost, created)"


@functools.lru_cache(maxsize=16)
def _values(rows: int) -> str:
    return ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)


@functools.lru_cache(maxsize=16)
def _add(rows: int) -> str:
    """An insert of ``rows`` rows that skips those whose key is stored (or
    repeated within it). It cannot fail half-way, so SQLite keeps no
    statement journal for it: a multi-row upsert writes the old content of
    every page it touches to one, which at a million stored results is more
    bytes than the results themselves. Most rows are new: ``_put`` follows
    only for a statement that skipped some."""
    return f"INSERT OR IGNORE INTO {_COLUMNS} VALUES {_values(rows)}"


@functools.lru_cache(maxsize=16)
def _put(rows: int) -> str:
    """An upsert of ``rows`` rows, each by the replace rule (module docstring).
    SQLite takes a statement's rows in order: of two under one key, the later
    one is the one kept (if the rule lets it replace the first); a row that
    ``_add`` inserted just before is replaced by itself. Called with powers
    of two only (``_statements``), so a handful of texts, each compiled once
    by the connection's statement cache."""
    return f"""
INSERT INTO {_COLUMNS} VALUES {_values(rows)}
ON CONFLICT (key) DO UPDATE SET
    record = excluded.record, ok = excluded.ok, retryable = excluded.retryable,
    cost = excluded.cost, created = excluded.created
WHERE results.retryable = 1 OR excluded.retryable = 0
"""


class StoreError(UsageError):
    """A store that cannot be read or written; the message names the file."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored result.

    ``record`` is the output record (JSON, no newline) as first written, with
    the line and custom_id of the row that paid for it; ``ok`` says it is an
    answer, else a row error, ``retryable`` whether that error was transient;
    ``cost`` is what it cost (None when no prices were set); ``created`` is
    when it was stored (Unix seconds).
    """

    record: bytes
    ok: bool
    retryable: bool
    cost: float | None
    created: float


# A result as the store's columns: (key, record, ok, retryable, cost,
# created), ``ok`` and ``retryable`` 0 or 1; what ``put_rows`` takes, so
# that bulk callers need not build a ``Stored`` per result.
StoreRow = tuple[bytes, bytes, int, int, float | None, float]
_KEY_OF_ROW = operator.itemgetter(0)


def store_row(key: bytes, result: Stored) -> StoreRow:
    """``result`` under ``key`` as the store's columns."""
    return (key, result.record, int(result.ok), int(result.retryable), result.cost, result.created)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store holds: counts, recorded cost, age range (Unix seconds), bytes on disk."""

    path: str
    results: int
    ok: int
    errors: int
    retryable: int
    cost: float
    oldest: float | None
    newest: float | None
    bytes: int


class ResultStore:
    """An open store; see the module docstring. Not thread-safe: one event loop."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    def get(self, key: bytes) -> Stored | None:
        """The result stored under ``key``, or None."""
        try:
            row = self._db.execute(
                "SELECT record, ok, retryable, cost, created FROM results WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, exc) from None
        if row is None:
            return None
        return Stored(bytes(row[0]), bool(row[1]), bool(row[2]), row[3], row[4])

    def put_many(self, items: Iterable[tuple[bytes, Stored]]) -> None:
        """Store ``(key, result)`` pairs in one transaction (see the replace rule)."""
        self.put_rows([store_row(key, result) for key, result in items])

    def put_rows(self, rows: list[StoreRow]) -> None:
        """Store ``rows`` (see ``StoreRow``) in one transaction (see the replace
        rule); sorts ``rows`` in place."""
        if not rows:
            return
        # In key order: consecutive inserts then touch neighbouring index pages.
        # Stable: of two results under one key, the later one is put last.
        rows.sort(key=_KEY_OF_ROW)
        self.put_sorted(rows)

    def put_sorted(self, rows: Iterable[StoreRow]) -> None:
        """Store ``rows``, given in key order, in one transaction (see the
        replace rule); they are read one at a time."""
        try:
            with self._db:
                for chunk in _chunks(rows):
                    for start, size in _statements(len(chunk)):
                        values = list(itertools.chain.from_iterable(chunk[start : start + size]))
                        if self._db.execute(_add(size), values).rowcount != size:
                            self._db.execute(_put(size), values)
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, exc) from None

    def is_empty(self) -> bool:
        """Whether the store holds no result at all."""
        return self._db.execute("SELECT 1 FROM results LIMIT 1").fetchone() is None

    def stats(self) -> StoreStats:
        """Counts and sums over the whole store (one scan; constant memory)."""
        row = self._db.execute(
            "SELECT count(*), sum(ok), sum(retryable), total(cost), min(created), max(created)"
            " FROM results"
        ).fetchone()
        count, ok, retryable = row[0], row[1] or 0, row[2] or 0
        size = sum(
            p.stat().st_size
            for p in (self.path, _sidecar(self.path, "-wal"), _sidecar(self.path, "-shm"))
            if p.exists()
        )
        return StoreStats(
            path=str(self.path),
            results=count,
            ok=ok,
            errors=count - ok,
            retryable=retryable,
            cost=float(row[3]),
            oldest=row[4],
            newest=row[5],
            bytes=size,
        )

    def prune(self, older_than_s: float, *, now: float | None = None) -> int:
        """Delete results stored more than ``older_than_s`` seconds ago; how many went."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._db:
            deleted = self._db.execute("DELETE FROM results WHERE created < ?", (cutoff,)).rowcount
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(deleted)

    def close(self) -> None:
        self._db.close()


def _statements(rows: int) -> Iterator[tuple[int, int]]:
    """``(start, size)`` of each statement that puts ``rows`` (at most
    ``ROWS_PER_STATEMENT``) rows: the largest powers of two first. A short
    chunk (a run's commits are a few hundred rows) costs a few statements
    instead of one per row."""
    start = 0
    while start < rows:
        size = 1 << ((rows - start).bit_length() - 1)
        yield start, size
        start += size


def _chunks(rows: Iterable[StoreRow]) -> Iterator[list[StoreRow]]:
    """``rows`` in lists of ``ROWS_PER_STATEMENT`` (the last one shorter)."""
    rest = iter(rows)
    while chunk := list(itertools.islice(rest, ROWS_PER_STATEMENT)):
        yield chunk


def open_store(
    path: Path, *, durable: bool = True, sleep: Callable[[float], None] = time.sleep
) -> ResultStore:
    """Open (creating it and its directory if needed) the store at ``path``.

    ``durable``: commits survive a power loss (else only a process crash,
    which is enough where a journal holds the same results). While another
    process holds the store locked, tries again (``sleep`` waits, seconds)
    for up to the busy timeout. Raises ``StoreError`` when the directory or
    file cannot be created or written, the store stays locked, or the file
    is not a batchrun result store.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the result store's directory {path.parent}: {exc}"
        ) from None
    attempts = Retrying(
        stop=stop_after_delay(BUSY_TIMEOUT_MS / 1000) | stop_after_attempt(_OPEN_ATTEMPTS),
        wait=_OPEN_WAIT,
        retry=retry_if_exception(_is_locked),
        sleep=sleep,
        reraise=True,
    )
    try:
        db = attempts(_connect, path, durable=durable)
    except sqlite3.OperationalError as exc:  # only a lock is left unmapped
        raise _locked(path, exc) from None
    db.isolation_level = "DEFERRED"  # ``with db`` makes one transaction per put_many
    return ResultStore(path, db)


def _connect(path: Path, *, durable: bool) -> sqlite3.Connection:
    """One attempt at opening: a prepared connection, or the raw
    ``sqlite3.OperationalError`` of a lock (see ``_is_locked``) to try again."""
    try:
        db = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
        )
    except sqlite3.Error as exc:
        if _is_locked(exc):
            raise
        raise StoreError(f"cannot write the result store {path}: {exc}") from None
    try:
        _prepare(db, path, durable=durable)
    except BaseException:
        db.close()  # also ends a transaction a lock interrupted
        raise
    return db


def _prepare(db: sqlite3.Connection, path: Path, *, durable: bool) -> None:
    """WAL mode, the schema, and proof that this process can write here."""
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the result store {path} was written by a newer batchrun"
                f" (schema {version}); upgrade batchrun or use another store"
            )
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        db.execute(f"PRAGMA page_size = {PAGE_BYTES}")  # before WAL: no effect on a made store
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'NORMAL' if durable else 'OFF'}")
        db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails here if read-only
        _check_own(db, path)
        db.execute(_SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
        _check_columns(db, path)
    except sqlite3.OperationalError as exc:
        if _is_locked(exc):
            raise  # no damage: ``open_store`` tries again
        if "readonly" in str(exc) or "unable to open" in str(exc):
            raise StoreError(f"cannot write the result store {path}: {exc}") from None
        raise _damaged(path, exc) from None
    except sqlite3.DatabaseError as exc:
        raise _damaged(path, exc) from None


def _check_own(db: sqlite3.Connection, path: Path) -> None:
    """Refuse another program's database: batchrun's table is not added to it."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    others = sorted(tables - {"results"})
    if others:
        raise StoreError(
            f"{path} is not a batchrun result store (it holds other tables: {', '.join(others)});"
            " give --cache a directory of its own"
        )


def _check_columns(db: sqlite3.Connection, path: Path) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
    if not {"key", "record", "ok", "retryable", "cost", "created"} <= columns:
        raise StoreError(f"{path} is not a batchrun result store (its results table differs)")


def _is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (or "table is
    locked"): another connection's lock, not a fault of the file."""
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return isinstance(exc, sqlite3.OperationalError) and primary in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


def _locked(path: Path, exc: sqlite3.Error) -> StoreError:
    return StoreError(
        f"the result store {path} stayed locked by another process for over"
        f" {BUSY_TIMEOUT_MS / 1000:g} s ({exc}); it is not damaged: run again when that"
        " process is done"
    )


def _damaged(path: Path, exc: sqlite3.Error) -> StoreError | DiskError:
    """The error to raise for a failed store operation: a full disk or an I/O
    error is no damage (the run stops resumably, exit 74), nor is a lock held
    past the busy timeout."""
    if _is_locked(exc):
        return _locked(path, exc)
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        code = errno.ENOSPC if primary == sqlite3.SQLITE_FULL else errno.EIO
        return DiskError(path, OSError(code, os.strerror(code)))
    if primary == sqlite3.SQLITE_CANTOPEN:  # a file it could not open is no damage
        return StoreError(
            f"cannot open a file of the result store {path} ({exc}): the process may be"
            " out of open files (ulimit -n), or the directory is gone or not writable;"
            " the store itself is kept"
        )
    return StoreError(
        f"the result store {path} is damaged ({exc}); move it away (a new one is made)"
        " or, for an output's own store, run again with --restart"
    )


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)
