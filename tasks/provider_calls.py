"""Calls to a provider for one row: retries within the attempt budget, resuming a job an
earlier run got accepted, and storing the result in the lake before its URL expires."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from providers.base import OnSubmitted, PreparedImage, ProviderError, TryOnResult
from providers.transport import CallNotSent, gated_call
from schemas.results import ErrorKind, RowRecord
from tasks.images import ImageInputError
from tasks.output_checks import check_output, image_extension
from tasks.run_context import Lane, RunContext

T = TypeVar("T")


async def with_retries(ctx: RunContext, call: Callable[[], Awaitable[T]]) -> T:
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
            result = await client.wait(job.job_id)
    except ProviderError as exc:
        if exc.kind is not ErrorKind.PERMANENT:
            raise
        await ctx.ledger.forget_job(key)
        return None
    # Submitted by the run that crashed, paid for now: no record of that run holds it.
    _charge(ctx, lane, record, reserved=False)
    return result


def _charge(ctx: RunContext, lane: Lane, record: RowRecord, *, reserved: bool) -> None:
    """The vendor charged one call of ``record``'s: into its cost and the run's spend."""
    if ctx.budget is not None:
        if reserved:
            ctx.budget.settle(lane.price, charged=True)
        elif lane.price is not None:
            ctx.budget.spent += lane.price
    if lane.price is not None:
        record.cost = (record.cost or 0.0) + float(lane.price)


async def call_provider(
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
    if lane.state.fatal:  # stopped: not even a poll of an earlier job
        raise lane.state.fatal
    if key is not None:
        resumed = await _resume_job(ctx, lane, key, record)
        if resumed is not None:
            return resumed

    accepted = [False]  # an async job was accepted in this attempt

    async def on_submitted(job_id: str) -> None:
        accepted[0] = True
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
            if ctx.budget is not None:  # BUDGET_EXHAUSTED stops every lane, this one too
                ctx.budget.reserve(lane.price, lane.name)
            attempts[0] += 1
            charged = accepted[0] = False
            try:
                # Checked again as the submission leaves: another row may learn of a fatal
                # error while this one builds its request.
                with gated_call(lambda: lane.state.fatal is None):
                    result = await submit(on_submitted)
                charged = True
                return result
            except CallNotSent:
                attempts[0] -= 1  # nothing reached the provider
                raise lane.state.fatal or ProviderError(
                    kind=ErrorKind.FATAL,
                    code="NOT_SENT",
                    message="stopped before sending",
                    provider=lane.name,
                ) from None
            except ProviderError as exc:
                # Most vendors bill successful calls only; some, an accepted job that fails.
                charged = exc.charged or (accepted[0] and lane.bills_failed_jobs)
                raise
            finally:
                if charged:
                    _charge(ctx, lane, record, reserved=True)
                elif ctx.budget is not None:
                    ctx.budget.settle(lane.price, charged=False)

    return await with_retries(ctx, one_call)


async def store_result(
    ctx: RunContext,
    lane: Lane,
    result: TryOnResult,
    record: RowRecord,
    *,
    person: PreparedImage | None = None,
) -> bytes:
    """Fetch the result now (provider URLs expire: Tencent 1 h, AILab 24 h), check it and write
    it. A result that fails ``check_output`` (compared with ``person``, the person image as
    sent) raises its ``ProviderError`` before anything is written: it does not count."""
    if result.result_data is not None:
        data = result.result_data
    elif result.result_url:
        url = result.result_url
        data = await with_retries(ctx, lambda: lane.client.download(url))
    else:
        raise ProviderError(
            kind=ErrorKind.PERMANENT,
            code="NO_RESULT",
            message="the provider reported success without a result",
            provider=lane.name,
        )
    person_data = person.data if person is not None else None
    extension = await asyncio.to_thread(check_output, data, person=person_data)
    record.output_sha256 = hashlib.sha256(data).hexdigest()
    path = ctx.lake.output_path(record.output_sha256, extension)
    record.output_uri = await ctx.lake.awrite_bytes(path, data)
    if result.mask_url:
        record.mask_uri = await _download_mask(ctx, lane, result.mask_url)
    return data


async def _download_mask(ctx: RunContext, lane: Lane, url: str) -> str | None:
    """Masks are a by-product: a failed mask download never fails the row."""
    try:
        data = await with_retries(ctx, lambda: lane.client.download(url))
        extension = await asyncio.to_thread(image_extension, data)
    except ProviderError:
        return None
    path = ctx.lake.output_path(hashlib.sha256(data).hexdigest(), extension)
    return await ctx.lake.awrite_bytes(path, data)
