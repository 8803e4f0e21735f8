"""The record of a batch-mode run's parts and batches, in ``OUT.batchrun/batch/``.

* ``state.json``: the run id, where the batches live, and every part with its
  provider file and batch ids; rewritten atomically at every change, so the
  file always tells what exists on the provider (up to one step behind: a
  file uploaded or a batch created but not yet recorded, which the next run
  finds by listing batches and matching their metadata).
* ``part-N.jsonl``: part N's batch input file, exactly as uploaded.
* ``part-N.ids``: its rows' input lines and the input's own ``custom_id``s.
* ``part-N.keys``: their content keys (32 bytes each, in the same order).
* ``part-N.results``: its rows' output records, ordered by line, written
  (atomically) when the batch ended; a part with this file is settled. An
  answer's record may follow a head with its line and tokens (see ``known``).

A part goes ``planned`` (file written) → ``uploaded`` (input file id) →
``submitted`` (batch id) → ``collected`` (results written), or ``refused``
when the provider refused its file as a whole (only ``--restart`` goes on). A batch that
failed on the enqueued-token limit sends its part back to ``uploaded`` with
``tries`` + 1; an expired one becomes ``collected`` and its unfinished rows
go into a new part whose ``parent`` it is, one more in ``rounds``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchrun import crashpoint
from batchrun.errors import CorruptStateError, disk_writes
from batchrun.settings import PROVIDERS

# Provider statuses after which a batch changes no more.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Every status the batches API documents; another is polled on like a running one.
STATUSES = TERMINAL | {"validating", "in_progress", "finalizing", "cancelling"}
# Part statuses after which a run does nothing more with a part: its answers
# are all in the result store, or the provider refused its file.
SETTLED = frozenset({"collected", "refused"})
# What a part can be (see the module docstring): a record with another
# status is damaged, and a run would wait on such a part for ever.
PART_STATUSES = frozenset({"planned", "uploaded", "submitted", "collected", "refused"})
# The ``batch_status`` ``batchrun cancel`` gives an uploaded part it found no
# batch for: no batch can run for it unrecorded.
NOT_CREATED = "not created"


@dataclass(slots=True)
class Part:
    """One batch input file and what became of it."""

    id: int
    endpoint: str
    model: str | None
    rows: int
    bytes: int
    status: str = "planned"  # one of PART_STATUSES
    input_file_id: str | None = None
    batch_id: str | None = None
    batch_status: str | None = None
    tries: int = 0  # batches refused for the enqueued-token limit
    parent: int | None = None  # the expired part whose unfinished rows this resubmits
    rounds: int = 0  # batches that ended leaving this part's rows unfinished
    counts: dict[str, int] = field(default_factory=dict)  # the provider's request_counts
    result_files: list[str] = field(default_factory=list)  # to delete on the provider
    online: int = 0  # unfinished rows left to online mode (--fallback online)
    refusal: str | None = None  # why the provider refused the whole file (status "refused")
    # An upload of its file began and may have reached the provider (it is
    # "uploaded" only once its file id is recorded).
    upload_started: bool = False

    @property
    def live(self) -> bool:
        """Submitted and not yet collected: paid work on the provider."""
        return self.status == "submitted"

    def seen(self, batch: Mapping[str, Any]) -> None:
        """Record what the provider says of this part's batch: its status and
        request counts (the whole numbers >= 0: a count below zero is no
        count; absent counts leave the last ones)."""
        self.batch_status = str(batch.get("status"))
        given = batch.get("request_counts")
        if isinstance(given, dict):
            self.counts = {
                key: value for key, value in given.items() if type(value) is int and value >= 0
            }


@dataclass(slots=True)
class BatchState:
    """The whole record; ``planned`` is true once every part is written."""

    run_id: str
    provider: str
    base_url: str
    api_key_env: str | None
    planned: bool = False
    parts: list[Part] = field(default_factory=list)


def _well_formed(state: BatchState) -> bool:
    """Whether every field holds what ``save`` writes there."""
    texts = (state.run_id, state.provider, state.base_url)
    key_env = state.api_key_env is None or isinstance(state.api_key_env, str)  # cancel reads it
    return (
        all(isinstance(text, str) for text in texts)
        and state.provider in PROVIDERS  # cancel speaks its dialect
        and key_env
        and all(map(_part_ok, state.parts))
    )


def _part_ok(part: Part) -> bool:
    counts = (part.id, part.rows, part.bytes, part.tries, part.rounds, part.online)
    ids = (part.model, part.input_file_id, part.batch_id, part.batch_status, part.refusal)
    return (
        all(type(n) is int and n >= 0 for n in counts)
        and isinstance(part.status, str)  # first: a list or an object is unhashable
        and part.status in PART_STATUSES
        # A live part is polled by its batch id: without one a run could not poll it.
        and (part.status != "submitted" or bool(part.batch_id))
        and isinstance(part.endpoint, str)
        and all(i is None or isinstance(i, str) for i in ids)
        and (part.parent is None or type(part.parent) is int)
        and isinstance(part.counts, dict)
        and all(type(n) is int for n in part.counts.values())
        and type(part.upload_started) is bool
        and isinstance(part.result_files, list)
        and all(isinstance(f, str) for f in part.result_files)
    )


class BatchRecord:
    """Reads and rewrites ``OUT.batchrun/batch/``."""

    def __init__(self, state_root: Path) -> None:
        self.root = state_root / "batch"
        self.path = self.root / "state.json"

    def exists(self) -> bool:
        return self.path.exists()

    def new(self, *, provider: str, base_url: str, api_key_env: str | None) -> BatchState:
        """A fresh record with a new run id (leftover part files are discarded)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        return BatchState(secrets.token_hex(8), provider, base_url, api_key_env)

    def load(self) -> BatchState | None:
        """The record; None when there is none; ``CorruptStateError`` when it
        is not one ``save`` wrote (a field of another type included)."""
        try:
            data = orjson.loads(self.path.read_bytes())
            parts = [Part(**part) for part in data.pop("parts")]
            state = BatchState(**data, parts=parts)
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError, IsADirectoryError):
            raise _damaged(self.path) from None
        except NotADirectoryError:
            if not self.root.parent.is_dir():
                raise  # the state directory itself is a file: named as such
            # A file in place of batch/: whatever record it held is lost, as
            # with a damaged state.json (--restart would loop on this error).
            raise _damaged(self.path) from None
        if not _well_formed(state):
            raise _damaged(self.path, " (a field of the wrong type)")
        return state

    def save(self, state: BatchState) -> None:
        """Replace the record in one atomic, durable step."""
        _write_atomic(self.path, orjson.dumps(asdict(state), option=orjson.OPT_INDENT_2))

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root)

    def file(self, part: int, suffix: str) -> Path:
        return self.root / f"part-{part:06d}.{suffix}"

    def read_ids(self, part: int) -> dict[int, str]:
        """Part ``part``'s input lines and their own ``custom_id``s."""
        path = self.file(part, "ids")
        try:
            # Written by ``write_ids`` as [int, str] pairs (orjson's
            # JSONDecodeError is a ValueError).
            ids = dict(orjson.loads(path.read_bytes()))
        except (TypeError, ValueError, FileNotFoundError, IsADirectoryError):
            raise _damaged(path) from None
        # An object, or pairs of other types, would fail deep in collecting.
        if not all(type(line) is int and type(given) is str for line, given in ids.items()):
            raise _damaged(path, " (a field of the wrong type)")
        return ids

    def write_ids(self, part: int, ids: Iterable[tuple[int, str]]) -> None:
        _write_atomic(self.file(part, "ids"), orjson.dumps(list(ids)))

    def write_keys(self, part: int, keys: Iterable[bytes]) -> None:
        _write_atomic(self.file(part, "keys"), b"".join(keys))

    def read_keys(self, part: int, lines: Iterable[int]) -> dict[int, bytes]:
        """Part ``part``'s content keys by line (``lines``: its ids' order)."""
        path = self.file(part, "keys")
        lines = list(lines)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise _damaged(path) from None
        # Of another length, answers would be filed under keys no request has.
        if len(data) != 32 * len(lines):
            raise _damaged(path, f" ({len(data)} bytes, not 32 for each of {len(lines)} rows)")
        return {line: data[32 * n : 32 * n + 32] for n, line in enumerate(lines)}

    def write_results(self, part: int, chunks: Iterable[bytes | memoryview]) -> None:
        """Part ``part``'s output records, given in line order, in one atomic step."""
        _write_atomic(self.file(part, "results"), chunks)

    def results(self, state: BatchState) -> Iterator[Path]:
        """The results files of collected parts."""
        for part in state.parts:
            path = self.file(part.id, "results")
            if part.status == "collected" and path.exists():
                yield path


def _damaged(path: Path, what: str = "") -> CorruptStateError:
    """The error of a batch record batchrun cannot read, and what to do. No
    command drops such a record on its own: batches it names may be running,
    paid, with answers to collect."""
    return CorruptStateError(
        f"{path} is damaged{what}; batches it names may still run on the provider,"
        " paid: find them there (a batch's metadata batchrun_run names its run; the"
        " uploaded files are named batchrun-RUN-part-N.jsonl), cancel or keep them, then"
        f" delete the directory {path.parent} to go on (answers already collected stay"
        " in the result store; rows of batches not collected are sent again)"
    )


def _write_atomic(path: Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Replace ``path`` with ``data`` durably; ``DiskError`` on a full disk
    or an I/O error (the old file stays)."""
    fresh = path.with_name(path.name + ".new")
    with disk_writes(path):
        fault = crashpoint.disk_fault("batch")
        if fault is not None:
            raise fault
        with fresh.open("wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                handle.writelines(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(fresh, path)


def upload_name(state: BatchState, part: Part) -> str:
    """The file name a part is uploaded under: names the run and the part."""
    return f"batchrun-{state.run_id}-part-{part.id}.jsonl"


def load_any(state_root: Path) -> BatchState | None:
    """The batch record beside an output, if there is one (for status and guards)."""
    return BatchRecord(state_root).load()


__all__ = ["TERMINAL", "BatchRecord", "BatchState", "Part", "load_any"]
