"""The ``tryon_batch`` flow: wiring only. The work is in ``tasks`` and ``providers``.

manifest -> plan (rows by provider; rows no provider can take are invalid) -> chunks, at each
provider's leased limits -> summary -> commit -> contact sheet and Prefect artifacts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from flows.params import BatchParams, ProviderLimits, public_params
from flows.progress import watchers
from flows.runners import dask_worker_threads, task_runner_from_env
from providers.registry import PROVIDERS
from schemas.manifest import ManifestError
from schemas.manifest_rows import ValidationReport
from schemas.summary import BatchIncomplete, RunNotStarted, RunSummary
from tasks.artifacts import ProgressTee, RunProgressArtifact, publish_run_outputs
from tasks.context import open_run_contexts
from tasks.execute import ChunkExecutor, DaskChunks, InProcessChunks
from tasks.lake import Lake
from tasks.plan import RunPlan, plan_run
from tasks.process import ProgressSink
from tasks.summary import commit_run, first_fatal, summarize
from tasks.tryon import invalid_records, load_manifest_task, record_invalid_rows

__all__ = [
    "BatchIncomplete",
    "BatchParams",
    "ProviderLimits",
    "RunNotStarted",
    "RunSummary",
    "tryon_batch",
]


def run_id_of_this_run() -> str:
    current = flow_run.get_id()
    return str(current) if current else str(uuid.uuid4())


async def open_lake_and_manifest(params: BatchParams, run_id: str) -> tuple[Lake, ValidationReport]:
    """The lake (marked with this run's start) and the validated manifest; ``RunNotStarted``
    when either is unusable."""
    try:
        lake = Lake.open(params.lake, storage_options=params.storage_options)
        lake.write_json(
            lake.path("runs", run_id, "started.json"),
            {"run_id": run_id, "started_at": datetime.now(UTC), "params": public_params(params)},
        )
        report = await asyncio.to_thread(
            load_manifest_task, params.manifest, params.storage_options, sorted(PROVIDERS)
        )
    except (ManifestError, ValueError, OSError) as exc:
        raise RunNotStarted(str(exc)) from None
    return lake, report


# Invalid rows listed in the flow's log; all of them are in the lake's metadata.
LOGGED_INVALID_ROWS = 20


def log_plan(plan: RunPlan) -> None:
    """Every invalid row, the manifest's and the providers' alike, as ``tryon validate`` with
    the run's options prints them (the first few; the counts agree with the run's summary)."""
    logger = get_run_logger()
    text = plan.summary(max_invalid=LOGGED_INVALID_ROWS)
    if plan.invalid:
        logger.warning("%s", text)
    else:
        logger.info("%s", text)


async def record_invalid(
    lake: Lake, run_id: str, params: BatchParams, plan: RunPlan, sink: ProgressSink
) -> None:
    """Invalid rows into the lake (nothing is attempted for them), and onto the progress."""
    records = invalid_records(run_id, params.provider, plan.invalid, manifest=params.manifest)
    if records:  # a task run costs a few API round trips: none when there is nothing to record
        await record_invalid_rows(lake, run_id, records)
    for record in records:
        sink.row_done(record)


def chunk_executor(params: BatchParams, sink: ProgressSink) -> ChunkExecutor:
    """Chunks on this process's event loop, or on Dask when that is the task runner
    (``TRYON_TASK_RUNNER``, flows/runners.py)."""
    threads = dask_worker_threads(FlowRunContext.get().task_runner)
    if threads is None:
        return InProcessChunks(chunk_size=params.chunk_size)
    return DaskChunks(
        chunk_size=params.chunk_size,
        threads=threads,
        settings=params.chunk_settings(),
        progress=sink,
    )


@flow(name="tryon-batch", log_prints=True, task_runner=task_runner_from_env())
async def tryon_batch(params: BatchParams) -> RunSummary:
    """Manifest -> validated rows -> chunked try-on at the provider's limits -> lake."""
    started, run_id = time.perf_counter(), run_id_of_this_run()
    provider = params.provider  # a registered name: BatchParams checks it
    lake, report = await open_lake_and_manifest(params, run_id)
    plan = plan_run(
        report,
        default_provider=provider,
        refine=params.refine,
        refine_gender=params.refine_gender,
    )
    log_plan(plan)
    # The caller's sinks (the CLI's progress bar) and a Prefect progress artifact.
    progress = RunProgressArtifact()
    sink = ProgressTee(*watchers(), progress)
    sink.started(plan.total_rows)
    await record_invalid(lake, run_id, params, plan, sink)

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(progress)  # 0 % now, 100 % (or where it stopped) at exit
        run = await open_run_contexts(
            stack,
            run_id=run_id,
            lake=lake,
            rows_by_provider=plan.rows_by_provider,
            settings=params.chunk_settings(),
            limits=params.limits,
            refine_limits=params.refine_limits,
            progress=sink,
        )
        executor = chunk_executor(params, sink)
        per_provider = await asyncio.gather(
            *(executor.run(ctx, plan.rows_by_provider[ctx.lane.name]) for ctx in run.contexts)
        )
        stopped = first_fatal(run.lanes())

    summary = summarize(
        run_id=run_id,
        provider=provider,
        lake=lake,
        outcomes=[outcome for outcomes in per_provider for outcome in outcomes],
        invalid_rows=len(plan.invalid),
        total_rows=plan.total_rows,
        refine=params.refine,
        stopped=stopped,
        duration_s=time.perf_counter() - started,
    )
    # Last: readers and reruns trust this run's metadata from here on.
    await asyncio.to_thread(commit_run, lake, summary)
    logger = get_run_logger()
    logger.info("run %s: %s", run_id, summary.one_line())
    # For people: the contact sheet in the lake, a summary table and a report in Prefect.
    await publish_run_outputs(lake, summary, bank=run.thumbnails)
    if summary.fatal_error is not None:
        logger.error("stopped submitting after a run-fatal error: %s", summary.fatal_error)
    if summary.unfinished:
        raise BatchIncomplete(summary)
    return summary
