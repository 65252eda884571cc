"""A run's prices and budget: what each account's calls cost in the run's currency, and a cap.

Pure asyncio, no Prefect. ``run_prices`` settles each account's price once per run: the run's
``prices`` parameter, else ``TRYON_PRICES`` (the worker's environment), else the vendor's
published price when it is in the run's currency; anything else is unknown (``None``), never
zero. ``Budget`` is reserved before each call and settled after it: a call the vendor did not
charge gives its reservation back. When the next call could exceed the budget, the budget
stops every account of the run, as a run-fatal error does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Final, Protocol

from providers.base import ProviderError
from schemas.money import Price
from schemas.results import ErrorKind

__all__ = [
    "BUDGET_EXHAUSTED",
    "PRICES_ENV",
    "Budget",
    "parse_prices",
    "run_prices",
]

PRICES_ENV: Final = "TRYON_PRICES"
BUDGET_EXHAUSTED: Final = "BUDGET_EXHAUSTED"


class _Priced(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def price(self) -> Price | None: ...


def parse_prices(text: str, *, option: str = PRICES_ENV) -> dict[str, Decimal]:
    """``"changeclothes=0.05,hidream=0.04"`` (commas or spaces) -> {account: amount}."""
    prices: dict[str, Decimal] = {}
    for item in text.replace(",", " ").split():
        name, sep, amount = item.partition("=")
        if not (sep and name.strip()):
            raise ValueError(f"{option}: expected PROVIDER=AMOUNT, not {item!r}")
        prices[name.strip()] = parse_amount(amount, what=f"{option} {name.strip()}")
    return prices


def parse_amount(text: str | float, *, what: str) -> Decimal:
    try:
        amount = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"{what}: {text!r} is not an amount") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{what}: {text!r} is not an amount of 0 or more")
    return amount


def run_prices(
    accounts: Iterable[_Priced],
    *,
    currency: str,
    given: Mapping[str, float | Decimal] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Decimal | None]:
    """Each account's price per charged call in ``currency``: given for the run, else from
    ``TRYON_PRICES``, else the vendor's published one when it is in ``currency``; else None."""
    from_env = parse_prices(environ.get(PRICES_ENV, ""))
    prices: dict[str, Decimal | None] = {}
    for account in accounts:
        if given is not None and account.name in given:
            prices[account.name] = parse_amount(given[account.name], what=account.name)
        elif account.name in from_env:
            prices[account.name] = from_env[account.name]
        elif account.price is not None and account.price.currency == currency:
            prices[account.name] = account.price.amount
        else:
            prices[account.name] = None
    return prices


class _Stoppable(Protocol):
    """A lane: the budget stops it as a run-fatal error would (``tasks.run_context.Lane``)."""

    @property
    def name(self) -> str: ...
    def stop(self, error: ProviderError) -> None: ...


@dataclass(slots=True)
class Budget:
    """At most ``limit`` spent by one run (``None``: no cap, but spend is still counted).

    A call reserves its price first; ``settle`` turns the reservation into spend when the
    vendor charged the call and gives it back when it did not. Reservations in flight count
    against the limit, so concurrent calls can never overshoot it together.
    """

    limit: Decimal | None
    currency: str = "USD"
    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)
    exhausted: ProviderError | None = None
    lanes: list[_Stoppable] = field(default_factory=list)

    @classmethod
    def of(cls, limit: float, currency: str) -> Budget:
        """A run's budget from its parameters: 0 is no cap."""
        return cls(limit=Decimal(str(limit)) if limit else None, currency=currency)

    def reserve(self, amount: Decimal | None, provider: str) -> None:
        """Reserve one call's price, or stop the run's lanes and raise ``BUDGET_EXHAUSTED``."""
        if self.exhausted is not None:
            raise self.exhausted
        if self.limit is None or amount is None:
            return
        if self.spent + self.reserved + amount > self.limit:
            self.exhausted = ProviderError(
                kind=ErrorKind.FATAL,
                code=BUDGET_EXHAUSTED,
                message=(
                    f"the next call to {provider} ({amount} {self.currency}) would take the "
                    f"run past its budget of {self.limit} {self.currency} "
                    f"({self.spent} spent, {self.reserved} in calls under way)"
                ),
                provider="budget",
            )
            for lane in self.lanes:
                lane.stop(self.exhausted)
            raise self.exhausted
        self.reserved += amount

    def settle(self, amount: Decimal | None, *, charged: bool) -> None:
        """The call ended: its reservation becomes spend if the vendor charged it."""
        if amount is None:
            return
        if self.limit is not None:
            self.reserved -= amount
        if charged:
            self.spent += amount
