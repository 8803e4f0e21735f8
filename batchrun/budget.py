"""The spending cap (``--max-cost``): reserve before sending, settle on the answer.

Pure: amounts in, decisions out. Before a row is sent, its worst case (the
estimated prompt plus its ``max_tokens``, at the job's prices) is reserved;
when its answer arrives, the reservation is replaced by what the answer's
usage says it cost. A row is refused once spent plus reserved plus its own
reservation would pass the cap, so the run stops before the cap, never after
it, as far as the estimates hold (an answer may report more prompt tokens
than estimated).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchrun.config import Costs
from batchrun.records import Request
from batchrun.tokens import estimate_input_tokens, estimate_output_tokens

__all__ = ["Budget", "worst_case_cost"]


@dataclass(slots=True)
class Budget:
    """Money against a cap, in the currency of the job's prices.

    ``spent`` counts settled rows of every run on this output; ``reserved``
    the worst cases of the ``holding`` rows in flight. ``cap`` None: no
    limit, never refuses. Invariants: ``reserved >= 0``, ``holding >= 0``,
    and ``reserved == 0`` when ``holding == 0``.
    """

    cap: float | None
    spent: float = 0.0
    reserved: float = 0.0
    refused: bool = False  # some row was refused: the cap is reached
    # Rows holding a reservation: counted, since float sums of reservations
    # need not come back to exactly 0.0 when they are all settled.
    holding: int = 0

    def reserve(self, amount: float) -> bool:
        """Reserve ``amount`` for a row about to be sent; False (and nothing
        reserved) when that would pass the cap. Then ``refused`` says whether
        the cap is reached for good: the row would pass it even once every
        row in flight had settled, which can only lower what they hold
        reserved (else the caller may wait for a settlement and try again)."""
        if self.cap is not None and self.spent + self.reserved + amount > self.cap:
            self.refused = self.refused or not self.holding or self.spent + amount > self.cap
            return False
        self.reserved += amount
        self.holding += 1
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """A row reserved with ``reserved`` finished having cost ``actual``."""
        self.release(reserved)
        self.spent += actual

    def release(self, reserved: float) -> None:
        """A row reserved with ``reserved`` was not paid (a fatal answer, a cancel)."""
        self.reserved = max(0.0, self.reserved - reserved) if self.holding > 1 else 0.0
        self.holding = max(0, self.holding - 1)


def worst_case_cost(costs: Costs, request: Request) -> float:
    """The most ``request`` may cost: estimated prompt plus its ``max_tokens``."""
    body = request.body
    return costs.price(estimate_input_tokens(body), estimate_output_tokens(body))
