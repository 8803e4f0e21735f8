"""The answers a run can reuse: its output's own store and the shared cache.

``Answers`` is what the run's parts talk to: the row source finds a row's
stored result by content key (the output's store first, then ``--cache``),
and the workers hand it every new result for both, which it buffers and
commits in batches (the ordered writer also commits at its flushes and
checkpoints).

What is reused: answers and permanent row errors; a retryable error only when
the run does not resend them (``--retry-failed``). The shared cache never
takes retryable errors: a transient failure is no answer to share. With a
response schema, an answer is reused only if it passes the run's check
(``judge``), whatever schema it was stored under.

Commits run on the event loop's thread: a batch of a few hundred rows
takes a millisecond or two, and a writer thread would cost more in
contention for the interpreter than it saves. Crash safety rests on the
journal, not on the buffer: every result is
journaled with its key the moment it arrives, the journal writes it out
before any commit (``before_commit``), ``flush`` runs before each journal
compaction, and a resume feeds the journal's keyed results back in
(``salvage``). So a result is always in the journal or in the store, and
in the store only once the journal has it.

A row that repeats an earlier row of the same run finds that row's result
too: before its commit (the results not yet committed are looked up in
memory) and after it (a ``KeyFilter`` of the keys looked up so far tells
which rows may repeat one, so a first run still queries the store only for
those). A row whose twin is still in flight is the workers' affair
(``twins``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from batchrun.errors import RequestError, TransientError
from batchrun.keyfilter import KeyFilter
from batchrun.records import Outcome, Response, failed_outcome, output_line
from batchrun.store import STORE_FILE, ResultStore, Stored, StoreRow, open_store, store_row

__all__ = [
    "FLUSH_EVERY",
    "Answers",
    "Judge",
    "open_answers",
    "relabel",
    "stored_from_record",
    "vetted",
]

# An answer's parsed JSON as the run's check reads it; raises ``RequestError``
# when the answer fails the check (``schema.AnswerCheck.judge``).
Judge = Callable[[Response], Any]

# Results buffered before a commit; the pipeline also flushes on a timer.
FLUSH_EVERY = 2_000
# Bytes of records buffered before a commit: large answers must not pile up
# here between timer flushes (the reorder window's byte bound counts only
# the results waiting for an earlier row).
FLUSH_BYTES = 4 << 20


class Answers:
    """The stores of one run; see the module docstring."""

    def __init__(
        self, local: ResultStore, cache: ResultStore | None, *, resend_retryable: bool = False
    ) -> None:
        self.local = local
        self.cache = cache
        self.resend_retryable = resend_retryable
        # Off while both stores are empty: a first run pays no lookups.
        self.lookup = cache is not None or not local.is_empty()
        self._local_batch: list[StoreRow] = []
        self._cache_batch: list[StoreRow] = []
        self._batch_bytes = 0  # record bytes in the local batch
        # The local batch by key (the results not committed yet), and every
        # key this run looked up (``find``): while ``lookup`` is off, only a
        # row that may repeat an earlier one is looked up at all.
        self._fresh: dict[bytes, StoreRow] = {}
        self._seen = KeyFilter()
        self._flush_rows, self._flush_bytes = FLUSH_EVERY, FLUSH_BYTES
        # Called before every commit of new results: the run's journal writes
        # out the records it still holds (``OrderedWriter`` sets it). Else a
        # kill right after a commit could leave a result in the store and not
        # in the journal, and the resumed run would take it for a reused
        # answer (its record marked so) instead of its own.
        self.before_commit: Callable[[], None] = _nothing
        # The run's answer check (``--response-schema``): a stored answer is
        # reused only if it passes, with ``parsed`` as this run reads it; the
        # content key does not always tell the schema (a line's own
        # response_format, DashScope's json_object).
        self.judge: Judge | None = None

    def find(self, key: bytes) -> Stored | None:
        """The reusable result stored under ``key``, or None (then: send it)."""
        if not (self.lookup or self._seen.add(key)):
            return None  # no earlier row of this run had it: nothing stored, nothing fresh
        fresh = self._fresh.get(key)
        if fresh is not None:
            return self._usable(_stored(fresh))
        found = self._usable(self.local.get(key))
        if found is None and self.cache is not None:
            found = self._usable(self.cache.get(key))
            if found is not None:  # the output's store keeps everything its output used
                self._add_local(store_row(key, found))
        return found

    def _usable(self, found: Stored | None) -> Stored | None:
        if found is None or not self.reusable(retryable=found.retryable):
            return None
        if self.judge is not None and found.ok:
            return vetted(found, self.judge)
        return found

    def reusable(self, *, retryable: bool) -> bool:
        """Whether a result (an answer or an error, ``retryable`` or not) is
        reused rather than sent again: all are, but a retryable error when the
        run resends them (``--retry-failed``)."""
        return not (retryable and self.resend_retryable)

    def add(self, key: bytes, result: Stored) -> None:
        """Take a new result (committed by the next ``flush``)."""
        self.add_row(store_row(key, result))

    def add_row(self, row: StoreRow) -> None:
        """Take a new result as the store's columns (committed by the next ``flush``)."""
        self._seen.add(row[0])  # its key may never have been looked up here
        self._take(row)

    def add_outcome(self, key: bytes, line: bytes, outcome: Outcome) -> None:
        """Take a row's new result: its output ``line`` and ``outcome``;
        ``key`` was looked up (``find``) when the row was read."""
        # The store's columns at once, without a ``Stored`` per row; the
        # time is wall time: what ``cache prune --older-than`` compares.
        record = line.rstrip(b"\n")
        self._take(
            (key, record, int(outcome.ok), int(outcome.retryable), outcome.cost, time.time())
        )

    def _take(self, row: StoreRow) -> None:
        self._add_local(row)
        if self.cache is not None and not row[3]:  # no retryable error is shared
            self._cache_batch.append(row)

    def _add_local(self, row: StoreRow) -> None:
        self._local_batch.append(row)
        key, kept = row[0], self._fresh.get(row[0])
        if kept is None or kept[3] or not row[3]:  # the store's replace rule
            self._fresh[key] = row
        self._batch_bytes += len(row[1])
        if len(self._local_batch) >= self._flush_rows or self._batch_bytes >= self._flush_bytes:
            self.flush()

    def put_sorted(self, rows: Callable[[], Iterable[StoreRow]]) -> None:
        """Store the rows ``rows()`` gives, in key order, at once: one commit
        per store, read one at a time (batch mode files a part's answers so,
        see ``batchmode.filing``). Buffered results are committed first."""
        self.flush()
        self.local.put_sorted(rows())
        if self.cache is not None:
            self.cache.put_sorted(row for row in rows() if not row[3])  # no retryable errors
        # Rows left out of the batches as repeats of a planned one find their
        # answers here: from now on every row is looked up.
        self.lookup = True

    def salvage(self, keyed: Iterable[tuple[bytes, bytes]]) -> None:
        """Take journaled ``(key, output line)`` pairs of an earlier run, and commit."""
        now = time.time()
        for key, line in keyed:
            result = stored_from_record(line, now)
            if result is not None:
                self.add(key, result)
        self.flush()
        self.lookup = self.lookup or not self.local.is_empty()

    def flush(self) -> None:
        """Commit the buffered results (one transaction per store)."""
        if self._local_batch:
            self.before_commit()
        batch, self._local_batch = self._local_batch, []
        self._batch_bytes = 0
        self.local.put_rows(batch)
        self._fresh.clear()
        if self.cache is not None:
            batch, self._cache_batch = self._cache_batch, []
            self.cache.put_rows(batch)

    def close(self) -> None:
        """Flush, then close both stores."""
        try:
            self.flush()
        finally:
            self.local.close()
            if self.cache is not None:
                self.cache.close()


def _nothing() -> None:
    """The default ``before_commit``: no journal to write out."""


def open_answers(
    state_root: Path, cache_dir: Path | None, *, resend_retryable: bool, durable: bool = False
) -> Answers:
    """Open the output's store in ``state_root`` and the cache in ``cache_dir``.

    ``durable``: the output's own store survives a power loss too (the
    shared cache always does; the output's has the journal behind it).
    Raises ``StoreError`` (exit code 2) when either can't be written or read.
    """
    cache = open_store(cache_dir / STORE_FILE) if cache_dir is not None else None
    try:
        local = open_store(state_root / STORE_FILE, durable=durable)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    return Answers(local, cache, resend_retryable=resend_retryable)


def vetted(found: Stored, judge: Judge) -> Stored | None:
    """Stored answer ``found`` with ``parsed`` as ``judge`` reads it now, or
    None when it fails ``judge`` in a way a fresh answer would be retried
    for: then the row is sent again. One that fails for good (cut off at the
    token limit: a resend pays for the same cut) is reused as that failure."""
    data = orjson.loads(found.record)
    response = data.get("response")
    if not isinstance(response, dict) or type(response.get("status_code")) is not int:
        return None
    request_id = response.get("request_id")
    answer = Response(
        status_code=response["status_code"],
        request_id=request_id if isinstance(request_id, str) else None,
        body=response.get("body"),
    )
    try:
        data["parsed"] = judge(answer)
    except TransientError:
        return None
    except RequestError as exc:
        return _failed_for_good(found, data, exc)
    return dataclasses.replace(found, record=orjson.dumps(data))


def _failed_for_good(found: Stored, data: dict[str, Any], exc: RequestError) -> Stored:
    """``found``'s answer recorded as the row error ``exc``, the answer kept,
    as a run checking it when it came would have recorded it."""
    attempts = data.get("attempts")
    outcome = failed_outcome(
        int(data.get("line") or 0),
        str(data.get("custom_id") or ""),
        exc,
        attempts=attempts if type(attempts) is int else 1,
    )
    outcome.cost = found.cost
    record = output_line(outcome).rstrip(b"\n")
    return dataclasses.replace(found, record=record, ok=False, retryable=False)


def _stored(row: StoreRow) -> Stored:
    _key, record, ok, retryable, cost, created = row
    return Stored(record, bool(ok), bool(retryable), cost, created)


def stored_from_record(line: bytes, created: float) -> Stored | None:
    """A result to store from an output line; None for one not worth storing
    (unreadable, or an error without a request behind it, such as a bad line)."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("reused"):
        return None
    error = data.get("error")
    if isinstance(error, dict) and not data.get("attempts"):
        return None  # never sent: nothing was paid, nothing to reuse
    cost = data.get("cost")
    return Stored(
        record=line.rstrip(b"\n"),
        ok=not isinstance(error, dict),
        retryable=isinstance(error, dict) and bool(error.get("retryable")),
        cost=float(cost) if isinstance(cost, int | float) else None,
        created=created,
    )


def relabel(record: bytes, line: int, custom_id: str) -> bytes:
    """A stored record as this run's output line for row ``line``: this row's
    ``id``, ``line`` and ``custom_id``, and ``"reused": true``."""
    data = orjson.loads(record)
    data["id"] = f"batch_req_{line}"
    data["custom_id"] = custom_id
    data["line"] = line
    data["reused"] = True
    return orjson.dumps(data, option=orjson.OPT_APPEND_NEWLINE)
