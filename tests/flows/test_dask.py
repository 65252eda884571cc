"""The same flow on prefect-dask's DaskTaskRunner: a local cluster of worker processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, tryon_batch
from flows.runners import task_runner_from_env
from tests.flows.test_batch import CC, read_metadata, sample_rows, write_manifest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dask_flow():  # type: ignore[no-untyped-def]
    """The flow with a Dask runner, configured the way users do it: the environment."""
    runner = task_runner_from_env({"TRYON_TASK_RUNNER": "dask", "TRYON_DASK_WORKERS": "2"})
    return tryon_batch.with_options(task_runner=runner)


def test_configuration_picks_the_runner() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner_from_env({}), ThreadPoolTaskRunner)
    remote = task_runner_from_env(
        {"TRYON_TASK_RUNNER": "dask", "TRYON_DASK_ADDRESS": "tcp://10.0.0.5:8786"}
    )
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = task_runner_from_env({"TRYON_TASK_RUNNER": "DASK", "TRYON_DASK_WORKERS": "3"})
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3
    with pytest.raises(ValueError, match="TRYON_TASK_RUNNER='ray'"):
        task_runner_from_env({"TRYON_TASK_RUNNER": "ray"})
    with pytest.raises(ValueError, match="TRYON_DASK_WORKERS"):
        task_runner_from_env({"TRYON_TASK_RUNNER": "dask", "TRYON_DASK_WORKERS": "0"})


async def test_chunks_run_on_dask_workers_within_the_limit(
    dask_flow, use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(16))
    use_emulator.control.set_faults(CC, latency_s=0.2)
    summary = await dask_flow(
        BatchParams(
            manifest=str(manifest), lake=str(lake), chunk_size=4, limits={"max_in_flight": 3}
        )
    )
    assert summary.counts == {"succeeded": 16}
    assert summary.provider_calls == 16
    # Chunks ran in the cluster's worker processes, not in the flow's.
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert summary.chunk_processes and here not in summary.chunk_processes
    # Each running chunk had a share of the run's 3 slots: together never more than 3.
    assert use_emulator.control.stats().provider(CC).max_in_flight <= 3

    meta = read_metadata(lake)
    assert meta.height == 16 and meta["row_id"].n_unique() == 16
    assert (meta["status"] == "succeeded").all()
    for uri in meta["output_uri"]:
        assert Path(uri).is_file() and Path(uri).is_relative_to(lake)

    # A rerun on Dask finds every row's work in the ledger: no provider call.
    again = await dask_flow(BatchParams(manifest=str(manifest), lake=str(lake), chunk_size=4))
    assert again.provider_calls == 0 and again.already_done == 16
    assert read_metadata(lake).filter(pl.col("stage") == "tryon").height == 16


async def test_a_fatal_error_stops_later_chunks(
    dask_flow, use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    # One slot, so chunks run one after another: the second chunk is told of the first
    # chunk's credit error and calls nothing.
    use_emulator.control.set_faults(CC, credits=2)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(8))
    with pytest.raises(BatchIncomplete) as raised:
        await dask_flow(
            BatchParams(
                manifest=str(manifest),
                lake=str(tmp_path / "lake"),
                chunk_size=4,
                limits={"max_in_flight": 1},
            )
        )
    summary = raised.value.summary
    assert "INSUFFICIENT_CREDITS" in (summary.fatal_error or "")
    assert summary.provider_calls == 3  # two paid calls, then the one that found no credit
    assert use_emulator.control.stats().requests.get("POST /api/openapi/change-clothes-ai") == 3
    meta = read_metadata(tmp_path / "lake")
    assert meta.height == 8
    skipped = meta.filter(pl.col("status") != "succeeded")
    assert skipped.height == 6 and (skipped["error_code"] == "INSUFFICIENT_CREDITS").all()


async def test_dask_chunks_fetch_through_the_guard(
    dask_flow, use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    """A chunk on a Dask worker builds its own input client: the address guard holds there too."""
    rows = sample_rows(2)
    rows[1]["person_image"] = "http://169.254.169.254/latest/meta-data/person.jpg"
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(BatchIncomplete):
        await dask_flow(BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake")))
    meta = read_metadata(tmp_path / "lake").sort("row_id")
    assert meta["status"].to_list() == ["succeeded", "failed"]
    assert meta["error_code"][1] == "FETCH_BLOCKED_ADDRESS"


async def test_rows_fall_back_on_dask_workers_and_compare_there_too(
    dask_flow, use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    # Chunks in other processes rebuild the fallback's lane and the compared provider's track
    # from ChunkSettings; the primary's credit error reaches later chunks as for one provider.
    use_emulator.control.set_faults(CC, credits=2)
    use_emulator.control.set_faults("hidream", job_queued_s=0, job_running_s=0)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(8))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest),
        lake=str(lake),
        chunk_size=4,
        limits={"max_in_flight": 1},
        fallback=["hidream"],
        compare=["tencent"],
    )
    summary = await dask_flow(params)
    assert summary.counts == {"succeeded": 8} and summary.fell_back == 6
    assert summary.compare_counts == {"tencent": {"succeeded": 8}}
    assert use_emulator.control.posts("POST /api/openapi/change-clothes") == 3
    meta = read_metadata(lake).filter(pl.col("stage") == "tryon")
    assert meta.filter(pl.col("track") == "tencent").height == 8
    assert meta.filter(pl.col("fallback_from") == CC)["status"].to_list() == ["succeeded"] * 6

    use_emulator.control.reset(faults=True)
    again = await dask_flow(params)
    assert again.provider_calls == 0 and use_emulator.control.posts() == 0
