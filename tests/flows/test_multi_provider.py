"""Many providers in one run, end to end against the emulator: compare side by side, route by
category, fall back when a provider fails a row; and a rerun of each pays nothing."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, tryon_batch
from tests.flows.test_batch import read_metadata, sample_rows, write_manifest

pytestmark = pytest.mark.e2e

CC, HD = "changeclothes", "hidream"
CC_SUBMIT = "POST /api/openapi/change-clothes"  # garment and prompt endpoints
HD_SUBMIT = "POST /api-pub/ec/v3/image/vton/async"


def submits(emulator: EmulatorServer, route: str) -> int:
    """Calls on routes starting with ``route``: work sent (polls and downloads are GETs)."""
    return emulator.control.posts(route)


def fast_hidream(emulator: EmulatorServer) -> None:
    """HiDream's jobs finish at once (its default phases take a second)."""
    emulator.control.set_faults(HD, job_queued_s=0, job_running_s=0)


def tryon_records(lake: Path) -> pl.DataFrame:
    return read_metadata(lake).filter(pl.col("stage") == "tryon").sort("row_index", "started_at")


def assert_one_record_per_row_stage_provider(lake: Path) -> None:
    pairs = read_metadata(lake).group_by("row_index", "stage", "provider", "track").len()
    assert pairs.filter(pl.col("len") > 1).is_empty(), pairs.filter(pl.col("len") > 1)


async def test_compare_sends_every_row_to_both_providers_and_a_rerun_pays_nothing(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    fast_hidream(use_emulator)
    prompt_row = {**sample_rows(1)[0], "id": "p1", "garment_image": "", "category": ""}
    prompt_row["prompt"] = "a blue striped shirt"
    rows = [{**row, "prompt": ""} for row in sample_rows(5)] + [prompt_row]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), compare=[HD])

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 6}
    # HiDream has no prompt endpoint: the prompt row is a finished skip on its track.
    assert summary.compare_counts == {HD: {"succeeded": 5, "skipped": 1}}
    assert submits(use_emulator, CC_SUBMIT) == 6 and submits(use_emulator, HD_SUBMIT) == 5
    records = tryon_records(lake)
    assert records.height == 12
    by_track = records.group_by("track", "provider").len().sort("track")
    assert by_track.rows() == [(HD, HD, 6), ("primary", CC, 6)]
    skipped = records.filter(pl.col("status") == "skipped")
    assert skipped["row_id"].to_list() == ["p1"]
    assert skipped["error_code"].to_list() == ["PROVIDER_CANNOT_TAKE"]
    assert "prompt" in skipped["error_message"][0]
    # Both providers' results are in the lake, one per row each, and in the contact sheet.
    for uri in records.filter(pl.col("status") == "succeeded")["output_uri"]:
        assert Path(uri).is_file()
    page = (lake / "runs" / summary.run_id / "contact_sheet.html").read_text()
    assert "<th>changeclothes</th>" in page and f"<th>{HD}</th>" in page

    use_emulator.control.reset()
    again = await tryon_batch(params)
    assert use_emulator.control.posts() == 0 and again.provider_calls == 0
    assert again.counts == summary.counts and again.compare_counts == summary.compare_counts
    assert_one_record_per_row_stage_provider(lake)


async def test_route_by_category_and_the_provider_column_still_wins(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    fast_hidream(use_emulator)
    rows = sample_rows(6)
    for row in rows[:3]:
        row["category"] = "dresses"
    for row in rows:
        row["provider"] = ""
    rows[0]["provider"] = CC  # named: wins over the route
    manifest = write_manifest(tmp_path / "m.csv", rows)
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), route={"dresses": HD})

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 6}
    records = tryon_records(lake)
    providers = dict(zip(records["row_id"], records["provider"], strict=True))
    assert providers == {"r000": CC, "r001": HD, "r002": HD, "r003": CC, "r004": CC, "r005": CC}
    assert submits(use_emulator, HD_SUBMIT) == 2 and submits(use_emulator, CC_SUBMIT) == 4

    use_emulator.control.reset()
    await tryon_batch(params)
    assert use_emulator.control.posts() == 0
    assert_one_record_per_row_stage_provider(lake)


async def test_fallback_when_the_primary_runs_out_of_credits_half_way(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    fast_hidream(use_emulator)
    use_emulator.control.set_faults(CC, credits=4)  # four calls succeed, then no credits
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(10))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest), lake=str(lake), fallback=[HD], limits={"max_in_flight": 1}
    )

    summary = await tryon_batch(params)  # every row succeeds: no BatchIncomplete

    assert summary.counts == {"succeeded": 10} and summary.unfinished == 0
    assert summary.fell_back == 6
    assert "INSUFFICIENT_CREDITS" in (summary.fatal_error or "")
    # The primary's calls stop at the credit error: four paid, one refused, none after.
    assert submits(use_emulator, CC_SUBMIT) == 5
    assert submits(use_emulator, HD_SUBMIT) == 6
    records = tryon_records(lake)
    left = records.filter(pl.col("fallback_to").is_not_null())
    assert left.height == 6 and (left["provider"] == CC).all() and (left["fallback_to"] == HD).all()
    assert sorted(left["status"].to_list()) == ["failed"] + ["skipped"] * 5
    assert left["attempts"].sum() == 1  # only the call that met the credit error
    came = records.filter(pl.col("fallback_from").is_not_null())
    assert came.height == 6 and (came["provider"] == HD).all()
    assert (came["status"] == "succeeded").all()
    assert sorted(came["row_id"]) == sorted(left["row_id"])

    # The primary has credits again: the rerun still calls nobody (the fallback's work is
    # found through the primary's work key).
    use_emulator.control.reset(faults=True)
    again = await tryon_batch(params)
    assert use_emulator.control.posts() == 0 and again.provider_calls == 0
    assert again.counts == {"succeeded": 10} and again.already_done == 10
    assert_one_record_per_row_stage_provider(lake)


async def test_a_bad_input_does_not_fall_back(use_emulator: EmulatorServer, tmp_path: Path) -> None:
    fast_hidream(use_emulator)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = sample_rows(3)
    rows.append({**rows[0], "id": "bad", "person_image": str(broken)})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), fallback=[HD])

    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(params)

    assert caught.value.summary.counts == {"succeeded": 3, "failed": 1}
    assert caught.value.summary.fell_back == 0
    bad = tryon_records(lake).filter(pl.col("row_id") == "bad")
    assert bad.height == 1 and bad["provider"][0] == CC
    assert bad["fallback_to"][0] is None and bad["attempts"][0] == 0
    assert bad["error_code"][0] == "DECODE_FAILED"
    assert submits(use_emulator, HD_SUBMIT) == 0

    use_emulator.control.reset()
    with pytest.raises(BatchIncomplete):
        await tryon_batch(params)
    assert use_emulator.control.posts() == 0


async def test_spent_retries_and_moderation_fall_back_and_a_fallback_that_cannot_take_is_passed(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    fast_hidream(use_emulator)
    rows = [{**row, "prompt": ""} for row in sample_rows(3)]
    prompt_row = {**rows[0], "id": "p1", "garment_image": "", "category": ""}
    rows.append({**prompt_row, "prompt": "a green coat"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    use_emulator.control.set_faults(CC, error_rate_5xx=1.0)  # every call a 503
    params = BatchParams(
        manifest=str(manifest), lake=str(tmp_path / "lake"), fallback=[HD], max_attempts=2
    )

    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(params)

    # Each garment row spends its two attempts, then succeeds on HiDream. The prompt row
    # has nowhere to go: HiDream takes no prompts.
    summary = caught.value.summary
    assert summary.counts == {"succeeded": 3, "failed": 1} and summary.fell_back == 3
    records = tryon_records(tmp_path / "lake")
    left = records.filter(pl.col("fallback_to").is_not_null())
    assert sorted(left["row_id"]) == ["r000", "r001", "r002"]
    assert (left["attempts"] == 2).all() and (left["error_kind"] == "transient").all()
    stuck = records.filter(pl.col("row_id") == "p1")
    assert stuck.height == 1 and stuck["fallback_to"][0] is None
    assert stuck["attempts"][0] == 2
    assert submits(use_emulator, HD_SUBMIT) == 3

    # A refusal for the content is the provider's own: the next provider may not share it.
    use_emulator.control.reset(faults=True)
    fast_hidream(use_emulator)
    use_emulator.control.set_faults(CC, forced_codes=[10005])
    one = write_manifest(tmp_path / "one.csv", sample_rows(1))
    lake = tmp_path / "lake-2"
    summary = await tryon_batch(BatchParams(manifest=str(one), lake=str(lake), fallback=[HD]))
    assert summary.counts == {"succeeded": 1} and summary.fell_back == 1
    first, last = tryon_records(lake).rows(named=True)
    assert (first["error_code"], first["fallback_to"]) == ("HARMFUL_CONTENT", HD)
    assert (last["provider"], last["fallback_from"], last["status"]) == (HD, CC, "succeeded")


async def test_a_blank_or_unchanged_result_falls_back_and_a_rerun_pays_nothing(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    fast_hidream(use_emulator)
    use_emulator.control.set_faults(CC, bad_outputs=["blank", "unchanged"])
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(5))
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), fallback=[HD])

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 5} and summary.fell_back == 2
    records = tryon_records(lake)
    left = records.filter(pl.col("fallback_to") == HD)
    assert sorted(left["error_code"]) == ["OUTPUT_BLANK", "OUTPUT_UNCHANGED"]
    # A rejected result is not kept: nothing in the lake, nothing in the ledger.
    assert left["output_uri"].is_null().all() and left["attempts"].to_list() == [1, 1]
    came = records.filter(pl.col("fallback_from") == CC)
    assert sorted(came["row_id"]) == sorted(left["row_id"])
    assert (came["status"] == "succeeded").all()
    assert submits(use_emulator, CC_SUBMIT) == 5 and submits(use_emulator, HD_SUBMIT) == 2

    use_emulator.control.reset(faults=True)
    again = await tryon_batch(params)
    assert use_emulator.control.posts() == 0 and again.already_done == 5


async def test_the_scorecard_agrees_with_the_emulators_own_counts(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    fast_hidream(use_emulator)
    # The primary: one blank result, then three paid calls, then no credits (answers 10003).
    use_emulator.control.set_faults(CC, credits=4, bad_outputs=["blank"])
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(9))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest),
        lake=str(lake),
        fallback=[HD],
        compare=["tencent"],
        limits={"max_in_flight": 1},
    )

    summary = await tryon_batch(params)

    card = pl.read_parquet(lake / "runs" / summary.run_id / "scorecard.parquet")
    tryon = {row["provider"]: row for row in card.filter(stage="tryon").iter_rows(named=True)}
    stats = use_emulator.control.stats()
    # Calls: the scorecard's attempts are the submissions the emulator answered.
    assert tryon[CC]["attempts"] == submits(use_emulator, CC_SUBMIT) == 5
    assert tryon[HD]["attempts"] == submits(use_emulator, HD_SUBMIT)
    assert tryon["tencent"]["attempts"] == stats.provider("tencent").requests == 9
    # Outcomes: what the emulator answered with success, less the result the checks refused.
    cc = stats.provider(CC)
    codes = {c["code"]: c["count"] for c in tryon[CC]["failed_by_code"]}
    assert codes == {"OUTPUT_BLANK": 1, "INSUFFICIENT_CREDITS": 1}
    assert cc.bad_outputs == {"blank": 1} and cc.errors["10003"] == 1
    assert tryon[CC]["succeeded"] == cc.succeeded - 1 == 3
    assert tryon[HD]["succeeded"] == submits(use_emulator, HD_SUBMIT) == 6
    assert tryon["tencent"]["succeeded"] == stats.provider("tencent").succeeded == 9
    # Fallbacks: out of the primary, into the fallback, as the summary counts rows.
    assert tryon[CC]["fallbacks_out"] == tryon[HD]["fallbacks_in"] == summary.fell_back == 6
    assert tryon[CC]["rows"] == 9 and tryon[HD]["rows"] == 6 and tryon["tencent"]["rows"] == 9
    assert tryon[CC]["provider_ms_p50"] <= tryon[CC]["provider_ms_p95"]


async def test_with_the_refiner_on_it_refines_whichever_result_succeeded(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    fast_hidream(use_emulator)
    use_emulator.control.set_faults("ailab", job_queued_s=0, job_running_s=0)
    use_emulator.control.set_faults(CC, bad_outputs=["blank"])
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(1))
    lake = tmp_path / "lake"
    summary = await tryon_batch(
        BatchParams(
            manifest=str(manifest),
            lake=str(lake),
            fallback=[HD],
            refine=True,
            refine_gender="woman",
        )
    )
    assert summary.counts == {"succeeded": 1} and summary.refine_counts == {"succeeded": 1}
    meta = read_metadata(lake)
    coarse = meta.filter(stage="tryon", status="succeeded")
    refined = meta.filter(stage="refine")
    assert coarse["provider"].to_list() == [HD]
    assert refined["coarse_provider"].to_list() == [HD] and refined["status"][0] == "succeeded"
