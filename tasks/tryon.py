"""Prefect tasks: thin wrappers over the pure functions in ``tasks.process``.

A task per chunk, not per row: a Prefect task run costs ~15 ms of CPU here, too dear per row
for fast providers; rows run concurrently inside a chunk on the flow's event loop. Objects a
task cannot take as parameters (the HTTP clients, the shared limiter) live in a per-process
registry keyed by run id, set up by the flow. A chunk run in another process (a Dask worker)
finds no registry entry there and builds its own context from ``ChunkSettings``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from schemas.manifest import InvalidRow, ManifestRow, plural
from schemas.results import PRIMARY_TRACK, ErrorKind, RowRecord, Stage, Status, is_unfinished
from schemas.summary import ErrorCount
from tasks.context import ChunkSettings, error_fields, standalone_context
from tasks.error_counts import count_errors
from tasks.lake import Lake
from tasks.ledger import WorkLedger, work_key
from tasks.process import RunContext, process_rows
from tasks.report import write_report_records

_CONTEXTS: dict[tuple[str, str, str], RunContext] = {}


def register_context(ctx: RunContext) -> None:
    _CONTEXTS[ctx.key] = ctx


def unregister_context(ctx: RunContext) -> None:
    _CONTEXTS.pop(ctx.key, None)


def part_name(provider: str, track: str, chunk_index: int) -> str:
    """A chunk's metadata part: ``part-<provider>-<n>``, or ``compare-<provider>-<n>`` for a
    compared provider's track (never equal: the prefixes differ)."""
    prefix = "part" if track == PRIMARY_TRACK else "compare"
    return f"{prefix}-{provider}-{chunk_index:05d}"


class ChunkOutcome(BaseModel):
    chunk: str
    provider: str
    track: str = PRIMARY_TRACK
    # stage -> status -> rows: each row's outcome, its last record in its track (a record
    # whose row went on to a fallback provider is not counted)
    counts: dict[str, dict[str, int]]
    unfinished: int  # records a retry should redo
    fell_back: int = 0  # rows whose outcome is a fallback provider's
    cost: float = 0.0  # what the chunk's calls cost (records of unknown price count 0)
    metadata_uri: str | None  # None when every record is already in a committed run's metadata
    provider_calls: int
    already_done: int = 0  # try-on records done and recorded by earlier, committed runs
    # Run-fatal provider errors this chunk hit or was told of (see ``error_fields``).
    fatal: dict[str, Any] | None = None
    refine_fatal: dict[str, Any] | None = None
    fallback_fatal: dict[str, dict[str, Any]] = Field(default_factory=dict)  # by provider
    process: str = ""  # host:pid that ran the chunk
    errors: list[ErrorCount] = Field(default_factory=list)  # why records did not succeed


def _chunk_run_name() -> str:
    from prefect.runtime import task_run

    params = task_run.parameters
    track = params.get("track", PRIMARY_TRACK)
    role = "" if track == PRIMARY_TRACK else "vs-"
    return f"{role}{params['provider']}-chunk-{params['chunk_index']}"


@task(name="process-chunk", cache_policy=NONE, task_run_name=_chunk_run_name)
async def process_chunk(
    run_id: str,
    provider: str,
    chunk_index: int,
    rows: list[ManifestRow],
    settings: ChunkSettings | None = None,
    track: str = PRIMARY_TRACK,
) -> ChunkOutcome:
    """Process one chunk: with the flow's context when in its process, else with its own
    (``settings`` required then)."""
    ctx = _CONTEXTS.get((run_id, provider, track))
    if ctx is not None:
        return await _process_chunk(ctx, chunk_index, rows)
    if settings is None:
        raise RuntimeError(
            f"chunk {provider}/{chunk_index} of run {run_id} runs outside the flow's process "
            "without ChunkSettings to rebuild its context"
        )
    async with standalone_context(run_id, provider, settings) as own:
        return await _process_chunk(own, chunk_index, rows)


async def _process_chunk(
    ctx: RunContext, chunk_index: int, rows: list[ManifestRow]
) -> ChunkOutcome:
    run_id, provider = ctx.run_id, ctx.lane.name
    records = await process_rows(rows, ctx)
    part = part_name(provider, ctx.track, chunk_index)
    # A private attribute read costs ~2 us through pydantic: once a record.
    recorded = [r.already_recorded for r in records]
    fresh = [r for r, done in zip(records, recorded, strict=True) if not done]
    uri = await ctx.lake.awrite_metadata(run_id, part, fresh) if fresh else None
    held = [r for r, done in zip(records, recorded, strict=True) if done]
    if held:  # not metadata (an earlier run holds them), but the contact sheet shows them
        await asyncio.to_thread(write_report_records, ctx.lake, run_id, part, held)
    outcomes = [r for r in records if r.fallback_to is None]
    counts: dict[str, dict[str, int]] = {}
    for stage in sorted({str(r.stage) for r in outcomes}):
        counts[stage] = dict(Counter(str(r.status) for r in outcomes if str(r.stage) == stage))
    role = "" if ctx.track == PRIMARY_TRACK else "vs-"
    get_run_logger().info("chunk %s%s/%d: %s", role, provider, chunk_index, describe_counts(counts))
    return ChunkOutcome(
        chunk=part,
        provider=provider,
        track=ctx.track,
        counts=counts,
        fell_back=sum(r.stage == Stage.TRYON and r.fallback_from is not None for r in outcomes),
        unfinished=sum(is_unfinished(r.status, r.error_kind, r.fallback_to) for r in records),
        metadata_uri=uri,
        # Each record counts the calls it really made; chunks overlap, so a delta of the
        # lane's shared counter would also count other chunks' calls.
        provider_calls=sum(r.attempts for r in records),
        cost=sum(r.cost or 0.0 for r in records),
        already_done=sum(
            done and r.stage == Stage.TRYON and r.fallback_to is None
            for r, done in zip(records, recorded, strict=True)
        ),
        fatal=error_fields(ctx.lane.state.fatal),
        refine_fatal=error_fields(ctx.refine.state.fatal) if ctx.refine else None,
        fallback_fatal={
            lane.name: fields
            for lane in ctx.fallbacks
            if (fields := error_fields(lane.state.fatal)) is not None
        },
        process=f"{socket.gethostname()}:{os.getpid()}",
        errors=count_errors(records),
    )


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """A chunk's counts for its log line: "try-on 2 failed, 8 succeeded; refine 8 skipped"."""
    stages = []
    for stage, by_status in counts.items():
        label = "try-on" if stage == Stage.TRYON else stage
        tally = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
        stages.append(f"{label} {tally or 'nothing'}")
    return "; ".join(stages) or "no rows"


def invalid_records(
    run_id: str, provider: str, invalid: Sequence[InvalidRow], *, manifest: str
) -> list[RowRecord]:
    """Records for rows that failed validation: nothing was attempted for them."""
    return [
        RowRecord(
            run_id=run_id,
            row_id=row.row_id,
            row_index=row.row_index,
            provider=provider,
            status=Status.INVALID,
            error_kind=ErrorKind.INVALID,
            error_code="INVALID_ROW",
            error_message=row.message,
            # The same bad row of the same manifest is one finding, whatever run reports it.
            work_key=work_key(
                stage="invalid",
                manifest=manifest,
                row_index=row.row_index,
                row_id=row.row_id,
                reasons=row.message,
            ),
        )
        for row in invalid
    ]


async def _unrecorded(ledger: WorkLedger, records: list[RowRecord]) -> list[RowRecord]:
    """The invalid-row records no committed earlier run has written yet (ledger updated)."""
    fresh = []
    for record in records:
        key, row_id = record.work_key, record.row_id or f"#{record.row_index}"
        assert key is not None
        entry = await ledger.done(key)
        if entry is None:
            await ledger.mark_done(key, record.model_copy(update={"row_id": row_id}))
        elif await ledger.recorded_elsewhere(entry, row_id):
            continue
        else:
            await ledger.adopt(entry, row_id)
        fresh.append(record)
    return fresh


@task(name="record-invalid-rows", cache_policy=NONE)
async def record_invalid_rows(lake: Lake, run_id: str, records: list[RowRecord]) -> str | None:
    fresh = await _unrecorded(WorkLedger(lake, run_id), records)
    kept = {id(r) for r in fresh}
    held = [r for r in records if id(r) not in kept]
    if held:
        await asyncio.to_thread(write_report_records, lake, run_id, "part-invalid", held)
        # The rows themselves were logged with the run's plan.
        get_run_logger().info(
            "%s of this manifest recorded by earlier runs already: kept there",
            plural(len(held), "invalid row"),
        )
    if not fresh:
        return None
    return await lake.awrite_metadata(run_id, "part-invalid", fresh)
