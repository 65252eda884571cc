"""Building a run's working context: provider lanes, input fetching, staging.

The flow builds one ``RunContext`` per provider for chunks that run in its own process (the
default: chunks share its event loop, HTTP pools and limiter). A chunk that runs elsewhere (a
Dask worker) cannot reach those objects: it gets ``ChunkSettings`` instead, plain data with its
share of the run's leased slots, and rebuilds a context of its own with ``standalone_context``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence, Sized
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import httpx
from prefect.logging import get_run_logger

from providers.base import ProviderError
from providers.registry import PROVIDERS, REFINER, ProviderSpec
from providers.transport import provider_http_client
from schemas.results import PRIMARY_TRACK, ErrorKind
from schemas.summary import RunNotStarted
from tasks.chunk_settings import ChunkSettings
from tasks.concurrency import global_limit_name, leased_slots
from tasks.credentials import load_secret_blocks
from tasks.fetch_guard import inputs_client_for
from tasks.images import PreparedImageCache
from tasks.images.sources import SourceIndex
from tasks.lake import Lake
from tasks.ledger import WorkLedger
from tasks.money import Budget
from tasks.process import Lane, ProgressSink, RetryPolicy, RunContext, rows_in_progress
from tasks.report import ThumbnailBank
from tasks.staging import InputStager

# Provider calls wait long (async jobs, big uploads); connecting should not.
PROVIDER_TIMEOUT = httpx.Timeout(180.0, connect=10.0)


def credential_env_names(providers: list[str], *, refine: bool) -> list[str]:
    """The environment variables holding the credentials of these accounts."""
    specs = [PROVIDERS[name] for name in providers] + ([REFINER] if refine else [])
    return list(dict.fromkeys(env for spec in specs for env in spec.credential_env))


async def open_lane(
    stack: AsyncExitStack,
    spec: ProviderSpec,
    *,
    in_flight: int,
    requests_per_second: float | None,
) -> Lane:
    """A provider client on its own connection pool, with ``in_flight`` call slots.

    Raises ``ProviderError`` when the environment lacks the provider's configuration.
    """
    http = await stack.enter_async_context(
        # One connection per row in progress (see rows_in_progress), on the aiohttp
        # transport: httpcore's pool bookkeeping was most of the fast path's CPU.
        provider_http_client(max_connections=rows_in_progress(in_flight), timeout=PROVIDER_TIMEOUT)
    )
    client = spec.make_client(http=http)
    return Lane(
        client=client,
        max_in_flight=in_flight,
        requests_per_second=requests_per_second,
        bills_failed_jobs=spec.bills_failed_jobs,
    )


def open_stager(stack: AsyncExitStack, lake: Lake, lane: Lane) -> Lane:
    """Give a provider that takes image URLs only its stager; raises ``ValueError`` if no URL
    can be given."""
    if lane.client.capabilities.needs_urls:
        lane.stager = InputStager(lake, provider_base_url=lane.client.base_url)
        stack.callback(lane.stager.close)
    return lane


def error_fields(error: ProviderError | None) -> dict[str, Any] | None:
    """A provider error as plain data, to cross processes in task parameters and results."""
    if error is None:
        return None
    return {
        "kind": str(error.kind),
        "code": error.code,
        "message": error.message,
        "provider": error.provider,
        "http_status": error.http_status,
        "request_id": error.request_id,
    }


def error_from_fields(fields: dict[str, Any]) -> ProviderError:
    return ProviderError(**{**fields, "kind": ErrorKind(fields["kind"])})


@asynccontextmanager
async def standalone_context(
    run_id: str, provider: str, settings: ChunkSettings
) -> AsyncIterator[RunContext]:
    """A chunk's own context: its own clients, image cache and slots (its share of the run's
    lease, which the flow holds), and the run's work ledger in the lake."""
    names = [provider, *(share.provider for share in settings.fallbacks)]
    await load_secret_blocks(credential_env_names(names, refine=settings.refine))
    async with AsyncExitStack() as stack:
        lake = Lake.open(settings.lake, storage_options=settings.storage_options)
        refine = None
        if settings.refine:
            refine = await open_lane(
                stack,
                REFINER,
                in_flight=settings.refine_max_in_flight,
                requests_per_second=settings.refine_requests_per_second,
            )
            if settings.refine_fatal:
                refine.state.fatal = error_from_fields(settings.refine_fatal)
        lane = await open_lane(
            stack,
            PROVIDERS[provider],
            in_flight=settings.max_in_flight,
            requests_per_second=settings.requests_per_second,
        )
        if settings.fatal:
            lane.state.fatal = error_from_fields(settings.fatal)
        for priced in (lane, refine):
            if priced is not None and (amount := settings.prices.get(priced.name)) is not None:
                priced.price = Decimal(amount)
        fallbacks = []
        for share in settings.fallbacks:
            fallback = await open_lane(
                stack,
                PROVIDERS[share.provider],
                in_flight=share.max_in_flight,
                requests_per_second=share.requests_per_second,
            )
            if share.fatal:
                fallback.state.fatal = error_from_fields(share.fatal)
            if (amount := settings.prices.get(share.provider)) is not None:
                fallback.price = Decimal(amount)
            fallbacks.append(open_stager(stack, lake, fallback))
        yield RunContext(
            run_id=run_id,
            lane=open_stager(stack, lake, lane),
            track=settings.track,
            fallbacks=tuple(fallbacks),
            refine=refine,
            default_gender=settings.refine_gender,
            http=await stack.enter_async_context(
                inputs_client_for(settings.fetch_allow, timeout_s=settings.fetch_timeout_s)
            ),
            lake=lake,
            images=PreparedImageCache(sources=await _source_index(lake, run_id)),
            retry=RetryPolicy(max_attempts=settings.max_attempts),
            storage_options=settings.storage_options,
            # Another process: other chunks of the run write keys after any listing it takes.
            ledger=WorkLedger(lake, run_id, listing=False),
        )


_RUN_INDEX: dict[tuple[str, str], SourceIndex] = {}


async def _source_index(lake: Lake, run_id: str) -> SourceIndex:
    """The run's source index in this worker process: read once per run, not per chunk."""
    key = (lake.root, run_id)
    if key not in _RUN_INDEX:
        index = await asyncio.to_thread(SourceIndex.load, lake, run_id)
        _RUN_INDEX.clear()  # one run at a time per worker process is the common case
        _RUN_INDEX[key] = index
    return _RUN_INDEX[key]


def split_slots(total: int, parts: int) -> list[int]:
    """``total`` slots as ``parts`` near-equal shares, none empty (``parts <= total``)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


# ------------------------------------------------------------------------- a run's lanes


class LaneLimits(Protocol):
    """One provider's limits for a run (``flows.params.ProviderLimits``); 0 or None: the
    provider's default (the global limit: left as it is)."""

    @property
    def max_in_flight(self) -> int | None: ...
    @property
    def requests_per_second(self) -> float | None: ...
    @property
    def global_max_in_flight(self) -> int | None: ...


async def open_leased_lane(stack: AsyncExitStack, spec: ProviderSpec, limits: LaneLimits) -> Lane:
    """A lane holding the run's share of the provider account's global limit, leased once for
    the whole run. Raises ``RunNotStarted`` when the provider's configuration is missing."""
    wanted = limits.max_in_flight or spec.max_in_flight
    in_flight = await stack.enter_async_context(
        leased_slots(
            spec.name,
            wanted=wanted,
            default_limit=spec.max_in_flight,
            override=limits.global_max_in_flight or None,
        )
    )
    if in_flight < wanted:
        get_run_logger().warning(
            "%s: %d in flight asked, %d allowed by the global limit %s",
            spec.name,
            wanted,
            in_flight,
            global_limit_name(spec.name),
        )
    rps = limits.requests_per_second or spec.requests_per_second
    try:
        return await open_lane(stack, spec, in_flight=in_flight, requests_per_second=rps)
    except (ProviderError, ValueError) as exc:  # missing or malformed configuration
        raise RunNotStarted(str(exc)) from None


@dataclass(slots=True)
class RunContexts:
    """One ``RunContext`` per track of the run with the rows it runs, and what they share."""

    tracks: list[tuple[RunContext, Sized]]
    lanes_by_provider: dict[str, Lane]
    refine: Lane | None
    thumbnails: ThumbnailBank
    images: PreparedImageCache  # shared by the tracks in this process

    @property
    def contexts(self) -> list[RunContext]:
        return [ctx for ctx, _ in self.tracks]

    def lanes(self) -> list[Lane]:
        return [*self.lanes_by_provider.values()] + ([self.refine] if self.refine else [])


async def open_run_contexts(
    stack: AsyncExitStack,
    *,
    run_id: str,
    lake: Lake,
    rows_by_provider: Mapping[str, Sized],
    settings: ChunkSettings,
    limits: LaneLimits,
    refine_limits: LaneLimits,
    progress: ProgressSink,
    compare: Mapping[str, Sized] | None = None,
    fallback: Sequence[str] = (),
    prices: Mapping[str, Decimal | None] | None = None,
    budget: Budget | None = None,
) -> RunContexts:
    """The run's working context, closed with ``stack``: the guarded inputs client,
    credentials from Secret blocks, one leased lane per provider account (own, compared,
    fallback; and the refiner's), input staging where a provider takes URLs only, and one
    ``RunContext`` per track: each own provider's rows (falling back in ``fallback``'s order),
    and each compared provider's rows. Raises ``RunNotStarted``."""
    compare = compare or {}
    # Guarded: no loopback, private or link-local address unless fetch_allow names it.
    inputs_http = await stack.enter_async_context(
        inputs_client_for(settings.fetch_allow, timeout_s=settings.fetch_timeout_s)
    )
    names = [*rows_by_provider, *compare]
    names = list(dict.fromkeys(names + (list(fallback) if rows_by_provider else [])))
    # Credentials the environment lacks may come from Prefect Secret blocks.
    await load_secret_blocks(credential_env_names(names, refine=settings.refine))
    prices = prices or {}
    refine = await open_leased_lane(stack, REFINER, refine_limits) if settings.refine else None
    lanes: dict[str, Lane] = {}
    for name in names:
        lane = await open_leased_lane(stack, PROVIDERS[name], limits)
        try:
            lanes[name] = open_stager(stack, lake, lane)
        except ValueError as exc:
            raise RunNotStarted(str(exc)) from None
    for lane in [*lanes.values(), *([refine] if refine else [])]:
        lane.price = prices.get(lane.name)
        if budget is not None:
            budget.lanes.append(lane)
    # What earlier runs prepared, by source: a rerun's finished rows decode nothing.
    images = PreparedImageCache(sources=await asyncio.to_thread(SourceIndex.load, lake, run_id))
    # Contact-sheet thumbnails made as rows go, while the CPU waits on providers.
    thumbnails = ThumbnailBank()

    def context(name: str, track: str) -> RunContext:
        return RunContext(
            run_id=run_id,
            lane=lanes[name],
            track=track,
            fallbacks=(
                tuple(lanes[f] for f in fallback if f != name) if track == PRIMARY_TRACK else ()
            ),
            refine=refine,
            default_gender=settings.refine_gender,
            http=inputs_http,
            lake=lake,
            images=images,
            retry=RetryPolicy(max_attempts=settings.max_attempts),
            storage_options=settings.storage_options,
            progress=progress,
            ledger=WorkLedger(lake, run_id),
            thumbnails=thumbnails,
            budget=budget,
        )

    tracks = [(context(name, PRIMARY_TRACK), rows) for name, rows in rows_by_provider.items()]
    tracks += [(context(name, name), rows) for name, rows in compare.items()]
    logger = get_run_logger()
    for ctx, rows in tracks:
        role = "" if ctx.track == PRIMARY_TRACK else " (compared)"
        logger.info(
            "%s%s: %d rows, %d in flight", ctx.lane.name, role, len(rows), ctx.lane.max_in_flight
        )
    return RunContexts(
        tracks=tracks, lanes_by_provider=lanes, refine=refine, thumbnails=thumbnails, images=images
    )
