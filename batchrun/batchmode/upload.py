"""An uploaded file, watched for progress: a provider that stops taking it ends the upload.

aiohttp sends a file a chunk at a time, reading each chunk (in a worker
thread) once the one before it is written out. It bounds each wait for the
answer (``--read-timeout``) but not a body the peer stops reading, so a
silent provider would hold a batch run forever. ``watched`` puts a deadline
``--write-timeout`` ahead of every chunk read; once the whole file is read,
the answer gets ``--read-timeout`` more. Before the first chunk the
connection gets ``--connect-timeout`` as well.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import anyio

from batchrun.config import Timeouts
from batchrun.errors import TransientError

__all__ = ["watched"]

T = TypeVar("T")


class _Reader(io.BufferedReader):
    """A file that tells ``on_read`` how many bytes each read returned."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._on_read = on_read

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self._on_read(len(data))
        return data


async def watched(path: Path, timeouts: Timeouts, send: Callable[[BinaryIO], Awaitable[T]]) -> T:
    """``send(file)`` with ``path`` open for reading, as the module docstring
    bounds it; a stalled upload raises ``TransientError`` ``write_timeout``."""
    loop = asyncio.get_running_loop()
    scope = anyio.CancelScope(deadline=anyio.current_time() + timeouts.connect + timeouts.write)
    taken, size = 0, 0

    def moved(count: int) -> None:  # on the event loop's thread
        nonlocal taken
        taken += count
        wait = timeouts.write if taken < size else timeouts.write + timeouts.read
        scope.deadline = anyio.current_time() + wait

    def read(count: int) -> None:  # in aiohttp's reading thread
        loop.call_soon_threadsafe(moved, count)

    with _Reader(path, read) as handle, scope:
        size = os.fstat(handle.fileno()).st_size
        return await send(handle)
    raise TransientError(
        "write_timeout",
        f"uploading {path.name}: the provider took no more of it for {timeouts.write:g} s",
    )
