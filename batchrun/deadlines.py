"""Deadlines of one length for many tasks, on one timer of the event loop.

Every attempt gets the same ``--request-timeout``, so deadlines fall due in
the order the attempts start: a FIFO queue holds them, and one timer, armed
for the oldest pending deadline, cancels each task whose deadline passes.
An attempt's start and end cost a queue append and a flag, where
``asyncio.timeout`` costs a timer of the event loop each: under callgrind,
about 30,000 instructions of a fast row's 640,000 (uvloop makes a libuv
timer handle per timer).

A deadline's cancellation is told apart from any other as
``asyncio.timeout`` does it: ``timed_out`` takes back only its own
cancellation (``Task.uncancel``), so an outer cancel still propagates.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Deadline", "FifoDeadlines"]

_PENDING, _DONE, _FIRED = 0, 1, 2

# Finished deadlines may wait in the queue behind a pending one (a slow row at
# its head); once they outnumber the pending ones by this much, they go.
_SLACK = 1024


class Deadline:
    """One task's deadline: ``at`` on the event loop's clock (seconds)."""

    __slots__ = ("at", "cancelling", "state", "task")

    def __init__(self, at: float, task: asyncio.Task[object], cancelling: int) -> None:
        self.at = at
        self.task = task
        self.cancelling = cancelling  # the task's pending cancellations at the start
        self.state = _PENDING


class FifoDeadlines:
    """Deadlines ``seconds`` after each ``start``; see the module docstring.

    Invariant: the queue is in deadline order, holds every pending deadline
    and at most ``2 * pending + _SLACK`` entries; a timer is armed whenever
    a deadline is pending. Its deadlines are all on one event loop at a
    time; once none is pending, the next may come from another loop.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._queue: deque[Deadline] = deque()
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> Deadline:
        """The current task's deadline, ``seconds`` from now."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None, "start() from a task"
        entry = Deadline(loop.time() + self.seconds, task, task.cancelling())
        self._queue.append(entry)
        self._pending += 1
        if self._timer is None:
            self._timer = loop.call_at(entry.at, self._expire)
        return entry

    def finish(self, entry: Deadline) -> None:
        """``entry``'s task is done with it (answered, failed or cancelled)."""
        if entry.state == _PENDING:
            entry.state = _DONE
            self._pending -= 1
        queue = self._queue
        while queue and queue[0].state != _PENDING:
            queue.popleft()
        if not queue:
            self._disarm()
            self._loop = None  # idle: the next start may come from another event loop
        elif len(queue) > 2 * self._pending + _SLACK:
            self._queue = deque(e for e in queue if e.state == _PENDING)

    def timed_out(self, entry: Deadline) -> bool:
        """Whether ``entry``'s deadline cancelled its task, and no other
        cancellation is pending: then that cancellation is taken back, and
        the caller raises a timeout instead. Call on ``CancelledError``."""
        return entry.state == _FIRED and entry.task.uncancel() <= entry.cancelling

    def _expire(self) -> None:
        """The timer: cancel every task whose deadline passed, re-arm for the next."""
        self._timer = None
        loop, queue = self._loop, self._queue
        assert loop is not None
        now = loop.time()
        while queue and (queue[0].state != _PENDING or queue[0].at <= now):
            entry = queue.popleft()
            if entry.state == _PENDING:
                entry.state = _FIRED
                self._pending -= 1
                entry.task.cancel()
        if queue:
            self._timer = loop.call_at(queue[0].at, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
