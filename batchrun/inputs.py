"""The input file: opened as bytes (``.gz`` decompressed on the fly), streamed."""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from batchrun.errors import UsageError

# What a damaged input raises as it is read: gzip's BadGzipFile is an OSError,
# a truncated stream an EOFError.
READ_ERRORS = (OSError, EOFError)


class InputReadError(UsageError):
    """The input cannot be read (not gzip, truncated, an I/O error)."""


# Bytes read from the input at a time (Python's default is 8 KiB: a read
# call per 100 rows or so).
READ_BUFFER = 1 << 16


def check_input_file(path: Path, name: str = "input file") -> None:
    """Raise ``UsageError`` unless ``path`` is a regular file, saying what it
    is instead: a run reads its input more than once (to resume, to check it
    did not change), which a pipe or a terminal cannot give."""
    if path.is_file():
        return
    if str(path) == "-":  # other tools' standard input
        what = "is no file: batchrun reads no standard input; save the requests to a file first"
    elif not path.exists():
        what = "does not exist"
    elif path.is_dir():
        what = "is a directory"
    else:  # a pipe (``-``, ``<(...)``, a FIFO), a terminal, a device or a socket
        what = "is not a regular file (a pipe or a device): save the requests to a file first"
    raise UsageError(f"{name} {path} {what}")


# Which file a path names and its version: inode, size, modification time (ns).
Stamp = tuple[int, int, int]


def stamp(path: Path) -> Stamp:
    """``path``'s file and version now (``os.stat``: no read)."""
    info = path.stat()
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def check_unchanged(path: Path, before: Stamp) -> None:
    """Raise ``UsageError`` if ``path`` is no longer the file ``before`` saw:
    rewritten, replaced or gone while a run read it, its output may mix both
    versions and must not be published."""
    try:
        now = stamp(path)
    except OSError:
        now = None
    if now != before:
        raise UsageError(
            f"the input {path} changed while this run read it: its output is not published"
            " (its rows may mix both versions); run the same command again: rows already"
            " answered are reused, not paid again"
        )


def open_input(path: Path) -> BinaryIO:
    """The input as bytes; ``.gz`` files are decompressed as they are read."""
    if path.suffix == ".gz":
        return cast(BinaryIO, gzip.open(path, "rb"))
    return path.open("rb", buffering=READ_BUFFER)


def count_lines(path: Path) -> int:
    """Lines in the input (a final line without newline counts)."""
    count, last = 0, b"\n"
    with open_input(path) as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def check_readable(path: Path) -> None:
    """Read the input's first bytes: a ``.gz`` that is not gzip fails here,
    before anything is sent. Raises ``InputReadError``."""
    try:
        with open_input(path) as handle:
            handle.read(1)
    except READ_ERRORS as exc:
        raise InputReadError(f"input file {path} could not be read: {exc}") from None


def read_lines(handle: Iterable[bytes], path: Path) -> Iterator[bytes]:
    """The lines of an open input; a read failure (a truncated ``.gz``) becomes
    ``InputReadError`` naming the file."""
    try:
        yield from handle
    except READ_ERRORS as exc:
        raise unreadable(path, exc) from None


def unreadable(path: Path, exc: BaseException) -> InputReadError:
    """The error of an input that failed part-way with ``exc`` (one of ``READ_ERRORS``)."""
    return InputReadError(f"input file {path} could not be read to its end: {exc}")
