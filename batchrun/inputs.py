"""The input file: opened as bytes (``.gz`` decompressed on the fly), streamed."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import BinaryIO, cast


def open_input(path: Path) -> BinaryIO:
    """The input as bytes; ``.gz`` files are decompressed as they are read."""
    if path.suffix == ".gz":
        return cast(BinaryIO, gzip.open(path, "rb"))
    return path.open("rb")


def count_lines(path: Path) -> int:
    """Lines in the input (a final line without newline counts)."""
    count, last = 0, b"\n"
    with open_input(path) as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")
