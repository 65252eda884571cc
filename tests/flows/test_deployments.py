"""Deployments on Prefect's own machinery: a real ``prefect server start``, ``prefect deploy``
from prefect.yaml, process workers, runs with parameters, retries and shards."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
import pytest

from bench import procs
from emulator.server import EmulatorServer
from flows.cli import emulator_env
from tests.flows.conftest import REPO, SAMPLE_MANIFEST
from tests.flows.test_batch import sample_rows, write_manifest
from tests.prefect_server import PrefectServer

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "tryon-process"
CHANGE_CLOTHES = "POST /api/openapi/change-clothes-ai"


@dataclass
class Deployed:
    server: PrefectServer
    emulator: EmulatorServer
    env: dict[str, str]
    root: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, name: str) -> Path:
        log = self.root / f"worker-{name}.log"
        # --limit as operators set it: prefect 3.8.8's worker could crash with it ("this
        # borrower is already holding one of this CapacityLimiter's tokens").
        argv = [PREFECT, "worker", "start", "--pool", POOL, "--name", name, "--limit", "4"]
        self.workers.append(procs.spawn(argv, env=self.env, cwd=self.root, log=log))
        return log


def _prefect(*args: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def deployed(
    real_prefect_server: PrefectServer,
    emulator: EmulatorServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    """prefect.yaml deployed to the real server, one process worker polling its pool; every
    provider of the flow runs pointed at the emulator (through the worker's environment)."""
    root = tmp_path_factory.mktemp("deployed")
    env = real_prefect_server.env(
        PYTHONPATH=str(REPO), TRYON_FLOWS_HOME=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2"
    )
    env.update(emulator_env(emulator.base_url))
    _prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=env, cwd=REPO)
    _prefect("--no-prompt", "deploy", "--all", env=env, cwd=REPO)
    deployed = Deployed(server=real_prefect_server, emulator=emulator, env=env, root=root)
    deployed.start_worker("worker-1")
    try:
        yield deployed
    finally:
        for worker in deployed.workers:
            procs.stop(worker)


@pytest.fixture
async def client(deployed: Deployed) -> AsyncIterator[Any]:
    """A Prefect client on the real server (this module's tests), not the session harness."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=deployed.server.api_url) as client:
        yield client


def reset_emulator(emulator: EmulatorServer, **changeclothes: object) -> None:
    emulator.control.reset(faults=True)
    if changeclothes:
        emulator.control.set_faults("changeclothes", **changeclothes)


async def run_and_wait(
    client: Any, deployment: str, parameters: dict[str, Any], timeout_s: float = 300
) -> Any:
    deployment_obj = await client.read_deployment_by_name(deployment)
    flow_run = await client.create_flow_run_from_deployment(
        deployment_obj.id, parameters=parameters
    )
    return await wait_final(client, flow_run.id, timeout_s)


async def wait_final(client: Any, flow_run_id: UUID, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        flow_run = await client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        assert time.monotonic() < deadline, f"flow run {flow_run_id} not final: {flow_run.state}"
        await asyncio.sleep(0.5)


async def test_deployment_runs_with_parameters_into_the_lake(
    deployed: Deployed, client: Any, tmp_path: Path
) -> None:
    reset_emulator(deployed.emulator)
    lake = tmp_path / "lake"
    params = {"manifest": str(SAMPLE_MANIFEST), "lake": str(lake), "provider": "changeclothes"}
    flow_run = await run_and_wait(client, "tryon-batch/adhoc", {"params": params})
    assert flow_run.state.is_completed(), flow_run.state
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    assert meta["run_id"].unique().to_list() == [str(flow_run.id)]
    assert meta.height == 9 and meta.filter(pl.col("status") == "succeeded").height == 8
    assert (lake / "runs" / str(flow_run.id) / "_COMMITTED").is_file()


async def test_the_plan_deployment_estimates_on_a_worker_without_calling(
    deployed: Deployed, client: Any, tmp_path: Path
) -> None:
    reset_emulator(deployed.emulator)
    params = {
        "manifest": str(SAMPLE_MANIFEST),
        "lake": str(tmp_path / "lake"),
        "prices": {"changeclothes": 0.05},
    }
    flow_run = await run_and_wait(client, "tryon-plan/plan", {"params": params})
    assert flow_run.state.is_completed(), flow_run.state
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    (table,) = await client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
    )
    assert table.key == "tryon-run-plan" and "8 calls, cost 0.4 USD" in table.description
    assert deployed.emulator.control.posts() == 0
    assert not (tmp_path / "lake").exists()  # the plan writes nothing


async def test_parameters_are_checked_against_the_schema(deployed: Deployed, client: Any) -> None:
    """enforce_parameter_schema: a bad parameter is refused when the run is created."""
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    deployment = await client.read_deployment_by_name("tryon-batch/adhoc")
    assert deployment.enforce_parameter_schema
    assert "BatchParams" in str(deployment.parameter_openapi_schema)
    with pytest.raises(PrefectHTTPStatusError):
        await client.create_flow_run_from_deployment(
            deployment.id, parameters={"params": {"manifest": "m.csv", "chunk_size": "many"}}
        )
    # The provider is a choice (the UI's select), so a name nobody registered never reaches
    # a worker.
    with pytest.raises(PrefectHTTPStatusError) as refused:
        await client.create_flow_run_from_deployment(
            deployment.id, parameters={"params": {"manifest": "m.csv", "provider": "nope"}}
        )
    assert "nope" in refused.value.response.text
    # What the form submits for limits and the refiner's gender is accepted as it is.
    defaults = {"limits": {"max_in_flight": 0}, "refine_gender": "unset"}
    accepted = await client.create_flow_run_from_deployment(
        deployment.id,
        parameters={"params": {"manifest": "m.csv", **defaults}},
        state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=365)),
    )
    await client.delete_flow_run(accepted.id)


async def test_retrying_a_failed_run_redoes_only_its_unfinished_rows(
    deployed: Deployed, client: Any, tmp_path: Path
) -> None:
    from prefect.states import Scheduled

    manifest = write_manifest(tmp_path / "m.csv", sample_rows(6))
    lake = tmp_path / "lake"
    params = {"manifest": str(manifest), "lake": str(lake), "max_attempts": 1}
    reset_emulator(deployed.emulator, forced_codes=[10004, 10004])  # two rows rejected
    flow_run = await run_and_wait(client, "tryon-batch/adhoc", {"params": params})
    assert flow_run.state.is_failed(), flow_run.state
    assert deployed.emulator.control.stats().requests[CHANGE_CLOTHES] == 6

    reset_emulator(deployed.emulator)
    await client.set_flow_run_state(flow_run.id, Scheduled(), force=True)  # the UI's "Retry"
    retried = await wait_final(client, flow_run.id)
    assert retried.state.is_completed(), retried.state
    assert deployed.emulator.control.stats().requests[CHANGE_CLOTHES] == 2
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    assert meta["status"].to_list() == ["succeeded"] * 6
    assert meta.group_by("row_id").len()["len"].max() == 1


async def test_shards_on_two_workers_hold_the_global_limit(
    deployed: Deployed, client: Any, tmp_path: Path
) -> None:
    second_log = deployed.start_worker("worker-2")
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(24))
    lake = tmp_path / "lake"
    limit = 3
    params = {
        "manifest": str(manifest),
        "lake": str(lake),
        "limits": {"max_in_flight": limit, "global_max_in_flight": limit},
    }
    reset_emulator(deployed.emulator, latency_s=0.3)
    flow_run = await run_and_wait(
        client, "tryon-sharded/sharded", {"params": params, "shards": 3}, timeout_s=400
    )
    assert flow_run.state.is_completed(), flow_run.state
    stats = deployed.emulator.control.stats().provider("changeclothes")
    assert stats.requests == 24
    assert 1 <= stats.max_in_flight <= limit
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    assert meta.filter(pl.col("status") == "succeeded").height == 24
    shard_runs = meta["run_id"].unique().to_list()
    assert len(shard_runs) == 3  # three separate flow runs, each its own run id and commit
    assert re.fullmatch(r"m-changeclothes-3-shards-\d{8}T\d{6}Z", flow_run.name), flow_run.name
    for run in shard_runs:  # each named after its shard manifest
        shard_run = await client.read_flow_run(UUID(run))
        assert re.fullmatch(r"shard-\d{4}-changeclothes-\d{8}T\d{6}Z", shard_run.name)
    for run in shard_runs:
        assert (lake / "runs" / run / "_COMMITTED").is_file()
    # Which worker took which shard is Prefect's choice (the first to poll may take all).
    logs = [deployed.root / "worker-worker-1.log", second_log]
    taken = [sum(run in log.read_text() for run in shard_runs) for log in logs]
    assert sum(taken) >= 3, taken
