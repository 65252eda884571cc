"""Reruns never pay twice: finished work is skipped, a crashed run's accepted jobs are resumed,
and the metadata dataset never holds a (row, stage) pair twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, tryon_batch
from tests.flows.conftest import REPO, SAMPLE_MANIFEST
from tests.flows.test_batch import sample_rows, write_manifest
from tests.prefect_server import PrefectServer

pytestmark = pytest.mark.e2e

HIDREAM_SUBMIT = "POST /api-pub/ec/v3/image/vton/async"


def dataset(lake: Path) -> pl.DataFrame:
    return pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()


def assert_no_duplicate_pairs(frame: pl.DataFrame) -> None:
    pairs = frame.group_by("row_id", "stage").len().filter(pl.col("len") > 1)
    assert pairs.is_empty(), pairs


async def test_rerun_of_a_finished_manifest_calls_no_provider(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(SAMPLE_MANIFEST), lake=str(lake), refine=True, refine_gender="woman"
    )
    first = await tryon_batch(params)
    assert first.counts == {"succeeded": 8, "invalid": 1}
    assert use_emulator.control.posts() > 8  # try-on and refine calls went out
    before = dataset(lake)

    use_emulator.control.reset()
    second = await tryon_batch(params)

    assert use_emulator.control.posts() == 0
    assert second.provider_calls == 0
    assert second.counts == first.counts and second.already_done == 8
    assert second.refine_counts == first.refine_counts
    after = dataset(lake)
    assert_no_duplicate_pairs(after)
    assert after.height == before.height  # the rerun added nothing: it was all there
    for run in (first.run_id, second.run_id):
        assert (lake / "runs" / run / "_COMMITTED").is_file()


async def test_rerun_does_only_what_is_unfinished(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(9))
    params = BatchParams(manifest=str(manifest), lake=str(lake), max_attempts=1)
    use_emulator.control.set_faults("changeclothes", forced_codes=[10004, 10004])  # 2 rows rejected
    with pytest.raises(BatchIncomplete) as failed:
        await tryon_batch(params)
    assert failed.value.summary.counts == {"succeeded": 7, "failed": 2}

    use_emulator.control.reset()
    second = await tryon_batch(params)
    assert second.counts == {"succeeded": 9} and second.already_done == 7
    assert use_emulator.control.stats().requests["POST /api/openapi/change-clothes-ai"] == 2
    frame = dataset(lake)
    latest = frame.sort("finished_at").group_by("row_id").last()
    assert latest["status"].to_list() == ["succeeded"] * 9
    # History is kept (the failed attempts of run 1), never the same outcome twice.
    assert frame.filter(pl.col("status") == "succeeded").group_by("row_id").len()["len"].max() == 1


async def test_prefect_retry_of_the_same_flow_run_redoes_only_unfinished_rows(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    """What a retry from the UI does: the same flow run (same id) runs again."""
    from prefect import get_client
    from prefect.flow_engine import run_flow_async
    from prefect.states import Scheduled

    lake = tmp_path / "lake"
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(6))
    params = BatchParams(manifest=str(manifest), lake=str(lake), max_attempts=1)
    use_emulator.control.set_faults("changeclothes", forced_codes=[10004])
    async with get_client() as client:
        flow_run = await client.create_flow_run(tryon_batch, parameters={"params": params})
        state = await run_flow_async(
            tryon_batch, flow_run=flow_run, parameters={"params": params}, return_type="state"
        )
        assert state.is_failed()
        assert dataset(lake).filter(pl.col("status") == "failed").height == 1

        use_emulator.control.reset()
        await client.set_flow_run_state(flow_run.id, Scheduled(), force=True)
        flow_run = await client.read_flow_run(flow_run.id)
        state = await run_flow_async(
            tryon_batch, flow_run=flow_run, parameters={"params": params}, return_type="state"
        )
    assert state.is_completed()
    assert use_emulator.control.stats().requests["POST /api/openapi/change-clothes-ai"] == 1
    frame = dataset(lake)
    assert frame["run_id"].unique().to_list() == [str(flow_run.id)]
    assert_no_duplicate_pairs(frame)  # the retry replaced the run's parts in place
    assert frame["status"].to_list() == ["succeeded"] * 6


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.json")) if folder.exists() else 0


def test_sigkill_mid_run_then_rerun_resumes_accepted_jobs(
    use_emulator: EmulatorServer, real_prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """HiDream jobs take ~3 s: kill the run once some rows are done and jobs are accepted.

    Against a real ``prefect server start``: the rerun, on the same machine, releases the
    killed run's global-limit lease as it starts (the server's repossessor would after 60 s).
    """
    rows = sample_rows(9)  # nine distinct person x garment pairs: nine pieces of work
    manifest = write_manifest(tmp_path / "m.csv", rows)
    lake = tmp_path / "lake"
    use_emulator.control.set_faults("hidream", job_queued_s=0.5, job_running_s=2.5)
    env = real_prefect_server.env(PYTHONPATH=str(REPO), TRYON_LEASE_DURATION_S="60")
    argv = [sys.executable, "-m", "flows.cli", "run", str(manifest), "--lake", str(lake)]
    argv += ["--provider", "hidream"]

    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (_count(lake / "work") >= 2 and _count(lake / "jobs") >= 2):
        if first.poll() is not None:
            stderr = first.stderr.read().decode() if first.stderr else ""
            raise AssertionError(f"the run ended before it could be killed:\n{stderr[-3000:]}")
        assert time.monotonic() < deadline, "no progress to kill in the middle of"
        time.sleep(0.05)
    # The kill, on the emulator's call-log clock: sent after ``kill_from``, landed by ``kill_to``.
    kill_from = use_emulator.control.clock_s()
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    kill_to = use_emulator.control.clock_s()
    accepted_before = use_emulator.control.stats().requests.get(HIDREAM_SUBMIT, 0)
    in_flight_jobs = _count(lake / "jobs")
    assert 0 < accepted_before < len(rows) + 1 and in_flight_jobs >= 1
    assert not list((lake / "runs").glob("*/_COMMITTED"))  # the killed run never committed

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    # Every job whose acceptance reached the run was polled again, none submitted twice: one
    # submission per row, plus at most those accepted while their answer may still have been
    # on its way at the kill (the run never learnt those job ids, and HiDream has no
    # idempotency key). Which of them the run did read before dying, no outside clock can tell.
    answers_maybe_lost = [
        call
        for call in use_emulator.control.calls().calls
        if call.route == HIDREAM_SUBMIT
        and call.arrived_s <= kill_to
        and call.answered_s > kill_from
        and call.status == 200
        and call.fault is None
    ]
    submitted = use_emulator.control.stats().requests[HIDREAM_SUBMIT]
    assert len(rows) <= submitted <= len(rows) + len(answers_maybe_lost)
    assert _count(lake / "jobs") == 0
    frame = dataset(lake)
    assert sorted(frame["row_id"]) == sorted(r["id"] for r in rows)
    assert frame["status"].to_list() == ["succeeded"] * len(rows)
    assert_no_duplicate_pairs(frame)
    # Outputs are named by content: every file is one the dataset points at, no orphans.
    files = {str(p) for p in (lake / "outputs").iterdir()}
    assert files == set(frame["output_uri"]) | set(frame["mask_uri"].drop_nulls())
    # Rows the killed run finished were adopted, not redone.
    assert frame["reused_from_run"].drop_nulls().len() >= 2


async def test_a_rerun_finds_finished_rows_from_their_sources_and_decodes_nothing(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    """The work keys of finished rows come from the source index (size, times, inode of each
    file): no image is read or decoded, no provider called. A photo rewritten in place (its
    old modification time put back) is a new source: only its rows are done again."""
    import os
    import shutil

    from PIL import Image

    sample = tmp_path / "sample"
    shutil.copytree(SAMPLE_MANIFEST.parent / "images", sample / "images")
    shutil.copy(SAMPLE_MANIFEST, sample / "manifest.csv")
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(sample / "manifest.csv"), lake=str(lake), refine=True, refine_gender="woman"
    )
    first = await tryon_batch(params)
    assert first.counts == {"succeeded": 8, "invalid": 1}
    assert first.images_prepared and first.images_prepared > 0
    assert list((lake / "sources").glob("*.parquet"))

    use_emulator.control.reset()
    second = await tryon_batch(params)
    assert use_emulator.control.posts() == 0 and second.provider_calls == 0
    assert second.images_prepared == 0
    assert second.images_recognised and second.images_recognised >= 8
    assert second.counts == first.counts and second.already_done == 8
    assert second.refine_counts == first.refine_counts

    # person_dev.jpg (rows dev-red-tee, dev-prompt) redrawn, same modification time.
    photo = sample / "images" / "person_dev.jpg"
    stat = photo.stat()
    with Image.open(photo) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo, "JPEG", quality=90)
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    use_emulator.control.reset()
    third = await tryon_batch(params)
    assert third.counts == first.counts and third.already_done == 6
    assert use_emulator.control.posts("POST /api/openapi/change-clothes") == 2  # garment, prompt
    assert third.images_prepared and third.images_prepared < first.images_prepared
    assert_no_duplicate_pairs(dataset(lake).filter(pl.col("run_id") != third.run_id))
