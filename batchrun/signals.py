"""SIGINT and SIGTERM over a whole ``batchrun run``: one receiver, in place
from before the output's lock is taken until the summary.

A receiver per step would leave gaps: one opened beside a step may start
after the step's first requests, and closing one puts back Python's own
handlers (a ``KeyboardInterrupt`` traceback, or death by SIGTERM) until the
next step opens its own. So ``with_signals`` receives them for the whole run
and hands each to the step running now (``SignalStop.handled_by``): the batch
phase stops at once, the pipeline takes no new row and gives the rows in
flight their grace period. A signal that comes while no step takes them is
kept, and the next step gets it as it begins, before it takes a row.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio
from anyio.abc import TaskStatus

T = TypeVar("T")
Handler = Callable[[str], None]

__all__ = ["SignalStop", "with_signals"]


class SignalStop:
    """The run's signals, as reasons to stop (``interrupted by SIGINT``)."""

    def __init__(self) -> None:
        self.received: str | None = None  # the latest signal's reason
        self._handler: Handler | None = None

    def deliver(self, reason: str) -> None:
        """A signal came: the step running now stops, else the next one will."""
        self.received = reason
        if self._handler is not None:
            self._handler(reason)

    @contextmanager
    def handled_by(self, handler: Handler) -> Iterator[None]:
        """``handler(reason)`` takes the signals while the block runs; it is
        called at once for a signal that came before the block."""
        previous, self._handler = self._handler, handler
        try:
            if self.received is not None:
                handler(self.received)
            yield
        finally:
            self._handler = previous

    async def receive(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver SIGINT and SIGTERM until cancelled; started once they are
        received here (Python's handlers no longer act)."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            task_status.started()
            async for signum in received:
                self.deliver(f"interrupted by {signal.Signals(signum).name}")


async def with_signals(work: Callable[[SignalStop], Awaitable[T]]) -> T:
    """``work(signals)``'s result, SIGINT and SIGTERM received for it from
    its first step to its last (main thread only). An exception ``work``
    raises comes out as it is, not in an exception group."""
    signals = SignalStop()
    failure: Exception | None = None
    results: list[T] = []
    async with anyio.create_task_group() as tasks:
        await tasks.start(signals.receive)
        try:
            results.append(await work(signals))
        except Exception as exc:  # raised below, once the receiver is closed
            failure = exc
        tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return results[0]
