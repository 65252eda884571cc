"""Money end to end against the emulator: a record's cost is what the vendor charged, a budget
caps the calls a run pays for, and a rerun with more budget goes on without paying twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, RunNotStarted, tryon_batch
from tests.flows.test_batch import CC, read_metadata, sample_rows, write_manifest

pytestmark = pytest.mark.e2e

CC_SUBMIT = "POST /api/openapi/change-clothes"
PRICE = 0.1


def priced(manifest: Path, lake: Path, **fields: object) -> BatchParams:
    return BatchParams(
        manifest=str(manifest),
        lake=str(lake),
        prices={CC: PRICE},
        **fields,  # type: ignore[arg-type]
    )


async def test_a_budget_of_k_calls_pays_k_and_a_rerun_with_more_finishes_without_paying_twice(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    use_emulator.control.set_faults(CC, latency_s=0.05)  # calls overlap: reservations matter
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(8))
    lake = tmp_path / "lake"

    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(priced(manifest, lake, budget=0.3, limits={"max_in_flight": 4}))

    summary = caught.value.summary
    assert use_emulator.control.posts(CC_SUBMIT) == 3  # never a fourth, though 4 in flight
    assert summary.counts == {"succeeded": 3, "skipped": 5}
    assert summary.budget_exhausted and summary.cost == pytest.approx(0.3)
    assert summary.currency == "USD" and summary.budget == 0.3
    assert "BUDGET_EXHAUSTED" in (summary.fatal_error or "")
    meta = read_metadata(lake)
    skipped = meta.filter(status="skipped")
    assert (skipped["error_code"] == "BUDGET_EXHAUSTED").all()
    assert (skipped["attempts"] == 0).all() and (skipped["cost"] == 0).all()
    assert meta.filter(status="succeeded")["cost"].to_list() == [PRICE] * 3

    use_emulator.control.reset()
    again = await tryon_batch(priced(manifest, lake, budget=1.0))
    assert again.counts == {"succeeded": 8} and not again.budget_exhausted
    assert use_emulator.control.posts(CC_SUBMIT) == 5  # only the rows the budget stopped
    assert again.cost == pytest.approx(0.5) and again.already_done == 3


async def test_only_charged_calls_cost_and_a_refused_result_was_charged(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    # A processing failure (500) is not billed and is retried; the retry is. A blank result
    # was billed by the vendor though the checks refuse it.
    use_emulator.control.set_faults(CC, forced_codes=[500], bad_outputs=["blank"])
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(1))
    lake = tmp_path / "lake"
    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(priced(manifest, lake, budget=0.1, limits={"max_in_flight": 1}))
    # The budget of one call was enough: the uncharged 500 gave its reservation back.
    record = read_metadata(lake).row(0, named=True)
    assert record["attempts"] == 2 and record["error_code"] == "OUTPUT_BLANK"
    assert record["cost"] == pytest.approx(PRICE)
    assert caught.value.summary.cost == pytest.approx(PRICE)
    assert not caught.value.summary.budget_exhausted


async def test_costs_are_unknown_without_prices_and_a_budget_then_refuses_to_start(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(2))
    summary = await tryon_batch(
        BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake"), currency="EUR")
    )
    assert summary.currency == "EUR" and summary.cost is None
    assert summary.unpriced == ["changeclothes"]
    assert read_metadata(tmp_path / "lake")["cost"].is_null().all()

    use_emulator.control.reset()
    lake = tmp_path / "lake-2"
    with pytest.raises(RunNotStarted, match=r"--price changeclothes=AMOUNT"):
        await tryon_batch(
            BatchParams(manifest=str(manifest), lake=str(lake), currency="EUR", budget=5)
        )
    assert use_emulator.control.posts() == 0 and not lake.exists()


async def test_prices_from_the_workers_environment(
    use_emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRYON_PRICES", f"{CC}=0.25")
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(2))
    summary = await tryon_batch(BatchParams(manifest=str(manifest), lake=str(tmp_path / "l")))
    assert summary.cost == pytest.approx(0.5)
    assert read_metadata(tmp_path / "l")["cost"].to_list() == [0.25, 0.25]
    assert summary.currency == "USD"


async def test_a_published_price_is_the_default_in_its_currency(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    # AILabTools publishes its price (providers/ailab/settings.py): no --price needed.
    from providers.ailab.settings import PRICE

    assert PRICE is not None and PRICE.currency == "USD"
    use_emulator.control.set_faults("ailab", job_queued_s=0, job_running_s=0)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    summary = await tryon_batch(
        BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake"), provider="ailab", budget=1)
    )
    assert summary.counts == {"succeeded": 3}
    assert summary.cost == pytest.approx(3 * float(PRICE.amount))


async def test_the_plan_counts_the_calls_and_cost_the_run_then_makes(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    from flows.estimate import estimate_for

    fast = {"job_queued_s": 0, "job_running_s": 0}
    use_emulator.control.set_faults("hidream", **fast)
    use_emulator.control.set_faults("ailab", **fast)
    rows = sample_rows(8)
    lake = tmp_path / "lake"
    options = {
        "prices": {CC: PRICE, "hidream": 0.2, "ailab_refiner": 0.05},
        "refine": True,
        "refine_gender": "woman",
        "compare": ["hidream"],
    }
    # Three rows done by an earlier run, with the refiner and the comparison.
    first = write_manifest(tmp_path / "first.csv", rows[:3])
    await tryon_batch(BatchParams(manifest=str(first), lake=str(lake), **options))  # type: ignore[arg-type]
    use_emulator.control.reset()

    manifest = write_manifest(tmp_path / "m.csv", rows)
    params = BatchParams(manifest=str(manifest), lake=str(lake), **options)  # type: ignore[arg-type]
    estimate = estimate_for(params)
    lines = {(r["provider"], r["track"]): r for r in estimate.lines.iter_rows(named=True)}
    assert lines[(CC, "primary")]["done"] == 3 and lines[(CC, "primary")]["calls"] == 5
    assert lines[("hidream", "hidream")]["calls"] == 5
    assert lines[("ailab_refiner", "primary")]["calls"] == 5
    assert use_emulator.control.posts() == 0  # planning called nobody

    summary = await tryon_batch(params)

    assert use_emulator.control.posts(CC_SUBMIT) == lines[(CC, "primary")]["calls"]
    assert use_emulator.control.posts("POST /api-pub/ec/v3/image/vton") == 5
    # Every call the run made, refiner's included, the plan counted: 5 + 5 + 2 x 5.
    assert estimate.calls == summary.provider_calls == 20
    assert summary.cost == pytest.approx(estimate.cost)
    assert estimate.cost == pytest.approx(5 * PRICE + 5 * 0.2 + 10 * 0.05)


async def test_the_cli_takes_prices_and_a_budget_and_says_what_was_spent(tmp_path: Path) -> None:
    import asyncio

    from tests.flows.test_run_explains import tryon

    write_manifest(tmp_path / "m.csv", sample_rows(4))
    run = ["run", "m.csv", "--emulator", "--lake", "lake", "--no-progress"]
    done = await asyncio.to_thread(
        tryon, *run, "--price", f"{CC}=0.1", "--budget", "0.2", "--max-in-flight", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Cost:     0.2 USD (budget 0.2 USD, reached: rows not started are BUDGET_EXHAUSTED)" in (
        done.stdout
    )
    assert "2 succeeded / 0 failed / 0 invalid / 2 skipped of 4 rows" in done.stdout
    for bad, said in (
        (["--price", f"{CC}=cheap"], f"--price {CC}: 'cheap' is not an amount"),
        (["--budget", "5", "--currency", "EUR"], "a budget needs the price"),
        (["--currency", "dollars"], "currency must be an ISO 4217 code"),
    ):
        refused = await asyncio.to_thread(tryon, *run, *bad, cwd=tmp_path)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr


async def test_a_run_the_account_cannot_pay_does_not_start(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    # AILabTools documents its credit balance (10 credits a try-on): the run checks it first.
    use_emulator.control.set_faults("ailab", credits=25, job_queued_s=0, job_running_s=0)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), provider="ailab")
    with pytest.raises(RunNotStarted, match=r"ailab has 25 credits and this run needs 30"):
        await tryon_batch(params)
    assert use_emulator.control.posts() == 0 and not lake.exists()

    use_emulator.control.set_faults("ailab", credits=30)
    summary = await tryon_batch(params)
    assert summary.counts == {"succeeded": 3}
    # Done rows are free: the same manifest needs nothing more of an empty account.
    use_emulator.control.set_faults("ailab", credits=0)
    again = await tryon_batch(params)
    assert again.already_done == 3 and use_emulator.control.posts("POST") == 3
