"""Scale-out: one manifest split into shards, each a separate flow run of a deployment.

The shards run wherever Prefect's workers pick them up. The providers' global concurrency
limits (``tasks/concurrency.py``) hold across all of them: each shard leases its share of the
limit. Every shard is a normal ``tryon_batch`` run (its own run id, metadata, commit), so a
failed shard is retried from the UI like any other run, and the work ledger makes a rerun of
the whole sharded run cheap.
"""

from __future__ import annotations

import asyncio
from decimal import ROUND_DOWN, Decimal

import polars as pl
from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.batch import BatchParams, RunNotStarted, name_of_this_run, run_id_of_this_run
from providers.registry import PROVIDERS, provider_spec
from schemas.manifest import KNOWN_COLUMNS, ManifestError
from schemas.manifest_rows import ManifestRows
from tasks.lake import Lake
from tasks.manifest import load_manifest
from tasks.tryon import invalid_records, record_invalid_rows


class ShardOutcome(BaseModel):
    shard: int
    rows: int
    flow_run_id: str
    state: str


class ShardedSummary(BaseModel):
    run_id: str
    shards: list[ShardOutcome]
    invalid_rows: int
    total_rows: int

    @property
    def all_completed(self) -> bool:
        return all(s.state == "COMPLETED" for s in self.shards)


def split_rows(rows: ManifestRows, shards: int) -> list[ManifestRows]:
    """Contiguous, near-equal shards (no empty ones)."""
    n = max(1, min(shards, len(rows)))
    size, extra = divmod(len(rows), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(rows[start:end])
        start = end
    return [s for s in out if len(s)]


def shard_frame(rows: ManifestRows) -> pl.DataFrame:
    """A manifest for ``rows``: image URIs are already absolute (resolved against the original
    manifest), so the shard can live anywhere."""
    return rows.frame(KNOWN_COLUMNS).select(KNOWN_COLUMNS)


def shard_budgets(budget: float, rows: list[int]) -> list[float]:
    """The run's budget split over its shards by their rows, rounded down to a millionth, so
    together they stay within it: each shard is a run with its own budget. 0: no cap."""
    if not budget:
        return [0.0] * len(rows)
    total = sum(rows) or 1
    step = Decimal("0.000001")
    whole = Decimal(str(budget))
    # A shard's 0 would mean no cap: one with nothing left gets the smallest amount instead.
    return [float(max(step, (whole * n / total).quantize(step, rounding=ROUND_DOWN))) for n in rows]


def name_of_this_sharded_run() -> str:
    """E.g. ``manifest-changeclothes-3-shards-20250601T140322Z``; its shards' runs are named
    after their shard manifests (``shard-0000-changeclothes-...``)."""
    return name_of_this_run(f"{flow_run.parameters.get('shards', 2)}-shards")


@flow(
    name="tryon-sharded",
    description="Split a manifest into shards and run each as a tryon-batch flow run, on "
    "whichever workers are free, within the provider's account-wide limit.",
    flow_run_name=name_of_this_sharded_run,
    log_prints=True,
)
async def tryon_sharded(
    params: BatchParams,
    shards: int = 2,
    shard_deployment: str = "tryon-batch/adhoc",
) -> ShardedSummary:
    """Validate the manifest, write one shard manifest per shard to the lake, run each as a
    ``shard_deployment`` flow run with a share of the provider's global limit, and wait.

    Args:
        params: What to run: the manifest, the lake, the provider and its limits.
        shards: How many flow runs to split the manifest into.
        shard_deployment: The deployment that runs each shard.
    """
    logger = get_run_logger()
    run_id = run_id_of_this_run()
    if not 1 <= shards <= 256:
        raise RunNotStarted(f"shards must be between 1 and 256, not {shards}")
    try:
        lake = Lake.open(params.lake, storage_options=params.storage_options)
        spec = provider_spec(params.provider)
        report = await asyncio.to_thread(
            load_manifest,
            params.manifest,
            storage_options=params.storage_options,
            known_providers=sorted(PROVIDERS),
            check_files=True,
        )
    except (ManifestError, ValueError, OSError) as exc:
        raise RunNotStarted(str(exc)) from None

    # Rows the manifest itself refuses are recorded once, by this run, not by a shard.
    bad = invalid_records(run_id, spec.name, list(report.invalid), manifest=params.manifest)
    await record_invalid_rows(lake, run_id, bad)

    parts = split_rows(report.valid, shards)
    limit = params.limits.global_max_in_flight or spec.max_in_flight
    share = max(1, (params.limits.max_in_flight or limit) // max(1, len(parts)))
    budgets = shard_budgets(params.budget, [len(rows) for rows in parts])
    runs = []
    for index, rows in enumerate(parts):
        path = lake.run_path(run_id, "shards", f"shard-{index:04d}.parquet")
        with lake.fs.open(path, "wb") as handle:
            shard_frame(rows).write_parquet(handle)
        shard_params = params.model_copy(
            update={
                "manifest": lake.full_uri(path),
                "limits": params.limits.model_copy(update={"max_in_flight": share}),
                "budget": budgets[index],
            }
        )
        runs.append((index, len(rows), shard_params))
    logger.info(
        "%d valid rows in %d shards, %d in flight each; %d invalid rows recorded here",
        len(report.valid),
        len(runs),
        share,
        len(bad),
    )

    async def one(index: int, count: int, shard_params: BatchParams) -> ShardOutcome:
        flow_run = await run_deployment(
            shard_deployment,
            parameters={"params": shard_params.model_dump(mode="json")},
            timeout=None,  # wait for the shard to finish, however long it takes
            as_subflow=True,
        )
        state = flow_run.state.type.value if flow_run.state else "UNKNOWN"
        return ShardOutcome(shard=index, rows=count, flow_run_id=str(flow_run.id), state=state)

    outcomes = list(await asyncio.gather(*(one(*run) for run in runs)))
    summary = ShardedSummary(
        run_id=run_id, shards=outcomes, invalid_rows=len(bad), total_rows=report.n_rows
    )
    lake.write_json(lake.run_path(run_id, "summary.json"), summary.model_dump(mode="json"))
    lake.commit_run(run_id, {"run_id": run_id, "shards": [o.flow_run_id for o in outcomes]})
    if not summary.all_completed:
        failed = [o.shard for o in outcomes if o.state != "COMPLETED"]
        raise RuntimeError(f"shards {failed} did not complete: retry those flow runs")
    return summary
