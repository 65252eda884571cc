"""tryon-sharded: each shard is a run of its own, so the run's budget is split between them."""

from __future__ import annotations

from decimal import Decimal

from flows.sharded import shard_budgets


def test_a_budget_is_split_by_rows_and_the_shares_stay_within_it() -> None:
    shares = shard_budgets(10.0, [334, 333, 333])
    assert shares == [3.34, 3.33, 3.33]
    assert sum(Decimal(str(s)) for s in shares) <= Decimal("10")
    thirds = shard_budgets(1.0, [1, 1, 1])
    assert thirds == [0.333333] * 3  # rounded down: never more than the whole
    assert shard_budgets(0, [5, 5]) == [0.0, 0.0]  # no cap stays no cap
    assert all(share > 0 for share in shard_budgets(0.000001, [1, 1000]))
