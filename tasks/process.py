"""Process manifest rows: prepare -> try on -> download -> lake, then optionally refine.

Pure asyncio, no Prefect: the Prefect task in ``tasks.tryon`` is a thin wrapper. One
``RunContext`` is shared by every chunk of a run, so the concurrency limit, the rate limit, the
prepared-image cache and the fatal-error stop apply to the whole run, not per chunk. Each
provider account in play (the try-on provider, the refiner) is a ``Lane`` with its own limits
and its own fatal stop: a refiner out of credits does not stop the try-on provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TypeVar

from providers.base import (
    PreparedImage,
    ProviderError,
    RefinerClient,
    RefineRequest,
    TryOnRequest,
)
from schemas.image_profile import ImageProfile
from schemas.manifest import ManifestRow
from schemas.results import ErrorKind, RowRecord, Stage, Status
from tasks.images import ImageInputError, prepare_image
from tasks.ledger import DoneEntry, work_key
from tasks.plan import refine_not_applicable
from tasks.provider_calls import call_provider, store_result, with_retries
from tasks.run_context import (
    Lane,
    ProgressSink,
    RetryPolicy,
    RunContext,
    RunState,
    ThumbnailSink,
    rows_in_progress,
)

__all__ = [
    "Lane",
    "ProgressSink",
    "RetryPolicy",
    "RunContext",
    "RunState",
    "ThumbnailSink",
    "process_row",
    "process_rows",
    "refine_not_applicable",
    "rows_in_progress",
]

T = TypeVar("T")


class _RowFailure(Exception):
    """Internal: ends a row with a recorded error."""

    def __init__(self, kind: ErrorKind, code: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.code, self.message = kind, code, message


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


async def _prepare_shown(
    ctx: RunContext, row: ManifestRow, uri: str | None, profile: ImageProfile
) -> PreparedImage | None:
    """``_prepare``, then hand the image to the contact sheet at once: the sheet fetches
    nothing, so an input is shown even when the row's other input fails."""
    image = await _prepare(ctx, uri, profile)
    if image is not None and uri is not None and ctx.thumbnails is not None:
        ctx.thumbnails.offer(row.row_index, uri, image.data)
    return image


async def _prepare(ctx: RunContext, uri: str | None, profile: ImageProfile) -> PreparedImage | None:
    if uri is None:
        return None
    try:
        return await with_retries(
            ctx,
            lambda: ctx.images.get(
                uri, http=ctx.http, profile=profile, storage_options=ctx.storage_options
            ),
        )
    except ImageInputError as exc:
        kind = ErrorKind.TRANSIENT if exc.transient else ErrorKind.PERMANENT
        raise _RowFailure(kind, exc.code, exc.message) from None


@asynccontextmanager
async def _one_at_a_time(ctx: RunContext, key: str) -> AsyncIterator[None]:
    """Rows of this run asking for the same work take turns: the first does it, the others
    then find it in the ledger (or, if it failed, try it themselves)."""
    if ctx.ledger is None:
        yield
        return
    lock, users = ctx.work_locks.get(key, (asyncio.Lock(), 0))
    ctx.work_locks[key] = (lock, users + 1)
    try:
        async with lock:
            yield
    finally:
        lock, users = ctx.work_locks[key]
        if users == 1:
            del ctx.work_locks[key]
        else:
            ctx.work_locks[key] = (lock, users - 1)


async def _reuse(
    ctx: RunContext, key: str, row: ManifestRow, record: RowRecord
) -> DoneEntry | None:
    """Fill ``record`` from the ledger when this work was done before; None if it was not.

    The row is then done with no provider call. Its record is written again only when no
    committed run's metadata holds it yet for this row id (a crashed run, this run retried).
    """
    if ctx.ledger is None:
        return None
    entry = await ctx.ledger.done(key)
    if entry is None:
        return None
    done = entry.record
    for name in (
        "output_uri", "mask_uri", "output_sha256", "request_id", "cache_hit",
        "person_sha256", "garment_sha256",
    ):  # fmt: skip
        setattr(record, name, getattr(done, name))
    if entry.produced_by != ctx.run_id:
        record.reused_from_run = entry.produced_by
    assert row.id is not None
    if await ctx.ledger.recorded_elsewhere(entry, row.id):
        record.mark_already_recorded()
    else:
        await ctx.ledger.adopt(entry, row.id)
    return entry


async def _record_once(ctx: RunContext, row: ManifestRow, record: RowRecord) -> None:
    """A final outcome decided from the row alone: in the ledger under a key over the row's
    fields, so a rerun does not record it again once a committed run has."""
    if ctx.ledger is None or row.id is None:
        return
    record.work_key = work_key(
        stage=f"{record.stage}:{record.error_code}",
        provider=record.provider,
        row_id=row.id,
        category=row.category,
        person=row.person_image,
        garment=row.garment_image,
        lower=row.lower_garment_image,
        prompt=row.prompt,
    )
    entry = await ctx.ledger.done(record.work_key)
    if entry is None:
        await ctx.ledger.mark_done(record.work_key, record)
    elif await ctx.ledger.recorded_elsewhere(entry, row.id):
        record.mark_already_recorded()
    else:
        await ctx.ledger.adopt(entry, row.id)


async def _remember(ctx: RunContext, record: RowRecord) -> None:
    """The stage succeeded: into the ledger (after its output is in the lake), job done."""
    if ctx.ledger is None or record.work_key is None:
        return
    record.status = Status.SUCCEEDED
    await ctx.ledger.mark_done(record.work_key, record)
    await ctx.ledger.forget_job(record.work_key)


def _new_record(ctx: RunContext, row: ManifestRow, stage: Stage, provider: str) -> RowRecord:
    return RowRecord(
        run_id=ctx.run_id,
        row_id=row.id,
        row_index=row.row_index,
        stage=stage,
        provider=provider,
        status=Status.FAILED,
        person_image=row.person_image,
        garment_image=row.garment_image,
        lower_garment_image=row.lower_garment_image,
        category=row.category,
        started_at=datetime.now(UTC),
    )


async def _run_stage(
    ctx: RunContext,
    lane: Lane,
    record: RowRecord,
    work: Callable[[list[int]], Awaitable[None]],
) -> RowRecord:
    """Run one stage's work, turning every row-level problem into the record's outcome."""
    t0 = time.perf_counter()
    if lane.state.fatal is not None:
        return _finish(record, t0, skipped_by=lane.state.fatal)
    attempts = [0]
    try:
        await work(attempts)
        record.status = Status.SUCCEEDED
    except _RowFailure as failure:
        record.error_kind, record.error_code = failure.kind, failure.code
        record.error_message = failure.message
    except ProviderError as exc:
        if exc.kind is ErrorKind.FATAL and lane.state.fatal is None:
            lane.state.fatal = exc
            lane.state.fatal_at = time.time()
        if exc is lane.state.fatal and attempts[0] == 0:
            return _finish(record, t0, skipped_by=exc)
        record.error_kind, record.error_code = exc.kind, exc.code
        record.error_message = exc.message
        record.request_id = record.request_id or exc.request_id
    record.attempts = attempts[0]
    return _finish(record, t0)


async def _try_on(ctx: RunContext, row: ManifestRow, record: RowRecord) -> bytes | None:
    """The try-on stage; returns the result's bytes when it succeeded (for the refiner)."""
    lane = ctx.lane
    output: list[bytes] = []

    async def work(attempts: list[int]) -> None:
        t_prep = time.perf_counter()
        person, garment, lower = await asyncio.gather(
            _prepare_shown(ctx, row, row.person_image, lane.profile),
            _prepare_shown(ctx, row, row.garment_image, lane.profile),
            _prepare(ctx, row.lower_garment_image, lane.profile),
        )
        assert person is not None
        record.person_sha256 = person.sha256
        record.garment_sha256 = garment.sha256 if garment else None
        gender = row.gender or ctx.default_gender
        record.work_key = work_key(
            stage=str(Stage.TRYON),
            provider=lane.name,
            category=row.category,
            prompt=row.prompt,
            garment_description=row.garment_description,
            gender=gender,
            person=person.sha256,
            garment=record.garment_sha256,
            lower=lower.sha256 if lower else None,
        )
        async with _one_at_a_time(ctx, record.work_key):
            if (done := await _reuse(ctx, record.work_key, row, record)) is not None:
                record.prepare_ms = _ms(t_prep)
                coarse_uri = done.record.output_uri
                if ctx.refine is not None and coarse_uri:  # the refiner's input
                    output.append(await asyncio.to_thread(ctx.lake.read_uri, coarse_uri))
                return
            if ctx.stager is not None:  # URL-only provider: stage the prepared bytes
                person, garment, lower = [
                    await ctx.stager.stage(image) if image else None
                    for image in (person, garment, lower)
                ]
            record.prepare_ms = _ms(t_prep)
            assert person is not None
            request = TryOnRequest(
                row_id=row.id,
                person=person,
                garment=garment,
                lower_garment=lower,
                category=row.category,
                garment_description=row.garment_description,
                prompt=row.prompt,
                gender=gender,
            )
            t_call = time.perf_counter()
            try:
                result = await call_provider(
                    ctx,
                    lane,
                    lambda on_submitted: ctx.client.try_on(request, on_submitted=on_submitted),
                    record,
                    attempts,
                )
            finally:
                record.provider_ms = _ms(t_call)
            record.request_id = result.request_id or record.request_id
            record.cache_hit = result.cache_hit
            t_dl = time.perf_counter()
            output.append(await store_result(ctx, lane, result, record))
            record.download_ms = _ms(t_dl)
            if ctx.thumbnails is not None:
                ctx.thumbnails.offer(row.row_index, record.output_uri, output[-1])
            await _remember(ctx, record)

    await _run_stage(ctx, lane, record, work)
    return output[0] if output else None


async def _refine(
    ctx: RunContext, row: ManifestRow, coarse: bytes | None, coarse_record: RowRecord
) -> RowRecord:
    lane = ctx.refine
    assert lane is not None
    record = _new_record(ctx, row, Stage.REFINE, lane.name)
    reason, code = refine_not_applicable(row), "REFINE_NOT_APPLICABLE"
    if reason is None and coarse is None:
        reason = f"no coarse result to refine (try-on {coarse_record.status})"
        code = "NO_COARSE_RESULT"
    if reason is not None:
        record.status = Status.SKIPPED
        record.error_kind, record.error_code, record.error_message = (
            ErrorKind.PERMANENT,
            code,
            reason,
        )
        if code == "REFINE_NOT_APPLICABLE":  # final whatever run finds it: record it once
            await _record_once(ctx, row, record)
        return _finish(record, time.perf_counter())
    assert coarse is not None and row.garment_image is not None
    gender = row.gender or ctx.default_gender
    assert gender is not None  # the flow makes such rows invalid before any call

    async def work(attempts: list[int]) -> None:
        t_prep = time.perf_counter()
        person, top, bottom = await asyncio.gather(
            _prepare(ctx, row.person_image, lane.profile),
            _prepare(ctx, row.garment_image, lane.profile),
            _prepare(ctx, row.lower_garment_image, lane.profile),
        )
        try:
            coarse_image = await asyncio.to_thread(
                prepare_image,
                coarse,
                profile=lane.profile,
                source_uri=coarse_record.output_uri or "coarse",
            )
        except ImageInputError as exc:
            raise _RowFailure(
                ErrorKind.PERMANENT, exc.code, f"coarse result: {exc.message}"
            ) from None
        assert person is not None and top is not None
        record.person_sha256, record.garment_sha256 = person.sha256, top.sha256
        record.work_key = work_key(
            stage=str(Stage.REFINE),
            provider=lane.name,
            gender=gender,
            coarse=coarse_image.sha256,
            person=person.sha256,
            top=top.sha256,
            bottom=bottom.sha256 if bottom else None,
        )
        record.prepare_ms = _ms(t_prep)
        async with _one_at_a_time(ctx, record.work_key):
            if await _reuse(ctx, record.work_key, row, record) is not None:
                return
            request = RefineRequest(
                row_id=row.id,
                person=person,
                top_garment=top,
                coarse=coarse_image,
                gender=gender,
                bottom_garment=bottom,
            )
            refiner: RefinerClient = lane.client  # type: ignore[assignment]
            t_call = time.perf_counter()
            try:
                result = await call_provider(
                    ctx,
                    lane,
                    lambda on_submitted: refiner.refine(request, on_submitted=on_submitted),
                    record,
                    attempts,
                )
            finally:
                record.provider_ms = _ms(t_call)
            record.request_id = result.request_id or record.request_id
            t_dl = time.perf_counter()
            refined = await store_result(ctx, lane, result, record)
            record.download_ms = _ms(t_dl)
            if ctx.thumbnails is not None:
                ctx.thumbnails.offer(row.row_index, record.output_uri, refined)
            await _remember(ctx, record)

    return await _run_stage(ctx, lane, record, work)


async def process_row(row: ManifestRow, ctx: RunContext) -> list[RowRecord]:
    """Take one valid row through its stages to recorded outcomes. Never raises for row-level
    problems: one record per stage (try-on, and refine when the run refines)."""
    record = _new_record(ctx, row, Stage.TRYON, ctx.lane.name)
    coarse = await _try_on(ctx, row, record)
    records = [record] if ctx.refine is None else [record, await _refine(ctx, row, coarse, record)]
    if ctx.progress is not None:  # once every stage is over; shown as its first unsuccessful one
        ctx.progress.row_done(next((r for r in records if r.status != Status.SUCCEEDED), record))
    return records


def _finish(record: RowRecord, t0: float, *, skipped_by: ProviderError | None = None) -> RowRecord:
    if skipped_by is not None:
        record.status = Status.SKIPPED
        record.error_kind = ErrorKind.FATAL
        record.error_code = skipped_by.code
        record.error_message = f"not attempted: the run stopped on {skipped_by}"
    record.finished_at = datetime.now(UTC)
    record.total_ms = _ms(t0)
    return record


async def process_rows(rows: Sequence[ManifestRow], ctx: RunContext) -> list[RowRecord]:
    """Rows concurrently, bounded by the run's row slots; records in input order."""

    async def bounded(row: ManifestRow) -> list[RowRecord]:
        async with ctx.row_slots:
            return await process_row(row, ctx)

    per_row = await asyncio.gather(*(bounded(row) for row in rows))
    return [record for records in per_row for record in records]
