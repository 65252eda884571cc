"""tasks.money: a run's prices settle once, and its budget never lets calls overshoot it."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

import pytest

from providers.base import ProviderError
from schemas.money import Price
from tasks.money import BUDGET_EXHAUSTED, Budget, parse_prices, run_prices


@dataclass(frozen=True)
class Account:
    name: str
    price: Price | None = None


@dataclass
class Lane:
    name: str
    stopped: list[ProviderError] = field(default_factory=list)

    def stop(self, error: ProviderError) -> None:
        self.stopped.append(error)


def test_prices_parse_from_options_and_the_environment() -> None:
    assert parse_prices("changeclothes=0.05, hidream=0.04 ailab=1") == {
        "changeclothes": Decimal("0.05"),
        "hidream": Decimal("0.04"),
        "ailab": Decimal("1"),
    }
    assert parse_prices("") == {}
    for bad in ("changeclothes", "=0.1", "hidream=-1", "hidream=abc", "hidream=nan"):
        with pytest.raises(ValueError, match="TRYON_PRICES"):
            parse_prices(bad)


def test_a_run_price_is_given_else_from_the_environment_else_published_in_its_currency() -> None:
    accounts = [
        Account("given", Price(Decimal("0.09"), "USD", "x")),
        Account("env", Price(Decimal("0.09"), "USD", "x")),
        Account("published", Price(Decimal("0.07"), "USD", "x")),
        Account("yuan", Price(Decimal("0.5"), "CNY", "x")),
        Account("unpublished"),
    ]
    prices = run_prices(
        accounts,
        currency="USD",
        given={"given": 0.05},
        environ={"TRYON_PRICES": "env=0.03"},
    )
    assert prices == {
        "given": Decimal("0.05"),
        "env": Decimal("0.03"),
        "published": Decimal("0.07"),
        "yuan": None,  # another currency: unknown, never converted or taken as zero
        "unpublished": None,
    }
    assert run_prices(accounts[3:4], currency="CNY", environ={})["yuan"] == Decimal("0.5")


def test_a_budget_counts_calls_under_way_and_gives_back_what_was_not_charged() -> None:
    lanes = [Lane("a"), Lane("b")]
    budget = Budget(limit=Decimal("0.30"), currency="USD", lanes=lanes)  # type: ignore[arg-type]
    price = Decimal("0.10")
    for _ in range(3):
        budget.reserve(price, "a")  # three calls under way: the whole budget
    with pytest.raises(ProviderError) as refused:
        budget.reserve(price, "a")
    assert refused.value.code == BUDGET_EXHAUSTED and "0.30 USD" in refused.value.message
    assert all(lane.stopped == [refused.value] for lane in lanes)  # every lane stops
    budget.settle(price, charged=True)
    budget.settle(price, charged=False)  # not charged: its reservation comes back...
    budget.settle(price, charged=True)
    assert budget.spent == Decimal("0.20") and budget.reserved == 0
    with pytest.raises(ProviderError):  # ...but a stopped budget stays stopped
        budget.reserve(price, "b")


def test_an_uncharged_failure_leaves_room_for_the_retry() -> None:
    budget = Budget.of(0.1, "USD")
    price = Decimal("0.1")
    budget.reserve(price, "a")
    budget.settle(price, charged=False)
    budget.reserve(price, "a")  # the retry fits: nothing was spent
    budget.settle(price, charged=True)
    assert budget.spent == price and budget.exhausted is None


def test_no_cap_still_counts_and_unknown_prices_reserve_nothing() -> None:
    budget = Budget.of(0, "USD")
    assert budget.limit is None
    for _ in range(100):
        budget.reserve(Decimal("1"), "a")
        budget.settle(Decimal("1"), charged=True)
    assert budget.spent == 100
    capped = Budget.of(1, "USD")
    capped.reserve(None, "a")
    assert capped.reserved == 0
