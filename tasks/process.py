"""Process manifest rows: prepare -> try on -> download -> lake, then optionally refine.

Pure asyncio, no Prefect: the Prefect task in ``tasks.tryon`` is a thin wrapper. One
``RunContext`` is shared by every chunk of a run, so the concurrency limit, the rate limit, the
prepared-image cache and the fatal-error stop apply to the whole run, not per chunk. Each
provider account in play (the try-on provider, the refiner) is a ``Lane`` with its own limits
and its own fatal stop: a refiner out of credits does not stop the try-on provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from providers.base import (
    OnSubmitted,
    PreparedImage,
    ProviderError,
    RefinerClient,
    RefineRequest,
    TryOnClient,
    TryOnRequest,
    TryOnResult,
)
from schemas.image_profile import ImageProfile
from schemas.manifest import ManifestRow
from schemas.results import PRIMARY_TRACK, ErrorKind, RowRecord, Stage, Status
from tasks.images import ImageInputError, prepare_image
from tasks.images.sources import content_identity, source_key
from tasks.lake import Lake
from tasks.ledger import DoneEntry, work_key
from tasks.money import BUDGET_EXHAUSTED
from tasks.plan import provider_problems, refine_not_applicable
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
logger = logging.getLogger(__name__)


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


async def _input_step(ctx: RunContext, step: Callable[[], Awaitable[T]]) -> T:
    """An input's fetch or preparation, retried when transient; its failure ends the row."""
    try:
        return await with_retries(ctx, step)
    except ImageInputError as exc:
        kind = ErrorKind.TRANSIENT if exc.transient else ErrorKind.PERMANENT
        raise _RowFailure(kind, exc.code, exc.message) from None


async def _prepare(ctx: RunContext, uri: str | None, profile: ImageProfile) -> PreparedImage | None:
    if uri is None:
        return None
    return await _input_step(
        ctx,
        lambda: ctx.images.get(
            uri, http=ctx.http, profile=profile, storage_options=ctx.storage_options
        ),
    )


async def _input_sha256(
    ctx: RunContext, row: ManifestRow | None, uri: str | None, profile: ImageProfile
) -> str | None:
    """The prepared input's sha256, from the source index when an earlier run prepared this
    very source (nothing fetched nor decoded), else by preparing it (``_prepare``'s errors).
    ``row``: hand an image prepared here to the contact sheet at once (``_prepare_shown``)."""
    if uri is None:
        return None
    sha = await _input_step(
        ctx,
        lambda: ctx.images.sha256(
            uri, http=ctx.http, profile=profile, storage_options=ctx.storage_options
        ),
    )
    if row is not None and ctx.thumbnails is not None:
        image = ctx.images.peek(uri, profile)
        if image is not None:
            ctx.thumbnails.offer(row.row_index, uri, image.data)
    return sha


async def _input_hashes(
    ctx: RunContext,
    uris: Sequence[str | None],
    profile: ImageProfile,
    *,
    shown: ManifestRow | None = None,
    shown_count: int = 2,
) -> tuple[str | None, ...]:
    """The inputs' hashes; the first ``shown_count`` (person, garment) offered to the sheet."""
    return tuple(
        await asyncio.gather(
            *(
                _input_sha256(ctx, shown if i < shown_count else None, uri, profile)
                for i, uri in enumerate(uris)
            )
        )
    )


def _hashes(*images: PreparedImage | None) -> tuple[str | None, ...]:
    return tuple(image.sha256 if image is not None else None for image in images)


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
    if done.provider != record.provider:  # a fallback's work, found through its redirect
        record.provider, record.fallback_from = done.provider, done.fallback_from
        record.work_key = done.work_key
    if entry.produced_by != ctx.run_id:
        record.reused_from_run = entry.produced_by
    assert row.id is not None
    if await ctx.ledger.recorded_elsewhere(entry, row.id):
        record.mark_already_recorded()
    else:
        await ctx.ledger.adopt(entry, row.id)
        # A run killed between writing the work and forgetting its job leaves the job behind:
        # the run adopting the work (which only a crash or a retry needs) forgets it.
        await ctx.ledger.forget_job(key)
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


def _new_record(ctx: RunContext, row: ManifestRow, stage: Stage, lane: Lane) -> RowRecord:
    return RowRecord(
        run_id=ctx.run_id,
        row_id=row.id,
        row_index=row.row_index,
        stage=stage,
        provider=lane.name,
        track=ctx.track,
        cost=lane.cost_of_calls(0),  # charged calls add their price (tasks.provider_calls)
        status=Status.FAILED,
        person_image=row.person_image,
        garment_image=row.garment_image,
        lower_garment_image=row.lower_garment_image,
        category=row.category,
        prompt=row.prompt,
        garment_description=row.garment_description,
        gender=row.gender or ctx.default_gender,  # as sent: part of the work's identity
        started_at=datetime.now(UTC),
    )


async def _run_stage(
    ctx: RunContext,
    lane: Lane,
    record: RowRecord,
    work: Callable[[list[int]], Awaitable[None]],
    *,
    skip_when_stopped: bool = True,
) -> bool:
    """Run one stage's work, turning every row-level problem into the record's outcome.

    Returns False when the row's own input failed (no other provider can do better).
    ``skip_when_stopped``: a lane a run-fatal error stopped skips the row at once; otherwise
    the work still runs up to the call (its inputs are prepared: their work key may lead to
    earlier work) and the call itself is refused.
    """
    t0 = time.perf_counter()
    if skip_when_stopped and lane.state.fatal is not None:
        _finish(record, t0, skipped_by=lane.state.fatal)
        return True
    attempts = [0]
    try:
        await work(attempts)
        record.status = Status.SUCCEEDED
    except _RowFailure as failure:
        record.error_kind, record.error_code = failure.kind, failure.code
        record.error_message = failure.message
        record.attempts = attempts[0]
        _finish(record, t0)
        return False
    except ProviderError as exc:
        if exc.kind is ErrorKind.FATAL and lane.state.fatal is None:
            lane.state.fatal = exc
            lane.state.fatal_at = time.time()
        if exc is lane.state.fatal and attempts[0] == 0:
            _finish(record, t0, skipped_by=exc)
            return True
        record.error_kind, record.error_code = exc.kind, exc.code
        record.error_message = exc.message
        record.request_id = record.request_id or exc.request_id
    record.attempts = attempts[0]
    _finish(record, t0)
    return True


@dataclass(frozen=True, slots=True)
class _Coarse:
    """A try-on result the refiner may take: where it is, its hash, its bytes if at hand
    (a result found in the ledger is read from the lake only if the refine is not done)."""

    uri: str
    sha256: str | None
    data: bytes | None = None

    @classmethod
    def of(cls, record: RowRecord, data: bytes | None = None) -> _Coarse | None:
        return (
            None
            if record.output_uri is None
            else cls(record.output_uri, record.output_sha256, data)
        )

    async def read(self, lake: Lake) -> bytes:
        return (
            self.data if self.data is not None else await asyncio.to_thread(lake.read_uri, self.uri)
        )


@dataclass(slots=True)
class _TryOnOutcome:
    coarse: _Coarse | None = None  # the result when it succeeded (for the refiner)
    input_failed: bool = False  # the row's own input failed: no fallback can help
    redirected: bool = False  # an earlier run finished this row on a fallback: reused


def _redirect_key(first_key: str, fallbacks: Sequence[str]) -> str:
    """Where a row that fell back from the work ``first_key`` to ``fallbacks`` (in this order)
    finds the work that finished it: a rerun with the same fallbacks calls nobody again."""
    return work_key(stage="tryon-fallback", first=first_key, fallbacks=",".join(fallbacks))


async def _try_on(
    ctx: RunContext,
    lane: Lane,
    row: ManifestRow,
    record: RowRecord,
    *,
    then: Sequence[str] = (),
) -> _TryOnOutcome:
    """The try-on stage on ``lane``. ``then``: the fallback providers after it, when it is
    the first of a chain (its work key then also leads to where an earlier run finished)."""
    outcome = _TryOnOutcome()

    async def work(attempts: list[int]) -> None:
        t_prep = time.perf_counter()
        gender = row.gender or ctx.default_gender
        uris = (row.person_image, row.garment_image, row.lower_garment_image)
        # The work key first, from the inputs' hashes (the source index answers for sources
        # an earlier run prepared): finished work is found without fetching or decoding.
        hashes = await _input_hashes(ctx, uris, lane.profile, shown=row)
        while True:
            record.person_sha256, record.garment_sha256 = hashes[0], hashes[1]
            record.work_key = work_key(
                stage=str(Stage.TRYON),
                provider=lane.name,
                category=row.category,
                prompt=row.prompt,
                garment_description=row.garment_description,
                gender=gender,
                person=hashes[0],
                garment=hashes[1],
                lower=hashes[2],
            )
            async with _one_at_a_time(ctx, record.work_key):
                done = await _reuse(ctx, record.work_key, row, record)
                if done is None and then:
                    redirect = _redirect_key(record.work_key, then)
                    done = await _reuse(ctx, redirect, row, record)
                    outcome.redirected = done is not None
                if done is not None:
                    record.prepare_ms = _ms(t_prep)
                    outcome.coarse = _Coarse.of(done.record)
                    return
                if lane.state.fatal is not None:  # stopped: nothing earlier to reuse either
                    raise lane.state.fatal
                person, garment, lower = await asyncio.gather(
                    _prepare_shown(ctx, row, uris[0], lane.profile),
                    _prepare_shown(ctx, row, uris[1], lane.profile),
                    _prepare(ctx, uris[2], lane.profile),
                )
                if _hashes(person, garment, lower) == hashes:
                    await _call_try_on(
                        ctx, lane, row, record, outcome, attempts, t_prep, (person, garment, lower)
                    )
                    return
            # The index named what an earlier version prepared from these sources; today's
            # preparation differs: look for the work under the key of what would be sent.
            hashes = _hashes(person, garment, lower)

    # The first of a chain prepares its inputs even when stopped: their key leads to earlier
    # work, so a rerun whose first provider is out of credits still pays nothing.
    input_ok = await _run_stage(ctx, lane, record, work, skip_when_stopped=not then)
    outcome.input_failed = not input_ok
    return outcome


async def _call_try_on(
    ctx: RunContext,
    lane: Lane,
    row: ManifestRow,
    record: RowRecord,
    outcome: _TryOnOutcome,
    attempts: list[int],
    t_prep: float,
    images: tuple[PreparedImage | None, PreparedImage | None, PreparedImage | None],
) -> None:
    """The try-on call for work not done before, its result checked, stored and remembered."""
    person, garment, lower = images
    if lane.stager is not None:  # URL-only provider: stage the prepared bytes
        person, garment, lower = [
            await lane.stager.stage(image) if image else None for image in (person, garment, lower)
        ]
    gender = row.gender or ctx.default_gender
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
    client: TryOnClient = lane.client  # type: ignore[assignment]
    data = await _call_and_store(
        ctx,
        lane,
        row,
        record,
        attempts,
        lambda on_submitted: client.try_on(request, on_submitted=on_submitted),
        person=person,
    )
    outcome.coarse = _Coarse.of(record, data)


def _chain(ctx: RunContext, row: ManifestRow) -> list[Lane]:
    """The lanes a row tries in order: its provider, then each fallback that can take it."""
    lanes = [ctx.lane]
    for lane in ctx.fallbacks:
        if lane not in lanes and not provider_problems(row, lane.name, lane.client.capabilities):
            lanes.append(lane)
    return lanes


async def _try_on_chain(
    ctx: RunContext, row: ManifestRow
) -> tuple[list[RowRecord], _Coarse | None]:
    """The try-on stage down the row's chain of providers, until one succeeds, the row's own
    input fails, or none is left. Every attempt is a record; each failed one but the last
    names the provider the row went on to."""
    chain = _chain(ctx, row)
    names = [lane.name for lane in chain]
    records: list[RowRecord] = []
    coarse = None
    for i, lane in enumerate(chain):
        record = _new_record(ctx, row, Stage.TRYON, lane)
        record.fallback_from = names[i - 1] if i else None
        outcome = await _try_on(ctx, lane, row, record, then=names[1:] if i == 0 else ())
        records.append(record)
        coarse = outcome.coarse
        if (
            record.status == Status.SUCCEEDED
            or outcome.input_failed
            or record.error_code == BUDGET_EXHAUSTED  # the run's cap: no provider may go on
            or i + 1 == len(chain)
        ):
            break
        record.fallback_to = names[i + 1]
    final = records[-1]
    first = records[0]
    if (
        len(records) > 1
        and final.status == Status.SUCCEEDED
        and first.work_key is not None
        and ctx.ledger is not None
        and final.row_id is not None
    ):
        await ctx.ledger.mark_done(_redirect_key(first.work_key, names[1:]), final)
    return records, coarse


def _cannot_take(ctx: RunContext, row: ManifestRow) -> RowRecord | None:
    """A compared provider that cannot take this row's request shape: a finished skip."""
    problems = provider_problems(row, ctx.lane.name, ctx.lane.client.capabilities)
    if not problems:
        return None
    record = _new_record(ctx, row, Stage.TRYON, ctx.lane)
    record.status = Status.SKIPPED
    record.error_kind, record.error_code = ErrorKind.PERMANENT, "PROVIDER_CANNOT_TAKE"
    record.error_message = "; ".join(problems)
    return _finish(record, time.perf_counter())


async def _refine(
    ctx: RunContext, row: ManifestRow, coarse: _Coarse | None, coarse_record: RowRecord
) -> RowRecord:
    lane = ctx.refine
    assert lane is not None
    record = _new_record(ctx, row, Stage.REFINE, lane)
    record.coarse_provider = coarse_record.provider
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
    uris = (row.person_image, row.garment_image, row.lower_garment_image)

    async def work(attempts: list[int]) -> None:
        t_prep = time.perf_counter()
        # As for the try-on: the key from hashes first, the coarse result named by its own.
        coarse_sha, coarse_image = await _coarse_sha256(ctx, coarse, lane.profile)
        hashes = (*await _input_hashes(ctx, uris, lane.profile), coarse_sha)
        while True:
            record.person_sha256, record.garment_sha256 = hashes[0], hashes[1]
            record.work_key = work_key(
                stage=str(Stage.REFINE),
                provider=lane.name,
                gender=gender,
                coarse=hashes[3],
                person=hashes[0],
                top=hashes[1],
                bottom=hashes[2],
            )
            async with _one_at_a_time(ctx, record.work_key):
                if await _reuse(ctx, record.work_key, row, record) is not None:
                    record.prepare_ms = _ms(t_prep)
                    return
                person, top, bottom = await asyncio.gather(
                    *(_prepare(ctx, uri, lane.profile) for uri in uris)
                )
                if coarse_image is None:
                    coarse_image = await _prepare_coarse(ctx, coarse, lane.profile)
                if _hashes(person, top, bottom, coarse_image) == hashes:
                    assert person is not None and top is not None
                    record.prepare_ms = _ms(t_prep)
                    await _call_refine(
                        ctx,
                        lane,
                        row,
                        record,
                        attempts,
                        gender,
                        (person, top, bottom, coarse_image),
                    )
                    return
            hashes = _hashes(person, top, bottom, coarse_image)

    await _run_stage(ctx, lane, record, work)
    return record


async def _coarse_sha256(
    ctx: RunContext, coarse: _Coarse, profile: ImageProfile
) -> tuple[str, PreparedImage | None]:
    """The coarse result prepared for the refiner, by hash: from the source index (its
    identity is its content hash), else prepared now (and returned)."""
    if coarse.sha256 is not None:
        known = ctx.images.sources.get(source_key(f"sha256:{coarse.sha256}", profile))
        if known is not None:
            return known, None
    image = await _prepare_coarse(ctx, coarse, profile)
    return image.sha256, image


async def _prepare_coarse(ctx: RunContext, coarse: _Coarse, profile: ImageProfile) -> PreparedImage:
    data = await coarse.read(ctx.lake)
    try:
        image = await asyncio.to_thread(prepare_image, data, profile=profile, source_uri=coarse.uri)
    except ImageInputError as exc:
        raise _RowFailure(ErrorKind.PERMANENT, exc.code, f"coarse result: {exc.message}") from None
    ctx.images.prepared += 1
    ctx.images.sources.remember(source_key(content_identity(data), profile), image.sha256)
    return image


async def _call_refine(
    ctx: RunContext,
    lane: Lane,
    row: ManifestRow,
    record: RowRecord,
    attempts: list[int],
    gender: str,
    images: tuple[PreparedImage, PreparedImage, PreparedImage | None, PreparedImage],
) -> None:
    """The refine call for work not done before, its result checked, stored and remembered."""
    person, top, bottom, coarse_image = images
    request = RefineRequest(
        row_id=row.id,
        person=person,
        top_garment=top,
        coarse=coarse_image,
        gender=gender,
        bottom_garment=bottom,
    )
    refiner: RefinerClient = lane.client  # type: ignore[assignment]
    await _call_and_store(
        ctx,
        lane,
        row,
        record,
        attempts,
        lambda on_submitted: refiner.refine(request, on_submitted=on_submitted),
        person=person,
    )


async def _call_and_store(
    ctx: RunContext,
    lane: Lane,
    row: ManifestRow,
    record: RowRecord,
    attempts: list[int],
    submit: Callable[[OnSubmitted], Awaitable[TryOnResult]],
    *,
    person: PreparedImage,
) -> bytes:
    """The provider call (with retries), its result checked and stored, then remembered in
    the ledger; the result's bytes."""
    t_call = time.perf_counter()
    try:
        result = await call_provider(ctx, lane, submit, record, attempts)
    finally:
        record.provider_ms = _ms(t_call)
    record.request_id = result.request_id or record.request_id
    record.cache_hit = result.cache_hit
    t_dl = time.perf_counter()
    data = await store_result(ctx, lane, result, record, person=person)
    record.download_ms = _ms(t_dl)
    if ctx.thumbnails is not None:
        ctx.thumbnails.offer(row.row_index, record.output_uri, data)
    await _remember(ctx, record)
    return data


async def process_row(row: ManifestRow, ctx: RunContext) -> list[RowRecord]:
    """Take one valid row through its stages to recorded outcomes. Never raises for row-level
    problems: a record per try-on attempt (its provider, then fallbacks while they may help),
    and one for refine when the run refines (on whichever try-on result succeeded)."""
    skipped = _cannot_take(ctx, row) if ctx.track != PRIMARY_TRACK else None
    if skipped is not None:
        await _record_once(ctx, row, skipped)
        records = [skipped]
    else:
        records, coarse = await _try_on_chain(ctx, row)
        if ctx.refine is not None:
            records.append(await _refine(ctx, row, coarse, records[-1]))
    if ctx.progress is not None:  # once every stage is over; shown as its first unsuccessful one
        outcomes = [r for r in records if r.fallback_to is None]
        ctx.progress.row_done(
            next((r for r in outcomes if r.status != Status.SUCCEEDED), outcomes[0])
        )
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
    try:  # what this chunk prepared, named by source, for the next run (tasks.images.sources)
        await asyncio.to_thread(ctx.images.sources.flush)
    except OSError as exc:  # kept for the next chunk's flush; the index only saves work
        logger.warning("the source index could not be written: %s", type(exc).__name__)
    return [record for records in per_row for record in records]
