"""Money: what a provider call costs, in one currency per run.

Amounts are ``Decimal`` in the process (a budget is reserved and released call by call, and
binary floats would drift); the metadata's ``cost`` column is a float of the same amount, for
analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

__all__ = ["Price"]


@dataclass(frozen=True, slots=True)
class Price:
    """What one charged call costs. ``source``: where the vendor publishes it (and when it was
    read), so a reader can check it; a price the vendor does not publish is left unknown
    (``None`` where a ``Price`` is expected), never guessed."""

    amount: Decimal
    currency: str  # ISO 4217, upper case: "USD", "CNY"
    source: str = ""

    def __post_init__(self) -> None:
        if self.amount < 0:
            raise ValueError(f"a price cannot be negative: {self.amount}")
        if len(self.currency) != 3 or not self.currency.isalpha() or not self.currency.isupper():
            raise ValueError(f"currency must be an ISO 4217 code such as USD: {self.currency!r}")
