"""The middle of a run's data flow: rows sent, in parallel, as slots allow.

    RowSource --> Workers --> OrderedWriter

``max_async`` worker tasks, plus one spare for each row waiting out a retry's
backoff: a lone failure waits only for its own row and takes no worker from
the healthy ones. The in-flight cap is the throttle's limiter, never above
``max_async``; a spare leaves once its row's worker is back. Each worker takes
a slot of the reorder window, then the next row from the shared (synchronous)
row generator, so rows come out in order; it sends the row (marked begun in
the journal once its throttle waits are over, just before it goes to the
socket), has its result journaled as soon as it has one, and hands it to the
writer.
Nothing passes through queues: a row costs no task switches beyond its own
request. A row whose request is already in flight for an earlier row takes
that row's result instead of a worker (``twins``).

Stopping (a signal, a fatal answer, the spending cap) lets no worker take a
new row; ``cancel`` ends the rows in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import anyio
import anyio.lowlevel

from batchrun import crashpoint
from batchrun.budget import Budget, worst_case_cost
from batchrun.config import RunConfig
from batchrun.errors import FatalError
from batchrun.ordered import OrderedWriter
from batchrun.records import output_line
from batchrun.reservations import Reservations
from batchrun.reuse import Answers, relabel
from batchrun.rowsource import Finished, Work, answered_row
from batchrun.sender import RowSender
from batchrun.twins import Twins

__all__ = ["Workers"]

# Known results a worker writes before it lets other tasks run, and the
# longest it runs them (seconds of real time). Every ready worker takes its
# turn before a signal's handler does, and again before the stop reaches
# the workers: turns of 256 reused rows (tens of microseconds each, a stored
# answer looked up) held a stop back 2-3 s at 32 workers. A yield costs a
# few microseconds.
_YIELD_EVERY = 256
TURN_SECONDS = 0.0005
turn_clock = time.perf_counter  # real time: a turn's length is CPU work, not a wait


class Workers:
    """Sends the rows of one run; see the module docstring.

    ``stop_reason`` is why no new row is taken (None: none stopped it);
    ``aborted`` is the fatal answer that stopped the run, if one did.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        sender: RowSender,
        writer: OrderedWriter,
        budget: Budget,
        answers: Answers,
    ) -> None:
        self.config = config
        self.sender = sender
        self.writer = writer
        self.budget = budget
        self.answers = answers
        self.twins = Twins()
        self.stop_reason: str | None = None
        self.aborted: FatalError | None = None
        self._scope = anyio.CancelScope()
        self._alive = 0  # worker tasks alive
        self._backing_off_rows = 0  # rows waiting for a retry, each holding a worker
        self._reservations = Reservations(budget)  # rows wait in input order for room
        sender.on_backoff = self._backing_off
        sender.on_send = writer.begin  # its first byte goes out next: it may be billed
        sender.on_unpaid = writer.abandon  # an error answer or no connection: not in doubt

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None or self.aborted is not None

    async def run(self, rows: Iterator[Work | Finished]) -> None:
        """Work through ``rows`` until they end, a stop, or ``cancel``."""
        with self._scope:
            async with anyio.create_task_group() as group:
                self._group, self._rows = group, rows
                for _ in range(self.config.limits.max_async):
                    self._start_one()

    def stop(self, reason: str) -> None:
        """Take no new row; rows in flight go on. Rows that only wait (a
        retry's pause, the throttle) have reached nobody: once no row is in
        flight they are cancelled, since waiting out the grace for them would
        send nothing that the next run does not send anyway."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if not self.writer.in_flight:
            self.cancel()

    def cancel(self) -> None:
        """End every row in flight now (they stay in doubt)."""
        self._scope.cancel()

    def _start_one(self) -> None:
        self._alive += 1
        self._group.start_soon(self._work)

    def _backing_off(self, rows: int) -> None:
        """``rows`` (+1 or -1) more rows wait for a retry: keep max_async
        workers free for new rows by starting a spare when one is short."""
        self._backing_off_rows += rows
        if rows > 0 and not self.stopping and self._surplus() < 0:
            self._start_one()

    def _surplus(self) -> int:
        """Workers beyond max_async and one per row waiting for a retry."""
        return self._alive - self.config.limits.max_async - self._backing_off_rows

    async def _work(self) -> None:
        try:
            await self._work_rows(self._rows)
        finally:
            self._alive -= 1

    async def _work_rows(self, rows: Iterator[Work | Finished]) -> None:
        known_in_a_row = 0
        turn_ends = turn_clock() + TURN_SECONDS
        window = self.writer.window
        while not self.stopping and self._surplus() <= 0:
            await window.acquire()
            item = next(rows, None) if not self.stopping else None
            if item is None:
                window.release()
                return
            if isinstance(item, Finished):
                self.writer.deliver(item)
                known_in_a_row += 1
                if known_in_a_row % _YIELD_EVERY == 0 or turn_clock() >= turn_ends:
                    await anyio.lowlevel.checkpoint()  # let others run through a long resume
                    known_in_a_row, turn_ends = 0, turn_clock() + TURN_SECONDS
                continue
            if not self.twins.lead(item):
                continue  # parked behind its twin in flight, with its window slot
            if not await self._send_and_deliver(item):
                return

    async def _send_and_deliver(self, work: Work) -> bool:
        """Send ``work`` with its journal marks and hand its result to the
        writer; False when the answer was fatal or the budget refused the row
        (then it stays unsent), which stops this worker. A function of its
        own so that no local outlives the row: a worker's loop would keep its
        last result (the record and the parsed answer, a megabyte for a
        512 KB answer) alive while it waits for the next one."""
        request, costs, writer = work.request, self.config.costs, self.writer
        reserved = worst_case_cost(costs, request) if costs.max_cost is not None else 0.0
        if not await self._reserve(work, reserved):
            self.twins.settle(work.key)  # they stay unsent too: the run stops
            if self.budget.refused:
                self._stop_for_budget()
            return False
        try:
            outcome = await self.sender.send(request)  # marks it begun when it goes out
        except FatalError as exc:  # the sender un-marked the row unless it may be billed
            self._reservations.release(reserved)
            self.twins.settle(work.key)
            self._abort(exc)
            return False
        if crashpoint.ARMED:
            crashpoint.hit("after_response")
        if costs.priced:
            outcome.cost = costs.price(outcome.tokens_in, outcome.tokens_out)
        self._reservations.settle(reserved, outcome.cost or 0.0)
        data = output_line(outcome)
        journal_at = writer.record(request.line, data, work.key)
        self.answers.add_outcome(work.key, data, outcome)
        if self.stopping and not writer.in_flight:
            self.cancel()  # the last row in flight at a stop: the rest only wait (``stop``)
        writer.deliver(answered_row(work.row, work.input_end, data, outcome, journal_at))
        twins = self.twins.settle(work.key)
        if twins:
            self._answer_twins(twins, data, retryable=outcome.retryable)
        return True

    def _answer_twins(self, twins: Sequence[Work], data: bytes, *, retryable: bool) -> None:
        """The rows parked behind a leader whose result (output line ``data``)
        just came: each gets it as a reused record, or, when the run resends
        such a result (``Answers.reusable``), goes out on its own."""
        if not self.answers.reusable(retryable=retryable):
            for twin in twins:
                self._group.start_soon(self._send_twin, twin)
            return
        for twin in twins:
            request = twin.request
            record = relabel(data, request.line, request.custom_id)
            self.writer.deliver(Finished(twin.row, twin.input_end, record, None, reused=True))

    async def _send_twin(self, work: Work) -> None:
        """A parked row whose twin's result is not reused: it leads its key
        (or parks behind a new leader) as a row of its own, unless the run is
        stopping (then it stays unsent, for the next run)."""
        if not self.stopping and self.twins.lead(work):
            await self._send_and_deliver(work)

    async def _reserve(self, work: Work, amount: float) -> bool:
        """Reserve ``amount``, ``work``'s worst case under ``--max-cost``, in
        its turn (``reservations``); False when the cap is reached or the run
        stopped while the row waited (then nothing stays reserved)."""
        if not await self._reservations.reserve(amount, work.row):
            return False
        if self.stopping:
            self._reservations.release(amount)
            return False
        return True

    def _stop_for_budget(self) -> None:
        """Take no more rows; end once the rows in flight are answered."""
        self.stop("budget reached")

    def _abort(self, exc: FatalError) -> None:
        if self.aborted is None:
            self.aborted = exc
        self.cancel()
