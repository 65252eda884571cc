"""Every provider end to end on the bundled sample, against the emulator, with and without the
refiner: what a user with real keys would run, changing nothing but configuration."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from emulator.server import EmulatorServer
from flows.batch import BatchParams, tryon_batch
from tests.flows.conftest import SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e

# The sample's prompt row needs a prompt endpoint: only ChangeClothesAI has one.
EXPECTED = {
    "changeclothes": {"succeeded": 8, "invalid": 1},
    "tencent": {"succeeded": 7, "invalid": 2},
    "hidream": {"succeeded": 7, "invalid": 2},
    "ailab": {"succeeded": 7, "invalid": 2},
}
# Rows the refiner can take: a top garment (upper_body or dresses) and a coarse result.
REFINABLE = {"ana-red-tee", "ben-striped", "chi-dress", "chi-green", "dev-red-tee"}


def quick_jobs(emulator: EmulatorServer) -> None:
    """Async jobs finish at once, so polling clients see them done on their first query."""
    plan = {"job_queued_s": 0.0, "job_running_s": 0.0}
    emulator.control.set_faults({"hidream": plan, "ailab": plan})


def check_outputs(meta: pl.DataFrame, lake: Path) -> None:
    for uri in meta.filter(pl.col("status") == "succeeded")["output_uri"]:
        assert Path(uri).is_relative_to(lake)
        with Image.open(uri) as image:
            image.load()


@pytest.mark.parametrize("provider", sorted(EXPECTED))
async def test_each_provider_runs_the_sample(
    provider: str, use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator)
    lake = tmp_path / "lake"
    try:
        summary = await tryon_batch(
            BatchParams(manifest=str(SAMPLE_MANIFEST), lake=str(lake), provider=provider)
        )
    except Exception as exc:  # pragma: no cover - show the per-row story on failure
        meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
        pytest.fail(f"{exc}\n{meta.select('row_id', 'status', 'error_code', 'error_message')}")
    assert summary.counts == EXPECTED[provider]
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    assert meta.height == 9 and set(meta["stage"]) == {"tryon"}
    assert set(meta.filter(pl.col("status") == "succeeded")["provider"]) == {provider}
    assert meta.filter(pl.col("status") == "succeeded")["request_id"].null_count() == 0
    check_outputs(meta, lake)
    if provider == "tencent":
        # Inputs went by URL: staged content-addressed in the lake, fetched from there.
        assert list((lake / "inputs").glob("*.jpg"))


@pytest.mark.parametrize("provider", ["changeclothes", "tencent"])
async def test_refine_chains_onto_any_provider(
    provider: str, use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator)
    lake = tmp_path / "lake"
    summary = await tryon_batch(
        BatchParams(manifest=str(SAMPLE_MANIFEST), lake=str(lake), provider=provider, refine=True)
    )
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    refine = meta.filter(pl.col("stage") == "refine")
    tryon = meta.filter(pl.col("stage") == "tryon")
    # Both stages are recorded, for every valid row; both outputs are kept.
    assert set(refine["row_id"]) == set(tryon.filter(pl.col("status") != "invalid")["row_id"])
    refined = refine.filter(pl.col("status") == "succeeded")
    assert set(refined["row_id"]) == REFINABLE
    assert set(refined["provider"]) == {"ailab_refiner"}
    not_applicable = refine.filter(pl.col("status") == "skipped")
    assert set(not_applicable["error_code"]) == {"REFINE_NOT_APPLICABLE"}
    check_outputs(meta, lake)
    joined = tryon.join(refined, on="row_id", suffix="_refined")
    for row in joined.iter_rows(named=True):
        assert row["output_uri"] != row["output_uri_refined"]
        assert row["output_sha256"] != row["output_sha256_refined"]
    assert summary.refine_counts is not None
    assert summary.refine_counts["succeeded"] == len(REFINABLE)
    assert summary.unfinished == 0
    routes = use_emulator.control.stats().requests
    assert routes["POST /api/portrait/enhance/try-on-clothes-refiner"] == len(REFINABLE)
    # The accounts' global limits, named as the README says: tryon-<provider>, with dashes.
    from prefect import get_client

    async with get_client() as client:
        names = {limit.name for limit in await client.read_global_concurrency_limits(limit=200)}
    assert {f"tryon-{provider}", "tryon-ailab-refiner"} <= names
    assert not any("_" in name for name in names if name.startswith("tryon-"))


async def test_refine_without_gender_makes_rows_invalid_before_any_call(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.csv"
    pl.read_csv(SAMPLE_MANIFEST).drop("gender").with_columns(
        pl.col("person_image").map_elements(
            lambda p: str(SAMPLE_MANIFEST.parent / p), return_dtype=pl.String
        ),
        pl.col("garment_image").map_elements(
            lambda p: str(SAMPLE_MANIFEST.parent / p) if p else None, return_dtype=pl.String
        ),
    ).write_csv(manifest)
    summary = await tryon_batch(
        BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake"), refine=True)
    )
    # Refinable rows without gender never reach any provider; the others run.
    assert summary.counts["invalid"] == 1 + len(REFINABLE)
    assert summary.counts["succeeded"] == 3
    meta = pl.scan_parquet(f"{tmp_path}/lake/metadata/**/*.parquet").collect()
    msgs = meta.filter(pl.col("row_id") == "ana-red-tee")["error_message"].to_list()
    assert msgs == ["refine needs gender (woman|man): fill the gender column or set refine_gender"]
    # With a default gender they all run.
    summary = await tryon_batch(
        BatchParams(
            manifest=str(manifest),
            lake=str(tmp_path / "lake2"),
            refine=True,
            refine_gender="woman",
        )
    )
    assert summary.counts == {"succeeded": 8, "invalid": 1}
