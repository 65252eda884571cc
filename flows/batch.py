"""The ``tryon_batch`` flow: wiring only. The work is in ``tasks`` and ``providers``.

checks (manifest, providers, credentials, lake: ``flows.preflight``; nothing is written before
they pass) -> plan (rows by provider; rows no provider can take are invalid) -> chunks, at each
provider's leased limits -> summary -> commit -> contact sheet and Prefect artifacts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from decimal import Decimal

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from flows.params import BatchParams, ProviderLimits, public_params, run_name
from flows.preflight import Preflight, run_checks
from flows.progress import watchers
from flows.runners import dask_worker_threads, task_runner_from_env
from schemas.summary import BatchIncomplete, ErrorCount, RunNotStarted, RunSummary
from tasks.artifacts import ProgressTee, RunProgressArtifact, publish_run_outputs
from tasks.context import open_run_contexts
from tasks.error_counts import count_errors
from tasks.events import emit_run_events
from tasks.execute import ChunkExecutor, DaskChunks, InProcessChunks
from tasks.lake import Lake
from tasks.money import Budget
from tasks.plan import RunPlan
from tasks.process import ProgressSink
from tasks.summary import commit_run, first_fatal, summarize
from tasks.tryon import invalid_records, record_invalid_rows

__all__ = [
    "BatchIncomplete",
    "BatchParams",
    "ProviderLimits",
    "RunNotStarted",
    "RunSummary",
    "tryon_batch",
]


def name_of_this_run(kind: str = "") -> str:
    """This flow run's name, from its ``params`` (see ``flows.params.run_name``)."""
    params = flow_run.parameters.get("params")
    if not isinstance(params, BatchParams):  # validated before naming; a dict if not
        params = BatchParams.model_validate(params)
    return run_name(params, at=datetime.now(UTC), kind=kind)


def run_id_of_this_run() -> str:
    current = flow_run.get_id()
    return str(current) if current else str(uuid.uuid4())


async def start_run(params: BatchParams, run_id: str) -> tuple[Lake, Preflight]:
    """The run's checks (``flows.preflight``; ``RunNotStarted`` when one fails, with nothing
    written), then the lake marked with this run's start; the checks hold the run's plan."""
    checks = await run_checks(params)
    if params.budget and dask_worker_threads(FlowRunContext.get().task_runner) is not None:
        raise RunNotStarted(
            "a budget is kept by the flow's own process: run without TRYON_TASK_RUNNER=dask, "
            "or without a budget"
        )
    try:
        lake = Lake.open(params.lake, storage_options=params.storage_options)
        await asyncio.to_thread(
            lake.write_json,
            lake.path("runs", run_id, "started.json"),
            {"run_id": run_id, "started_at": datetime.now(UTC), "params": public_params(params)},
        )
    except (ValueError, OSError) as exc:
        raise RunNotStarted(f"the lake {params.lake} did not take the run's start: {exc}") from None
    return lake, checks


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
) -> list[ErrorCount]:
    """Invalid rows into the lake (nothing is attempted for them), and onto the progress;
    returns why they are invalid, counted for the summary."""
    records = invalid_records(run_id, params.provider, plan.invalid, manifest=params.manifest)
    if records:  # a task run costs a few API round trips: none when there is nothing to record
        await record_invalid_rows(lake, run_id, records)
    for record in records:
        sink.row_done(record)
    return count_errors(records)


def prompts_of(plan: RunPlan) -> dict[int, str]:
    """Prompt rows' texts by row index, for the contact sheet (the metadata does not hold them)."""
    return {
        row.row_index: row.prompt
        for rows in [*plan.rows_by_provider.values(), *plan.compare.values()]
        for row in rows
        if row.is_prompt_row and row.prompt
    }


def chunk_executor(
    params: BatchParams, sink: ProgressSink, prices: Mapping[str, Decimal | None]
) -> ChunkExecutor:
    """Chunks on this process's event loop, or on Dask when that is the task runner
    (``TRYON_TASK_RUNNER``, flows/runners.py)."""
    threads = dask_worker_threads(FlowRunContext.get().task_runner)
    if threads is None:
        return InProcessChunks(chunk_size=params.chunk_size)
    return DaskChunks(
        chunk_size=params.chunk_size,
        threads=threads,
        settings=params.chunk_settings(prices),
        progress=sink,
    )


@flow(
    name="tryon-batch",
    description="Try on every row of a manifest (by its provider, routed by category, falling "
    "back or compared across providers) and write the results, their metadata, a scorecard "
    "and a contact sheet to the lake.",
    flow_run_name=name_of_this_run,
    log_prints=True,
    task_runner=task_runner_from_env(),
)
async def tryon_batch(params: BatchParams) -> RunSummary:
    """Validate the manifest, plan its rows by provider, try them on in chunks at the
    providers' leased limits, and commit the results and metadata to the lake.

    Args:
        params: What to run: the manifest, the lake, the provider and its limits.
    """
    started, run_id = time.perf_counter(), run_id_of_this_run()
    provider = params.provider  # a registered name: BatchParams checks it
    lake, checks = await start_run(params, run_id)
    plan = checks.plan
    log_plan(plan)
    # The caller's sinks (the CLI's progress bar) and a Prefect progress artifact.
    progress = RunProgressArtifact()
    sink = ProgressTee(*watchers(), progress)
    sink.started(plan.total_rows + plan.compared_rows)
    invalid_errors = await record_invalid(lake, run_id, params, plan, sink)
    budget = Budget.of(params.budget, params.currency)  # spend counted, and capped if given

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(progress)  # 0 % now, 100 % (or where it stopped) at exit
        run = await open_run_contexts(
            stack,
            run_id=run_id,
            lake=lake,
            rows_by_provider=plan.rows_by_provider,
            compare=plan.compare,
            fallback=plan.fallback,
            prices=checks.prices,
            budget=budget,
            settings=params.chunk_settings(checks.prices),
            limits=params.limits,
            refine_limits=params.refine_limits,
            progress=sink,
        )
        executor = chunk_executor(params, sink, checks.prices)
        per_track = await asyncio.gather(*(executor.run(ctx, rows) for ctx, rows in run.tracks))
        stopped = first_fatal(run.lanes())

    summary = summarize(
        run_id=run_id,
        provider=provider,
        lake=lake,
        outcomes=[outcome for outcomes in per_track for outcome in outcomes],
        invalid_rows=len(plan.invalid),
        total_rows=plan.total_rows,
        refine=params.refine,
        stopped=stopped,
        duration_s=time.perf_counter() - started,
        errors=invalid_errors,
        budget=budget,
        prices=checks.prices,
    )
    if isinstance(executor, InProcessChunks):  # Dask workers prepare in their own processes
        summary.images_prepared = run.images.prepared
        summary.images_recognised = run.images.recognised
    # Last: readers and reruns trust this run's metadata from here on.
    await asyncio.to_thread(commit_run, lake, summary)
    logger = get_run_logger()
    logger.info("run %s: %s", run_id, summary.one_line())
    # For people: the contact sheet in the lake, a summary table and a report in Prefect.
    await publish_run_outputs(lake, summary, bank=run.thumbnails, prompts=prompts_of(plan))
    await emit_run_events(summary)  # tryon.run.completed (and budget-exhausted): automations
    if summary.fatal_error is not None:
        logger.error("stopped calling after a run-fatal error: %s", summary.fatal_error)
    if summary.unfinished:
        raise BatchIncomplete(summary)
    return summary
