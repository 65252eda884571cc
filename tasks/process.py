"""Process manifest rows through one provider: prepare -> try on -> download -> lake.

Pure asyncio, no Prefect: the Prefect task in ``tasks.tryon`` is a thin wrapper. One
``RunContext`` is shared by every chunk of a run, so the concurrency limit, the rate limit, the
prepared-image cache and the fatal-error stop apply to the whole run, not per chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import httpx
from PIL import Image

from providers.base import (
    PreparedImage,
    ProviderError,
    TryOnClient,
    TryOnRequest,
    TryOnResult,
)
from schemas.manifest import ManifestRow
from schemas.results import ErrorKind, RowRecord, Stage, Status
from tasks.images import ImageInputError, PreparedImageCache
from tasks.lake import Lake

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


@dataclass(slots=True)
class RunState:
    """Mutable facts shared by all rows of a run."""

    fatal: ProviderError | None = None
    provider_calls: int = 0


@dataclass(slots=True, kw_only=True)
class RunContext:
    run_id: str
    client: TryOnClient
    http: httpx.AsyncClient  # for fetching inputs (the client has its own for the provider)
    lake: Lake
    images: PreparedImageCache
    max_in_flight: int
    requests_per_second: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    storage_options: dict[str, object] = field(default_factory=dict)
    state: RunState = field(default_factory=RunState)
    progress: ProgressSink | None = None
    semaphore: asyncio.Semaphore = field(init=False)  # provider calls in flight
    row_slots: asyncio.Semaphore = field(init=False)  # rows in progress: bounds prefetch, memory
    rate: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.max_in_flight)
        # Twice the call slots: the next rows' inputs are ready when a slot frees up.
        self.row_slots = asyncio.Semaphore(self.max_in_flight * 2 + 8)
        self.rate = RateLimiter(self.requests_per_second)


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


async def _prepare(ctx: RunContext, uri: str | None) -> PreparedImage | None:
    if uri is None:
        return None
    profile = ctx.client.profile
    return await _with_retries(
        ctx,
        lambda: ctx.images.get(
            uri, http=ctx.http, profile=profile, storage_options=ctx.storage_options
        ),
    )


async def _call_provider(
    ctx: RunContext, request: TryOnRequest, attempts: list[int]
) -> TryOnResult:
    """Submit with retries; ``attempts[0]`` counts only calls that really reached the client."""

    async def one_call() -> TryOnResult:
        if ctx.state.fatal:  # another row hit a run-fatal error while we waited
            raise ctx.state.fatal
        async with ctx.semaphore:
            await ctx.rate.acquire()
            if ctx.state.fatal:
                raise ctx.state.fatal
            ctx.state.provider_calls += 1
            attempts[0] += 1
            return await ctx.client.try_on(request)

    return await _with_retries(ctx, one_call)


async def process_row(row: ManifestRow, ctx: RunContext) -> RowRecord:
    """Take one valid row to a recorded outcome. Never raises for row-level problems."""
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    record = RowRecord(
        run_id=ctx.run_id,
        row_id=row.id,
        row_index=row.row_index,
        stage=Stage.TRYON,
        provider=ctx.client.name,
        status=Status.FAILED,
        person_image=row.person_image,
        garment_image=row.garment_image,
        lower_garment_image=row.lower_garment_image,
        category=row.category,
        started_at=started,
    )
    if ctx.state.fatal is not None:
        return _finish(ctx, record, t0, skipped_by=ctx.state.fatal)

    provider_attempts = [0]
    try:
        t_prep = time.perf_counter()
        try:
            person, garment, lower = await asyncio.gather(
                _prepare(ctx, row.person_image),
                _prepare(ctx, row.garment_image),
                _prepare(ctx, row.lower_garment_image),
            )
        except ImageInputError as exc:
            kind = ErrorKind.TRANSIENT if exc.transient else ErrorKind.PERMANENT
            raise _RowFailure(kind, exc.code, exc.message) from None
        record.prepare_ms = _ms(t_prep)
        assert person is not None
        record.person_sha256 = person.sha256
        record.garment_sha256 = garment.sha256 if garment else None

        request = TryOnRequest(
            row_id=row.id,
            person=person,
            garment=garment,
            lower_garment=lower,
            category=row.category,
            garment_description=row.garment_description,
            prompt=row.prompt,
            gender=row.gender,
        )
        t_call = time.perf_counter()
        try:
            result = await _call_provider(ctx, request, provider_attempts)
        finally:
            record.provider_ms = _ms(t_call)
            record.attempts = provider_attempts[0]
        record.request_id = result.request_id
        record.cache_hit = result.cache_hit

        # Provider URLs expire (Tencent 1 h, AILab 24 h): fetch now, not at the end of the run.
        t_dl = time.perf_counter()
        data = await _result_bytes(ctx, result)
        extension = await asyncio.to_thread(_sniff_extension, data)
        record.output_sha256 = hashlib.sha256(data).hexdigest()
        record.output_uri = await ctx.lake.awrite_bytes(
            ctx.lake.result_path(ctx.run_id, row.id, f"{Stage.TRYON}.{extension}"), data
        )
        if result.mask_url:
            record.mask_uri = await _download_mask(ctx, row.id, result.mask_url)
        record.download_ms = _ms(t_dl)
        record.status = Status.SUCCEEDED
    except _RowFailure as failure:
        record.error_kind, record.error_code = failure.kind, failure.code
        record.error_message = failure.message
    except ProviderError as exc:
        if exc.kind is ErrorKind.FATAL and ctx.state.fatal is None:
            ctx.state.fatal = exc
        if exc is ctx.state.fatal and provider_attempts[0] == 0:
            return _finish(ctx, record, t0, skipped_by=exc)
        record.error_kind, record.error_code = exc.kind, exc.code
        record.error_message = exc.message
        record.request_id = record.request_id or exc.request_id
    record.attempts = max(record.attempts, provider_attempts[0])
    return _finish(ctx, record, t0)


async def _result_bytes(ctx: RunContext, result: TryOnResult) -> bytes:
    """The result's bytes: inline (base64 answers) or downloaded from its URL."""
    if result.result_data is not None:
        return result.result_data
    if not result.result_url:
        raise ProviderError(
            kind=ErrorKind.PERMANENT,
            code="NO_RESULT",
            message="the provider reported success without a result",
            provider=ctx.client.name,
        )
    url = result.result_url
    return await _with_retries(ctx, lambda: ctx.client.download(url))


async def _download_mask(ctx: RunContext, row_id: str, url: str) -> str | None:
    """Masks are a by-product: a failed mask download never fails the row."""
    try:
        data = await _with_retries(ctx, lambda: ctx.client.download(url))
        extension = await asyncio.to_thread(_sniff_extension, data)
    except ProviderError:
        return None
    path = ctx.lake.result_path(ctx.run_id, row_id, f"{Stage.TRYON}-mask.{extension}")
    return await ctx.lake.awrite_bytes(path, data)


def _finish(
    ctx: RunContext, record: RowRecord, t0: float, *, skipped_by: ProviderError | None = None
) -> RowRecord:
    if skipped_by is not None:
        record.status = Status.SKIPPED
        record.error_kind = ErrorKind.FATAL
        record.error_code = skipped_by.code
        record.error_message = f"not attempted: the run stopped on {skipped_by}"
    record.finished_at = datetime.now(UTC)
    record.total_ms = _ms(t0)
    if ctx.progress is not None:
        ctx.progress.row_done(record)
    return record


async def process_rows(rows: Sequence[ManifestRow], ctx: RunContext) -> list[RowRecord]:
    """Rows concurrently, bounded by the run's row slots; results in input order."""

    async def bounded(row: ManifestRow) -> RowRecord:
        async with ctx.row_slots:
            return await process_row(row, ctx)

    return list(await asyncio.gather(*(bounded(row) for row in rows)))
