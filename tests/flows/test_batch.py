"""End-to-end: the tryon_batch flow on the bundled sample, through Prefect and the emulator."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from uuid import UUID

import polars as pl
import pytest
from PIL import Image

from emulator.server import EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, RunNotStarted, tryon_batch
from tests.flows.conftest import SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e

CC = "changeclothes"


def read_metadata(lake: Path) -> pl.DataFrame:
    return pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    pl.DataFrame(rows).write_csv(path)
    return path


def sample_rows(n: int) -> list[dict[str, str]]:
    """n valid rows over the sample images (absolute paths); each a distinct piece of work
    (its own garment description), so none is deduplicated by the work ledger."""
    images = SAMPLE_MANIFEST.parent / "images"
    garments = ["garment_red_tee.jpg", "garment_striped_tee.jpg", "garment_green_tee.png"]
    people = ["person_ana.jpg", "person_ben.jpg", "person_chi.png"]
    return [
        {
            "id": f"r{i:03d}",
            "person_image": str(images / people[i % 3]),
            "garment_image": str(images / garments[(i // 3) % 3]),
            "category": "upper_body",
            "garment_description": f"look {i}",
        }
        for i in range(n)
    ]


async def test_sample_run_records_every_row(use_emulator: EmulatorServer, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    summary = await tryon_batch(BatchParams(manifest=str(SAMPLE_MANIFEST), lake=str(lake)))

    meta = read_metadata(lake)
    manifest = pl.read_csv(SAMPLE_MANIFEST)
    assert meta.height == manifest.height  # one record per manifest row (one stage)
    assert sorted(meta["row_id"]) == sorted(manifest["id"])
    assert meta.filter(pl.col("run_id") != summary.run_id).is_empty()

    invalid = meta.filter(pl.col("status") == "invalid")
    assert invalid["row_id"].to_list() == ["ana-shoes"]
    assert "unknown category 'shoes'" in invalid["error_message"][0]

    succeeded = meta.filter(pl.col("status") == "succeeded")
    assert succeeded.height == manifest.height - 1
    for row in succeeded.iter_rows(named=True):
        with Image.open(row["output_uri"]) as image:
            image.load()
            assert image.width > 0
        assert Path(row["output_uri"]).is_relative_to(lake)
        assert row["attempts"] == 1 and row["request_id"]
        assert row["person_sha256"] and row["total_ms"] > 0

    # The sideways JPEG with EXIF orientation 6 was sent upright: the result is portrait.
    dev = succeeded.filter(pl.col("row_id") == "dev-red-tee").row(0, named=True)
    with Image.open(dev["output_uri"]) as image:
        assert image.height > image.width

    # Both endpoints were used: 7 garment rows, 1 prompt row; the person images were
    # prepared once each even though rows share them.
    routes = use_emulator.control.stats().requests
    assert routes.get("POST /api/openapi/change-clothes-ai") == 7
    assert routes.get("POST /api/openapi/change-clothes-by-prompt") == 1

    assert summary.counts == {"succeeded": 8, "invalid": 1}
    assert summary.exit_code == 1
    saved = json.loads((lake / "runs" / summary.run_id / "summary.json").read_text())
    assert saved["counts"] == summary.counts

    # The flow run is named after what it ran, not "tall-hyena".
    from prefect import get_client

    async with get_client() as client:
        flow_run = await client.read_flow_run(UUID(summary.run_id))
    assert re.fullmatch(r"manifest-changeclothes-\d{8}T\d{6}Z", flow_run.name), flow_run.name


async def test_permanent_error_is_recorded_and_run_goes_on(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(6))
    use_emulator.control.set_faults(CC, forced_codes=[10005])  # the first call: harmful content
    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(
            BatchParams(
                manifest=str(manifest), lake=str(tmp_path / "lake"), limits={"max_in_flight": 1}
            )
        )
    meta = read_metadata(tmp_path / "lake")
    failed = meta.filter(pl.col("status") == "failed")
    assert failed.height == 1
    assert failed["error_code"][0] == "HARMFUL_CONTENT"
    assert failed["error_kind"][0] == "permanent"
    assert failed["attempts"][0] == 1  # a permanent error is never retried
    assert meta.filter(pl.col("status") == "succeeded").height == 5
    assert caught.value.summary.counts == {"succeeded": 5, "failed": 1}


async def test_transient_errors_are_retried(use_emulator: EmulatorServer, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(4))
    use_emulator.control.set_faults(CC, forced_codes=[500, 20001])  # two transient failures first
    summary = await tryon_batch(
        BatchParams(
            manifest=str(manifest), lake=str(tmp_path / "lake"), limits={"max_in_flight": 1}
        )
    )
    assert summary.counts == {"succeeded": 4}
    meta = read_metadata(tmp_path / "lake")
    assert meta["attempts"].sum() == 4 + 2
    assert summary.provider_calls == 6


async def test_fatal_error_stops_submissions(use_emulator: EmulatorServer, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(12))
    use_emulator.control.set_faults(CC, credits=3)  # three calls succeed, then INSUFFICIENT_CREDITS
    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(
            BatchParams(
                manifest=str(manifest), lake=str(tmp_path / "lake"), limits={"max_in_flight": 1}
            )
        )
    summary = caught.value.summary
    assert summary.counts == {"succeeded": 3, "failed": 1, "skipped": 8}
    assert "INSUFFICIENT_CREDITS" in (summary.fatal_error or "")
    # Exactly one call saw the credit error; nothing was submitted after it.
    assert use_emulator.control.stats().requests["POST /api/openapi/change-clothes-ai"] == 4
    meta = read_metadata(tmp_path / "lake")
    skipped = meta.filter(pl.col("status") == "skipped")
    assert skipped.height == 8 and (skipped["attempts"] == 0).all()
    assert (skipped["error_code"] == "INSUFFICIENT_CREDITS").all()


async def test_in_flight_never_exceeds_limit(use_emulator: EmulatorServer, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(24))
    use_emulator.control.set_faults(CC, latency_s=0.1)
    summary = await tryon_batch(
        BatchParams(
            manifest=str(manifest),
            lake=str(tmp_path / "lake"),
            chunk_size=5,
            limits={"max_in_flight": 3},
        )
    )
    assert summary.counts == {"succeeded": 24}
    assert summary.provider_calls == 24  # counted once each, though chunks overlap
    observed = use_emulator.control.stats().provider(CC).max_in_flight
    assert observed == 3  # reached, never exceeded, across 5 concurrent chunks


async def test_missing_manifest_does_not_start(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    with pytest.raises(RunNotStarted, match=r"nope\.csv"):
        await tryon_batch(BatchParams(manifest=str(tmp_path / "nope.csv"), lake=str(tmp_path)))


async def test_missing_api_key_does_not_start(
    use_emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHANGECLOTHES_API_KEY")
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(2))
    with pytest.raises(RunNotStarted, match="CHANGECLOTHES_API_KEY"):
        await tryon_batch(BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake")))
    assert use_emulator.control.stats().requests.get("POST /api/openapi/change-clothes-ai", 0) == 0


async def test_the_run_logs_every_invalid_row_once_as_validate_prints_it(
    use_emulator: EmulatorServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows the provider cannot take are logged with the manifest's invalid rows, numbered as
    `tryon validate` numbers them, and the counts agree with the run's summary."""
    quick = {"job_queued_s": 0.0, "job_running_s": 0.0}
    use_emulator.control.set_faults({"hidream": quick})
    summary = await tryon_batch(
        BatchParams(manifest=str(SAMPLE_MANIFEST), lake=str(tmp_path / "lake"), provider="hidream")
    )
    assert "2 invalid of 9 rows" in summary.one_line()
    logged = caplog.text
    assert "9 rows: 7 valid, 2 invalid" in logged
    prompt = "row 8 (id 'dev-prompt'): provider 'hidream' needs garment_image"
    shoes = "row 9 (id 'ana-shoes'): unknown category 'shoes'"
    assert logged.count(prompt) == 1 and logged.count(shoes) == 1
    assert "invalid manifest rows" not in logged  # no second, smaller count


async def test_unreadable_input_image_fails_only_its_row(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    rows = sample_rows(3)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows[1]["garment_image"] = str(tmp_path / "broken.jpg")
    rows[2]["person_image"] = str(tmp_path / "missing.jpg")
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(BatchIncomplete):
        await tryon_batch(BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake")))
    meta = read_metadata(tmp_path / "lake").sort("row_id")
    assert meta["status"].to_list() == ["succeeded", "failed", "invalid"]
    assert meta["error_code"].to_list()[1:] == ["DECODE_FAILED", "INVALID_ROW"]
    # A missing local file is found before the run starts, as `tryon validate` finds it.
    assert meta["error_message"][2] == (
        f"no such file in column 'person_image': {tmp_path / 'missing.jpg'}"
    )
    # Neither bad row reached the provider.
    assert use_emulator.control.stats().requests["POST /api/openapi/change-clothes-ai"] == 1


async def test_api_key_from_a_prefect_secret_block_never_lands_in_outputs(
    use_emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    key = os.environ["CHANGECLOTHES_API_KEY"]  # the one the emulator accepts (use_emulator)
    monkeypatch.delenv("CHANGECLOTHES_API_KEY")
    await Secret(value=key).save("changeclothes-api-key", overwrite=True)
    try:
        manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
        summary = await tryon_batch(
            BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake"))
        )
    finally:
        await Secret.adelete("changeclothes-api-key")
    assert summary.counts == {"succeeded": 3}
    assert "CHANGECLOTHES_API_KEY" not in os.environ  # supplied in memory, not via the env
    for path in (tmp_path / "lake").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


async def test_concurrent_runs_share_the_global_limit(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Two runs at once, each wanting 3 in flight, against an account-wide limit of 3."""
    import asyncio

    from prefect import get_client

    use_emulator.control.set_faults(CC, latency_s=0.1)
    manifests = [write_manifest(tmp_path / f"m{i}.csv", sample_rows(12)) for i in (1, 2)]
    limits = {"max_in_flight": 3, "global_max_in_flight": 3}
    try:
        summaries = await asyncio.gather(
            *(
                tryon_batch(
                    BatchParams(manifest=str(m), lake=str(tmp_path / "lake"), limits=limits)
                )
                for m in manifests
            )
        )
        assert [s.counts for s in summaries] == [{"succeeded": 12}] * 2
        observed = use_emulator.control.stats().provider(CC).max_in_flight
        assert observed == 3  # each run alone would reach 3; together they never pass 3
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name("tryon-changeclothes")
        assert limit.limit == 3 and limit.active_slots == 0  # every lease was given back
    finally:
        async with get_client() as client:  # leave the default for the other tests
            await client.upsert_global_concurrency_limit_by_name("tryon-changeclothes", 8)


async def test_a_run_never_asks_for_more_than_the_global_limit(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    from prefect import get_client

    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name("tryon-changeclothes", 2)
    use_emulator.control.set_faults(CC, latency_s=0.1)
    try:
        summary = await tryon_batch(
            BatchParams(
                manifest=str(write_manifest(tmp_path / "m.csv", sample_rows(10))),
                lake=str(tmp_path / "lake"),
                limits={"max_in_flight": 6},
            )
        )
    finally:
        async with get_client() as client:
            await client.upsert_global_concurrency_limit_by_name("tryon-changeclothes", 8)
    assert summary.counts == {"succeeded": 10}
    assert use_emulator.control.stats().provider(CC).max_in_flight == 2
