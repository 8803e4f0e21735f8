"""Rows waiting for room under --max-cost: served in input order, refused
only when the first in line would pass the cap with nothing in flight."""

from __future__ import annotations

import anyio
import pytest

from batchrun.budget import Budget
from batchrun.reservations import Reservations

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]


async def test_rows_waiting_for_room_are_served_in_input_order() -> None:
    queue = Reservations(Budget(cap=10.0))
    served: list[int] = []

    async def take(row: int) -> None:
        assert await queue.reserve(6.0, row)
        served.append(row)

    assert await queue.reserve(6.0, 5)  # in flight, holding 6 of 10
    async with anyio.create_task_group() as tasks:
        for row in (9, 7):  # row 9 asks first, row 7 comes before it
            tasks.start_soon(take, row)
            await anyio.wait_all_tasks_blocked()
        assert served == []
        queue.settle(6.0, 1.0)  # 1 spent: room for one more worst case
        await anyio.wait_all_tasks_blocked()
        assert served == [7]
        queue.settle(6.0, 1.0)
    assert served == [7, 9]
    assert not queue.budget.refused


async def test_the_first_in_line_that_cannot_fit_even_alone_reaches_the_cap() -> None:
    queue = Reservations(Budget(cap=10.0, spent=3.0))
    assert await queue.reserve(6.0, 1)
    refused: list[bool] = []

    async def take(row: int) -> None:
        refused.append(not await queue.reserve(6.0, row))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(take, 2)
        await anyio.wait_all_tasks_blocked()
        assert refused == []  # 3 + 6 fits once row 1 settles
        queue.settle(6.0, 2.0)  # 5 spent: 5 + 6 > 10 with nothing in flight
    assert refused == [True]
    assert queue.budget.refused
    assert (queue.budget.reserved, queue.budget.holding) == (0.0, 0)
