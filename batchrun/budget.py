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
    the worst cases of rows in flight. ``cap`` None: no limit, never refuses.
    Invariant: ``reserved >= 0``.
    """

    cap: float | None
    spent: float = 0.0
    reserved: float = 0.0
    refused: bool = False  # some row was refused: the cap is reached

    def reserve(self, amount: float) -> bool:
        """Reserve ``amount`` for a row about to be sent; False (and nothing
        reserved) when that would pass the cap."""
        if self.cap is not None and self.spent + self.reserved + amount > self.cap:
            self.refused = True
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """A row reserved with ``reserved`` finished having cost ``actual``."""
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual

    def release(self, reserved: float) -> None:
        """A row reserved with ``reserved`` was not paid (a fatal answer, a cancel)."""
        self.reserved = max(0.0, self.reserved - reserved)


def worst_case_cost(costs: Costs, request: Request) -> float:
    """The most ``request`` may cost: estimated prompt plus its ``max_tokens``."""
    body = request.body
    return costs.price(estimate_input_tokens(body), estimate_output_tokens(body))
