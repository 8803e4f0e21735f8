"""A job run from synchronous code in a thread whose event loop is already
running (a notebook cell): on a worker thread with a loop of its own.

The caller's thread blocks on the result; a blocking wait on a lock is
interrupted by Ctrl-C (SIGINT reaches the main thread), so Ctrl-C still works:
the first asks the job to stop as SIGINT would, the second cancels it. Either
way the worker's loop winds the job down before the call returns or raises.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from anyio.from_thread import start_blocking_portal

T = TypeVar("T")


def loop_running() -> bool:
    """Whether an asyncio event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_beside_loop(
    job: Callable[[anyio.Event], Awaitable[T]], *, backend_options: dict[str, Any] | None = None
) -> T:
    """``job(stop)``'s result, run to its end on a worker thread's own loop
    (asyncio, with anyio's ``backend_options``).

    ``stop`` is set at the first Ctrl-C (``KeyboardInterrupt`` in this
    thread) and the wait goes on; a second Ctrl-C cancels the job, waits for
    the worker to finish, and re-raises ``KeyboardInterrupt``.
    """
    portal_cm = start_blocking_portal(backend_options=backend_options)
    with _ctrl_c_interrupts(), portal_cm as portal:
        stop = portal.call(anyio.Event)
        future = portal.start_task_soon(job, stop)
        try:
            return future.result()
        except KeyboardInterrupt:
            portal.call(stop.set)
        return _second_wait(future)


def _second_wait(future: Future[T]) -> T:
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()  # the portal's exit waits for the cancelled job to unwind
        raise


@contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` in this wait, whatever handler the
    running loop installed: ``asyncio.run``'s only cancels its main task, which
    is this very blocked call, so the job would go on unstopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
