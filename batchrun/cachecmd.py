"""``batchrun cache stats|prune DIR``: look after a shared result store."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

from batchrun.errors import LockedError, UsageError
from batchrun.layout import output_of
from batchrun.state import StateDir
from batchrun.stats import money
from batchrun.store import STORE_FILE, StoreStats, open_store

__all__ = ["as_dict", "parse_age", "prune", "render", "stats"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` to seconds."""
    match = _AGE.match(text)
    if match is None:
        raise UsageError(f"--older-than takes an age such as 30d, 12h, 90m or 3600s, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _existing(directory: Path) -> Path:
    """The store file of ``directory`` (a ``--cache`` directory or an output's
    ``OUT.batchrun``), or that file itself when given."""
    if directory.is_file() and directory.name == STORE_FILE:
        return directory
    path = directory / STORE_FILE
    if path.is_file():
        return path
    hint = (
        f"; {directory} is a file: give the directory that holds {STORE_FILE}"
        " (the --cache directory, or OUT.batchrun for an output's own store)"
        if directory.is_file()
        else ""
    )
    raise UsageError(f"no result store in {directory} (looked for {path}){hint}")


def stats(directory: Path) -> StoreStats:
    """What the store in ``directory`` holds; it must exist."""
    store = open_store(_existing(directory))
    try:
        return store.stats()
    finally:
        store.close()


def prune(directory: Path, older_than_s: float) -> int:
    """Delete results older than ``older_than_s`` seconds; how many went.
    ``LockedError`` when the store is an output's own and a run on that
    output is live."""
    path = _existing(directory)
    with _output_held(path):
        store = open_store(path)
        try:
            return store.prune(older_than_s)
        finally:
            store.close()


@contextlib.contextmanager
def _output_held(store: Path) -> Iterator[None]:
    """Hold the output's lock while pruning its own store (``OUT.batchrun``):
    a live run counts on the answers it stored (batch mode's repeated rows
    are answered from there), so pruning under it could pay for them again."""
    out = output_of(store.parent)
    state = StateDir(out) if out is not None else None
    if state is None or not state.lock_path.exists():
        yield  # a shared --cache store: runs never count on what it keeps
        return
    try:
        state.lock()
    except LockedError:
        raise LockedError(
            f"a run on {out} is live ({state.holder() or 'holder unknown'}) and counts on"
            " the answers its store holds: prune it once that run ends"
        ) from None
    try:
        yield
    finally:
        state.unlock()


def as_dict(report: StoreStats) -> dict[str, object]:
    return {name: getattr(report, name) for name in report.__slots__}


def render(report: StoreStats) -> str:
    """A few lines for a person."""
    lines = [
        f"result store {report.path}: {report.results:,} results"
        f" ({report.ok:,} answers, {report.errors:,} row errors), {report.bytes / 1e6:,.1f} MB",
        f"  recorded cost {money(report.cost)}",
    ]
    if report.oldest is not None and report.newest is not None:
        lines.append(f"  stored from {_when(report.oldest)} to {_when(report.newest)}")
    return "\n".join(lines)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
