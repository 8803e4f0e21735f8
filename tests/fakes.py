"""The one fake time of the test suite: its ``sleep`` advances its ``monotonic``."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from batchrun.timing import Clock


class FakeClock:
    """Fake monotonic time, in seconds, that moves only through ``sleep`` or ``advance``.

    ``auto`` (default): ``sleep(s)`` jumps time to the sleeper's deadline at
    once (never backwards, so concurrent sleepers end at the latest deadline
    asked) and yields once. Manual (``auto=False``): sleepers block until
    ``advance`` moves time past their deadline, so a test can act while
    someone is asleep. Every requested wait is recorded in ``sleeps``.
    Calling the object reads the time, so it serves as a bare clock function.
    """

    def __init__(self, now: float = 0.0, *, auto: bool = True) -> None:
        self.now = now
        self.auto = auto
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def monotonic(self) -> float:
        return self.now

    __call__ = monotonic

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        deadline = self.now + max(0.0, seconds)
        if self.auto:
            self.now = max(self.now, deadline)
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        self._sleepers.append((deadline, event))
        await event.wait()

    def advance(self, seconds: float) -> None:
        """Move time on and wake every sleeper whose deadline has passed."""
        self.now += seconds
        due = [entry for entry in self._sleepers if entry[0] <= self.now]
        self._sleepers = [entry for entry in self._sleepers if entry[0] > self.now]
        for _, event in due:
            event.set()

    def as_clock(self) -> Clock:
        """This fake time as the runner's injected ``Clock``."""
        return Clock(sleep=self.sleep, monotonic=self.monotonic)
