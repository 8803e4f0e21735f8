"""Progress of a batch-mode run, from the request counts of all its batches:
a bar on a terminal, a log line per poll elsewhere (done/total and ETA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

from batchrun.batchmode.record import Part
from batchrun.progress import ProgressReporter
from batchrun.timing import Monotonic


def counts(parts: Sequence[Part]) -> tuple[int, int, int]:
    """(rows done, rows in all, batches running) over ``parts``.

    A collected part counts the rows it settled; a live one its provider's
    completed + failed; rows handed to a follow-up part count there.
    """
    total = sum(part.rows for part in parts if part.parent is None)
    done = running = 0
    for part in parts:
        if part.status == "collected":
            done += part.counts.get("settled", 0) + part.online
        elif part.live:
            running += 1
            done += part.counts.get("completed", 0) + part.counts.get("failed", 0)
    return min(done, total), total, running


class BatchProgress:
    """Shows ``counts`` after every poll."""

    def __init__(self, *, enabled: bool, stream: TextIO, clock: Monotonic) -> None:
        self.mode = ProgressReporter.choose_mode(enabled, stream)
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self._first_done: int | None = None
        self._bar: Any = None

    def show(self, parts: Sequence[Part]) -> None:
        done, total, running = counts(parts)
        if self._first_done is None:
            self._first_done = done
        if self.mode == "bar":
            self._show_bar(done, total, running)
        elif self.mode == "log":
            self.stream.write(f"batchrun: {self.line(done, total, running)}\n")
            self.stream.flush()

    def line(self, done: int, total: int, running: int) -> str:
        share = f" ({100 * done / total:.0f}%)" if total else ""
        eta = self._eta(done, total)
        return f"batches: {running} running; rows {done:,}/{total:,}{share}, ETA {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _eta(self, done: int, total: int) -> str:
        gained = done - (self._first_done or 0)
        elapsed = self.clock() - self.started
        if gained <= 0 or elapsed <= 0:
            return "?"
        seconds = int((total - done) * elapsed / gained)
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"

    def _show_bar(self, done: int, total: int, running: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", file=self.stream, desc="batches")
        self._bar.total = total
        self._bar.n = done
        self._bar.set_postfix_str(f"{running} running", refresh=False)
        self._bar.refresh()
