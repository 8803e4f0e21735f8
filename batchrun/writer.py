"""Ordered output: a pure reorder buffer and the file it feeds.

Rows finish in any order; the output must hold them in input order. The
``ReorderBuffer`` holds finished rows until every earlier row has finished; a
worker takes a slot of the reorder window (``ordered.OrderedWriter.window``)
before it takes a row, and the writer gives the slot back once the row is
written, so the buffer never holds more than the reorder window.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from batchrun import crashpoint
from batchrun.errors import DISK_ERRNOS, DiskError, disk_writes
from batchrun.layout import partial_output

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    """Releases items in index order, starting at ``next_index``.

    Invariant: every held index is greater than ``next_index``; each index is
    pushed at most once.
    """

    def __init__(self, next_index: int = 0) -> None:
        self._next = next_index
        self._held: dict[int, T] = {}

    @property
    def next_index(self) -> int:
        """The index the buffer waits for: all lower ones were released."""
        return self._next

    @property
    def held(self) -> int:
        """How many items wait for an earlier one."""
        return len(self._held)

    def waiting(self) -> list[T]:
        """The items held for an earlier index, in no particular order."""
        return list(self._held.values())

    def pass_next(self, count: int = 1) -> None:
        """Items ``next_index`` on (``count`` of them) were released without
        being pushed; nothing may be held."""
        if self._held:
            raise ValueError(f"index {self._next} passed while later ones wait")
        self._next += count

    def push(self, index: int, item: T) -> list[T]:
        """Add item ``index``; return the items now releasable, in order."""
        if index < self._next or index in self._held:
            raise ValueError(f"index {index} was pushed twice")
        if index != self._next:
            self._held[index] = item
            return []
        ready = [item]
        self._next += 1
        while self._next in self._held:
            ready.append(self._held.pop(self._next))
            self._next += 1
        return ready


class OutputFile:
    """The ordered output, written in the state directory and published to
    ``out`` by an atomic rename, so readers never see a partial ``out``."""

    def __init__(self, out: Path) -> None:
        self.final = out
        self.partial = partial_output(out)
        self._handle: BinaryIO | None = None

    def open(self, *, keep_bytes: int = 0) -> None:
        """Open the partial output for appending after its first ``keep_bytes``
        bytes (a resume keeps the complete lines; a fresh run keeps none)."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        handle = self.partial.open("ab", buffering=1 << 16)
        handle.truncate(keep_bytes)
        self._handle = handle

    def write(self, data: bytes) -> None:
        assert self._handle is not None, "open() first"
        if crashpoint.armed("output_torn"):
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()
            crashpoint.die()
        try:  # as ``disk_writes`` does, without a ``with`` per row (about 1 us)
            self._handle.write(data)
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise DiskError(self.partial, exc) from exc
            raise

    def flush(self, *, fsync: bool = False) -> None:
        """Hand buffered lines to the operating system (and the disk if
        ``fsync``); ``DiskError`` on a full disk or an I/O error."""
        if self._handle is not None:
            with disk_writes(self.partial):
                fault = crashpoint.disk_fault("output")
                if fault is not None:
                    raise fault
                self._handle.flush()
                if fsync:
                    os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            try:
                self.flush()
            finally:
                with contextlib.suppress(OSError):  # what a failed flush left behind
                    self._handle.close()
                self._handle = None

    def publish(self, *, durable: bool = False) -> None:
        """Make the finished output visible at ``out`` in one step; with
        ``durable`` (``--fsync batch`` or ``always``), its bytes are on the
        disk first, even when another ``OutputFile`` wrote them: the run's
        finished record says it is complete, so a power loss must not leave
        it short."""
        if self._handle is not None:
            self.flush(fsync=True)
            self.close()
        elif durable:
            _fsync_file(self.partial)
        crashpoint.hit("before_publish")
        os.replace(self.partial, self.final)
        _fsync_dir(self.final.parent)
        # Left in place when not empty: it holds state a later step still needs.
        with contextlib.suppress(OSError):
            self.partial.parent.rmdir()


def _fsync_file(path: Path) -> None:
    """Put ``path``'s written bytes on the disk; ``DiskError`` on an I/O error."""
    with disk_writes(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
