"""The state directory beside an output: lock, fingerprint, checkpoint, marker.

``OUT.batchrun/`` holds everything of a run in progress:

* ``lock``: held (``flock``) by the running process; it dies with the process,
  SIGKILL included. Its text names the holder.
* ``meta.json``: the fingerprint of the input and of the request-shaping
  settings; with other ones, a run starts a new pass that reuses answers by
  content instead of resuming by position.
* ``results.sqlite``: every result by its request's content key (see
  ``batchrun.store``); kept after the run, dropped by ``--restart``.
* ``output.partial``: the ordered output so far (see ``writer.OutputFile``).
* ``journal``: results not yet in the ordered output (see ``journal``).
* ``checkpoint.json``: how far the ordered output had come at the last
  compaction, and where in the input that was, so a resume seeks there.
* ``finished.json``: the run is done; its exit code, for no-op re-runs.
* ``batch/``: batch mode's parts and batches (see ``batchmode.record``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson

from batchrun.config import RunConfig, Shard
from batchrun.errors import CorruptStateError, LockedError, UsageError, disk_writes
from batchrun.journal import begun_marks
from batchrun.layout import META_FILE, partial_output, state_dir
from batchrun.settings import PROVIDERS
from batchrun.stats import COUNTS_KEYS, Counted, Counts, Summary
from batchrun.store import STORE_FILE


@dataclass(slots=True)
class Checkpoint(Counted):
    """The ordered output's extent at a compaction, and what it held.

    ``rows`` rows fill the first ``output_bytes`` bytes of ``output.partial``.
    Input line ``input_line + 1`` starts at byte ``input_offset`` of the
    (decompressed) input, with ``input_line <= rows``: a resume seeks there.
    ``counts`` counts those rows; its ``cost`` is what was spent on them
    (reused rows cost nothing). ``in_doubt``: rows resent after a crash,
    over all resumes.
    """

    rows: int = 0
    output_bytes: int = 0
    input_line: int = 0
    input_offset: int = 0
    counts: Counts = field(default_factory=Counts)
    in_doubt: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``checkpoint.json``: one flat object, its keys a
        contract (older versions' state directories resume with them)."""
        counts = self.counts.to_dict()
        cost = counts.pop("cost")
        return {
            "rows": self.rows,
            "output_bytes": self.output_bytes,
            "input_line": self.input_line,
            "input_offset": self.input_offset,
            **counts,
            "in_doubt": self.in_doubt,
            "cost": cost,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        """``to_dict``'s reverse; a missing key is 0 (older versions wrote
        fewer). Raises TypeError for a key it does not know."""
        place = {key: value for key, value in data.items() if key not in COUNTS_KEYS}
        return cls(**place, counts=Counts.from_dict(data))


class FinishedRun(NamedTuple):
    """``finished.json``: the summary of a run that completed, and when
    (local time, ISO 8601; None if not recorded)."""

    summary: Summary
    at: str | None


class StateDir:
    """Paths and small files of one output's state directory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.root = state_dir(out)
        self.lock_path = self.root / "lock"
        self.meta_path = self.root / META_FILE
        self.checkpoint_path = self.root / "checkpoint.json"
        self.finished_path = self.root / "finished.json"
        self.journal_path = self.root / "journal"
        self.partial_path = partial_output(out)
        self.batch_path = self.root / "batch"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the lock or raise ``LockedError`` naming the holder."""
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"another run holds {self.out} ({self.holder() or 'holder unknown'}); not starting"
            ) from None
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._lock_fd = fd

    def _open_lock(self) -> int:
        """The lock file, made if missing (with the state directory). One
        that cannot be opened is a ``UsageError`` naming it: every command
        that takes the lock says it in one line, never as a traceback. (A
        path too long, or a loop of links: the command line names it so.)"""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise CorruptStateError(f"the state directory {self.root} is not a directory") from None
        except PermissionError as exc:
            raise UsageError(
                f"cannot make the state directory {self.root}: {exc.strerror}"
            ) from None
        try:
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            # --restart keeps the lock file, so it would not help: say what would.
            raise CorruptStateError(
                f"{self.lock_path} is a directory, not batchrun's lock file: the state"
                " directory is damaged; remove that directory, then run again"
            ) from None
        except PermissionError as exc:
            raise UsageError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror}"
            ) from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def holder(self) -> str | None:
        """Who holds or last held the lock, as its text says."""
        try:
            # Replaced, not refused: undecodable text names no one, and is no error.
            text = self.lock_path.read_bytes().decode(errors="replace")
        except OSError:
            return None
        return text.strip() or None

    def is_locked(self) -> bool:
        """Whether a live process holds the lock now (takes nothing)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except PermissionError as exc:  # whether a run is live is unknown
            raise UsageError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def read_meta(self) -> dict[str, Any] | None:
        """The run's fingerprint (``fingerprint``, and its ``pass``), each
        field it holds of the type ``fingerprint`` writes; None when there is none."""
        return _read_json(self.meta_path, _META_FIELDS)

    def write_meta(self, meta: dict[str, Any]) -> None:
        _write_json_atomic(self.meta_path, meta)

    def read_checkpoint(self) -> Checkpoint:
        data = _read_json(self.checkpoint_path, _CHECKPOINT_FIELDS)
        if data is None:
            return Checkpoint()
        try:
            return Checkpoint.from_dict(data)
        except TypeError:  # a key it does not know
            raise _damaged(self.checkpoint_path) from None

    def write_checkpoint(self, checkpoint: Checkpoint) -> None:
        _write_json_atomic(self.checkpoint_path, checkpoint.to_dict())

    def read_finished(self) -> FinishedRun | None:
        """The finished run's summary, or None while the run is not finished."""
        data = _read_json(self.finished_path, _FINISHED_FIELDS)
        if data is None:
            return None
        try:
            summary = Summary.from_dict(data)
        except (TypeError, ValueError):
            raise _damaged(self.finished_path) from None
        return FinishedRun(summary, data.get("finished_at"))

    def write_finished(self, summary: Summary) -> None:
        """Mark the run finished: its summary's keys, and ``finished_at``."""
        _write_json_atomic(self.finished_path, {"finished_at": _now(), **summary.to_dict()})

    def clear(self) -> None:
        """Remove the run's progress: everything but the lock and the result store."""
        for path in (
            self.meta_path,
            self.checkpoint_path,
            self.finished_path,
            self.journal_path,
            self.partial_path,
        ):
            _remove(path)
        shutil.rmtree(self.batch_path, ignore_errors=True)

    def start_pass(self, meta: dict[str, Any], *, in_doubt: set[int], resent: int) -> None:
        """Replace the run's progress with a new pass's (``meta``, from row 0),
        keeping the result store and what is in doubt: ``in_doubt``, the
        lines the last pass left in flight, stay begun marks in the journal,
        and ``resent``, the rows resent after earlier stops, stays in the
        checkpoint, so the next run counts them as a resume would.

        Crash-safe: ``meta.json`` goes first and comes back last, and a run
        that finds none starts a pass again from the same journal and
        checkpoint, which hold the same rows at every step in between."""
        _remove(self.meta_path)
        self.write_checkpoint(Checkpoint(in_doubt=resent))
        _write_atomic(self.journal_path, begun_marks(in_doubt))
        for path in (self.finished_path, self.partial_path):
            _remove(path)
        shutil.rmtree(self.batch_path, ignore_errors=True)
        self.write_meta(meta)

    def drop_results(self) -> None:
        """Remove the output's result store (``--restart``: start from nothing)."""
        for name in (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm"):
            _remove(self.root / name)

    def drop_progress_files(self) -> None:
        """After publishing: the journal, checkpoint and batch record are no longer needed."""
        for path in (self.journal_path, self.checkpoint_path):
            _remove(path)
        shutil.rmtree(self.batch_path, ignore_errors=True)


def fingerprint(config: RunConfig) -> dict[str, Any]:
    """What a resume compares with the run it continues.

    The input is identified by its size and the SHA-256 of all its bytes, so
    any edit is seen. Settings that shape requests are included; limits,
    timeouts and retry settings may change between resumes.
    """
    size, digest = input_identity(config.input)
    return {
        "input": str(config.input.resolve()),
        "input_size": size,
        "input_hash": digest,
        "shard": str(config.shard) if config.shard else None,
        "provider": config.provider,
        "model": config.model,
        "params": orjson.loads(orjson.dumps(dict(config.params), option=orjson.OPT_SORT_KEYS)),
        "response_schema": config.response_schema.digest if config.response_schema else None,
    }


def changed_settings(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What changed since the run began (None: nothing), in words: ``the
    input``, or the first request-shaping setting that differs. The state
    of such a run cannot be resumed by position; its answers are reused by
    content instead (``batchrun.reuse``)."""
    changed = [key for key in _FINGERPRINT_KEYS if stored.get(key) != current.get(key)]
    if not changed:
        return None
    key = changed[0]
    if key.startswith("input"):
        return "the input"
    return f"the setting {key!r} ({stored.get(key)!r} → {current.get(key)!r})"


_FINGERPRINT_KEYS = (
    "input_size",
    "input_hash",
    "shard",
    "provider",
    "model",
    "params",
    "response_schema",
)


def input_identity(path: Path) -> tuple[int, str]:
    """An input file's size in bytes and the SHA-256 (hex) of all its bytes:
    what a run's state records of its input (``fingerprint``)."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
    return path.stat().st_size, digest.hexdigest()


def recorded_input(out: Path) -> Path | None:
    """The input file the run on ``out`` read, as its state records it; None
    when there is no state or it cannot be read."""
    try:
        meta = StateDir(out).read_meta()
    except CorruptStateError:
        return None
    value = meta.get("input") if meta is not None else None
    return Path(value) if isinstance(value, str) else None


def _read_json(path: Path, fields: Mapping[str, _Check]) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when there is none. Each of ``fields``
    it holds is checked here, where it is read: a file edited by hand or
    damaged otherwise is refused by name, not met later as a traceback.
    (A path too long, or a loop of links: the command line names it so.)"""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise _damaged(path, "a directory") from None
    except NotADirectoryError:  # --restart would refuse it too: say what is wrong
        raise CorruptStateError(f"the state directory {path.parent} is not a directory") from None
    except PermissionError as exc:  # not damage: --restart would not help
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError:
        raise _damaged(path) from None
    if not isinstance(data, dict):
        raise _damaged(path, "not a JSON object")
    bad = next((key for key, check in fields.items() if key in data and not check(data[key])), None)
    if bad is not None:
        raise _damaged(path, f"a bad {bad!r}")
    return data


def _damaged(path: Path, why: str | None = None) -> CorruptStateError:
    """The one message of a damaged state file: ``--restart`` starts the
    output over (its state, result store included, removed)."""
    detail = f" ({why})" if why else ""
    return CorruptStateError(f"{path} is damaged{detail}; run again with --restart")


def _remove(path: Path) -> None:
    """Remove a state file if there is one; a directory in its place (a
    damaged state directory) too, so that ``--restart`` mends it."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path)


# Whether a value read from a state file is of its field's type. JSON's true
# and false are no numbers here, though Python's bool is an int.
_Check = Callable[[object], bool]


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def _number(value: object) -> bool:
    return type(value) is int or type(value) is float


def _text(value: object) -> bool:
    return isinstance(value, str)


def _mapping(value: object) -> bool:
    return isinstance(value, dict)


def _tally(value: object) -> bool:
    """Rows by error code (``failed_by_code``)."""
    return isinstance(value, dict) and all(_count(n) for n in value.values())


def _shard(value: object) -> bool:
    """``I/N``, as ``Shard.parse`` takes it (status and merge parse it)."""
    if not isinstance(value, str):
        return False
    try:
        Shard.parse(value)
    except UsageError:
        return False
    return True


def _provider(value: object) -> bool:
    """A dialect's name: status picks the dialect by it."""
    return value in PROVIDERS


def _or_none(check: _Check) -> _Check:
    return lambda value: value is None or check(value)


# ``Counts.to_dict``'s keys; a null tally reads as empty, as ``Counts.from_dict`` has it.
_COUNTS_FIELDS: Final[dict[str, _Check]] = {
    "ok": _count,
    "failed_by_code": _or_none(_tally),
    "tokens_in": _count,
    "tokens_out": _count,
    "cost": _number,
}
_CHECKPOINT_FIELDS: Final[dict[str, _Check]] = {
    **dict.fromkeys(("rows", "output_bytes", "input_line", "input_offset", "in_doubt"), _count),
    **_COUNTS_FIELDS,
}
# ``Summary``'s fields, as ``Summary.from_dict`` reads them, and ``finished_at``.
_FINISHED_FIELDS: Final[dict[str, _Check]] = {
    **_COUNTS_FIELDS,
    **dict.fromkeys(
        ("rows", "failed", "retries", "skipped", "exit_code", "reused", "sent"), _count
    ),
    **dict.fromkeys(("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"), _or_none(_number)),
    **dict.fromkeys(("duration_s", "rows_per_s"), _number),
    **dict.fromkeys(("cost", "cost_saved"), _or_none(_number)),
    **dict.fromkeys(("aborted", "finished_at"), _or_none(_text)),
    "output": _text,
    "extra": _or_none(_mapping),
}
# ``fingerprint``'s keys, and the pass (``StateDir.start_pass``).
_META_FIELDS: Final[dict[str, _Check]] = {
    **dict.fromkeys(("input", "input_hash", "pass"), _text),
    "input_size": _count,
    "shard": _or_none(_shard),
    "provider": _provider,
    **dict.fromkeys(("model", "response_schema"), _or_none(_text)),
    "params": _mapping,
}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    _write_atomic(path, orjson.dumps(data, option=orjson.OPT_INDENT_2))


def _write_atomic(path: Path, data: bytes) -> None:
    fresh = path.with_name(path.name + ".new")
    with disk_writes(fresh), fresh.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(fresh, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
