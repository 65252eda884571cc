"""Process manifest rows: prepare -> try on -> download -> lake, then optionally refine.

Pure asyncio, no Prefect: the Prefect task in ``tasks.tryon`` is a thin wrapper. One
``RunContext`` is shared by every chunk of a run, so the concurrency limit, the rate limit, the
prepared-image cache and the fatal-error stop apply to the whole run, not per chunk. Each
provider account in play (the try-on provider, the refiner) is a ``Lane`` with its own limits
and its own fatal stop: a refiner out of credits does not stop the try-on provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeVar

import httpx
from PIL import Image

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
from schemas.results import ErrorKind, RowRecord, Stage, Status
from tasks.images import ImageInputError, PreparedImageCache, prepare_image
from tasks.lake import Lake
from tasks.ledger import DoneEntry, WorkLedger, work_key
from tasks.staging import InputStager

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter; a server's Retry-After wins when it is longer."""

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        jittered = random.uniform(0, backoff)
        return max(jittered, min(retry_after, self.max_delay_s * 4)) if retry_after else jittered


class RateLimiter:
    """A token bucket shared by all coroutines of a run (``None`` rate: no limit)."""

    def __init__(self, per_second: float | None, *, burst: int = 1) -> None:
        self.per_second = per_second
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self.per_second:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(
                    self.burst, self._tokens + (now - self._updated) * self.per_second
                )
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.per_second)


class ProgressSink(Protocol):
    def started(self, total: int) -> None: ...
    def row_done(self, record: RowRecord) -> None: ...


class ThumbnailSink(Protocol):
    """Takes image bytes a row already holds, for the contact sheet (``report.ThumbnailBank``)."""

    def offer(self, row_index: int, uri: str | None, data: bytes) -> None: ...


@dataclass(slots=True)
class RunState:
    """Mutable facts shared by all rows of a run, per lane."""

    fatal: ProviderError | None = None
    fatal_at: float | None = None  # Unix time the run learned of it: no call starts after


@dataclass(slots=True, kw_only=True)
class Lane:
    """One provider account in a run: its client, its limits, its fatal stop."""

    client: TryOnClient | RefinerClient
    max_in_flight: int
    requests_per_second: float | None = None
    state: RunState = field(default_factory=RunState)
    semaphore: asyncio.Semaphore = field(init=False)  # calls in flight
    rate: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.max_in_flight)
        self.rate = RateLimiter(self.requests_per_second)

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def profile(self) -> ImageProfile:
        return self.client.profile


def rows_in_progress(max_in_flight: int) -> int:
    """Rows a run works on at once: the call slots plus a margin, so the next rows' inputs are
    ready when a slot frees up and finished calls can download while others are submitted.

    Kept close to the call limit on purpose: every row in progress is a request in the HTTP
    pool, and httpcore's pool bookkeeping costs (connections x queued requests) per event;
    at twice the calls it was most of the flow's CPU in the fast benchmark.
    """
    return max_in_flight + max(2, max_in_flight // 4)


@dataclass(slots=True, kw_only=True)
class RunContext:
    run_id: str
    lane: Lane  # the try-on provider
    http: httpx.AsyncClient  # for fetching inputs (clients have their own for the provider)
    lake: Lake
    images: PreparedImageCache
    refine: Lane | None = None  # the refiner, when the run refines
    default_gender: Literal["woman", "man"] | None = None  # for rows without one (refiner)
    stager: InputStager | None = None  # for providers that take URLs only
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    storage_options: dict[str, object] = field(default_factory=dict)
    progress: ProgressSink | None = None
    ledger: WorkLedger | None = None  # None: no reuse of earlier work (benchmarks, tests)
    thumbnails: ThumbnailSink | None = None  # contact-sheet thumbnails made during the run
    work_locks: dict[str, tuple[asyncio.Lock, int]] = field(default_factory=dict)
    row_slots: asyncio.Semaphore = field(init=False)  # rows in progress: bounds prefetch, memory

    def __post_init__(self) -> None:
        self.row_slots = asyncio.Semaphore(rows_in_progress(self.lane.max_in_flight))

    @property
    def client(self) -> TryOnClient:
        return self.lane.client  # type: ignore[return-value]


class _RowFailure(Exception):
    """Internal: ends a row with a recorded error."""

    def __init__(self, kind: ErrorKind, code: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.code, self.message = kind, code, message


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _sniff_extension(data: bytes) -> str:
    """Check the result really is an image and name its format (a provider may lie)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            fmt = (image.format or "").upper()
    except Exception as exc:
        raise ProviderError(
            kind=ErrorKind.PERMANENT,
            code="RESULT_NOT_AN_IMAGE",
            message=f"provider result does not decode as an image ({type(exc).__name__})",
            provider="result",
        ) from None
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}.get(fmt, fmt.lower())


async def _with_retries(ctx: RunContext, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call`` until it succeeds, fails for good, or the attempt budget is spent."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except (ProviderError, ImageInputError) as exc:
            transient = exc.retryable if isinstance(exc, ProviderError) else exc.transient
            if not transient or attempt >= ctx.retry.max_attempts:
                raise
            retry_after = exc.retry_after if isinstance(exc, ProviderError) else None
            await asyncio.sleep(ctx.retry.delay(attempt, retry_after))


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
        return await _with_retries(
            ctx,
            lambda: ctx.images.get(
                uri, http=ctx.http, profile=profile, storage_options=ctx.storage_options
            ),
        )
    except ImageInputError as exc:
        kind = ErrorKind.TRANSIENT if exc.transient else ErrorKind.PERMANENT
        raise _RowFailure(kind, exc.code, exc.message) from None


class _Resumable(Protocol):
    async def wait(self, job_id: str) -> TryOnResult: ...


async def _resume_job(
    ctx: RunContext, lane: Lane, key: str, record: RowRecord
) -> TryOnResult | None:
    """Poll the job an earlier (crashed) run got accepted for this work, if there is one.

    None: nothing to resume, or the provider says the job failed or does not know it (then a
    new submission is the only way). Transient and fatal errors propagate: the job may still
    finish, so a later rerun polls it again rather than paying twice.
    """
    if ctx.ledger is None or not hasattr(lane.client, "wait"):
        return None
    job = await ctx.ledger.job(key)
    if job is None or job.provider != lane.name:
        return None
    record.request_id = job.job_id
    client: _Resumable = lane.client  # type: ignore[assignment]
    try:
        async with lane.semaphore:  # a running job holds a provider slot, as when submitted
            return await client.wait(job.job_id)
    except ProviderError as exc:
        if exc.kind is not ErrorKind.PERMANENT:
            raise
        await ctx.ledger.forget_job(key)
        return None


async def _call(
    ctx: RunContext,
    lane: Lane,
    submit: Callable[[OnSubmitted], Awaitable[TryOnResult]],
    record: RowRecord,
    attempts: list[int],
) -> TryOnResult:
    """Call a lane's provider with retries; ``attempts[0]`` counts calls that really went out.

    A job id is put on the record, and in the ledger, the moment the provider accepts the job
    and before the first poll: known even if polling fails, resumed if the process dies.
    """
    key = record.work_key
    if key is not None:
        resumed = await _resume_job(ctx, lane, key, record)
        if resumed is not None:
            return resumed

    async def on_submitted(job_id: str) -> None:
        record.request_id = job_id
        if ctx.ledger is not None and key is not None:
            await ctx.ledger.record_job(key, lane.name, job_id)

    async def one_call() -> TryOnResult:
        if lane.state.fatal:  # another row hit a run-fatal error while we waited
            raise lane.state.fatal
        async with lane.semaphore:
            await lane.rate.acquire()
            if lane.state.fatal:
                raise lane.state.fatal
            attempts[0] += 1
            return await submit(on_submitted)

    return await _with_retries(ctx, one_call)


async def _store_result(
    ctx: RunContext, lane: Lane, result: TryOnResult, record: RowRecord
) -> bytes:
    """Fetch the result now (provider URLs expire: Tencent 1 h, AILab 24 h) and write it."""
    if result.result_data is not None:
        data = result.result_data
    elif result.result_url:
        url = result.result_url
        data = await _with_retries(ctx, lambda: lane.client.download(url))
    else:
        raise ProviderError(
            kind=ErrorKind.PERMANENT,
            code="NO_RESULT",
            message="the provider reported success without a result",
            provider=lane.name,
        )
    extension = await asyncio.to_thread(_sniff_extension, data)
    record.output_sha256 = hashlib.sha256(data).hexdigest()
    path = ctx.lake.output_path(record.output_sha256, extension)
    record.output_uri = await ctx.lake.awrite_bytes(path, data)
    if result.mask_url:
        record.mask_uri = await _download_mask(ctx, lane, result.mask_url)
    return data


async def _download_mask(ctx: RunContext, lane: Lane, url: str) -> str | None:
    """Masks are a by-product: a failed mask download never fails the row."""
    try:
        data = await _with_retries(ctx, lambda: lane.client.download(url))
        extension = await asyncio.to_thread(_sniff_extension, data)
    except ProviderError:
        return None
    path = ctx.lake.output_path(hashlib.sha256(data).hexdigest(), extension)
    return await ctx.lake.awrite_bytes(path, data)


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
                result = await _call(
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
            output.append(await _store_result(ctx, lane, result, record))
            record.download_ms = _ms(t_dl)
            if ctx.thumbnails is not None:
                ctx.thumbnails.offer(row.row_index, record.output_uri, output[-1])
            await _remember(ctx, record)

    await _run_stage(ctx, lane, record, work)
    return output[0] if output else None


def refine_not_applicable(row: ManifestRow) -> str | None:
    """Why the refiner cannot take this row (it needs a top garment), or None."""
    if row.garment_image is None:
        return "the refiner needs a garment image; a prompt row cannot be refined"
    if row.category == "lower_body":
        return "the refiner needs a top garment; a lower_body row has none"
    return None


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
                result = await _call(
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
            refined = await _store_result(ctx, lane, result, record)
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
