"""Running a provider's rows as chunks: one interface, in the flow's process or on Dask.

Either way a chunk is the ``process_chunk`` task and the flow gets its ``ChunkOutcome``s back.
In the flow's process chunks share its event loop, HTTP pools, image cache and limiter (the
``RunContext``). On Dask, chunks run in other processes: each rebuilds its context from
``ChunkSettings`` with a share of the run's leased slots, so together they never exceed them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prefect.utilities.annotations import quote

from schemas.manifest import ManifestRow
from schemas.results import Stage
from tasks.chunk_settings import LaneShare
from tasks.context import ChunkSettings, error_fields, error_from_fields, split_slots
from tasks.process import Lane, ProgressSink, RunContext
from tasks.tryon import ChunkOutcome, process_chunk, register_context, unregister_context

# Chunks in progress beyond those the provider slots need: a chunk waiting on one slow row
# (a hung call runs to the client's timeout) must not idle the others.
CHUNK_SPARES = 4


class ChunkExecutor(Protocol):
    async def run(self, ctx: RunContext, rows: Sequence[ManifestRow]) -> list[ChunkOutcome]:
        """Process ``rows`` for ``ctx``'s provider, chunk by chunk; the chunks' outcomes."""
        ...


def chunks_of(rows: Sequence[ManifestRow], size: int) -> list[Sequence[ManifestRow]]:
    """Slices of ``rows``. Slices of ``ManifestRows`` are not built yet: a chunk's row objects
    are made when it starts (``list(chunk)``), so only chunks in progress hold them."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


@dataclass(frozen=True, slots=True)
class _FinishedRow:
    """What progress sinks read of a row a remote chunk finished."""

    status: str


@dataclass(slots=True)
class InProcessChunks:
    """Chunks awaited on the flow's own event loop, with the flow's ``RunContext``."""

    chunk_size: int

    async def run(self, ctx: RunContext, rows: Sequence[ManifestRow]) -> list[ChunkOutcome]:
        chunks = chunks_of(rows, self.chunk_size)
        # Enough chunks in progress to keep every provider slot busy, plus spares. Rows in
        # progress stay bounded by the run's row slots either way.
        gate = asyncio.Semaphore(
            math.ceil(2 * ctx.lane.max_in_flight / self.chunk_size) + CHUNK_SPARES
        )
        register_context(ctx)  # process_chunk finds it by run id and provider
        try:
            return list(
                await asyncio.gather(*(self._one(ctx, gate, i, c) for i, c in enumerate(chunks)))
            )
        finally:
            unregister_context(ctx)

    @staticmethod
    async def _one(
        ctx: RunContext, gate: asyncio.Semaphore, index: int, chunk: Sequence[ManifestRow]
    ) -> ChunkOutcome:
        async with gate:
            return await process_chunk(
                # Quoted: Prefect would otherwise walk every row's every field looking for
                # futures (~0.25 ms a row, as much as the rest of a rerun's work on it).
                ctx.run_id,
                ctx.lane.name,
                index,
                quote(list(chunk)),
                track=ctx.track,
            )


@dataclass(frozen=True, slots=True)
class _Shares:
    """One running chunk's slots on each account: try-on, refiner, fallbacks (in order)."""

    tryon: int
    refine: int
    fallbacks: tuple[int, ...]


def _rate(lane: Lane | None, share: int) -> float | None:
    rps = lane.requests_per_second if lane else None
    return rps * share / lane.max_in_flight if lane and rps else None


@dataclass(slots=True)
class DaskChunks:
    """Chunks as Dask tasks, as many at once as the cluster has threads.

    Each running chunk holds a share of the run's leased slots (and rate). Chunks started after
    one reports a run-fatal error are told of it: they record their rows as not attempted,
    without calling.
    """

    chunk_size: int
    threads: int
    settings: ChunkSettings  # the run-wide part; shares and fatal errors are set per chunk
    progress: ProgressSink

    async def run(self, ctx: RunContext, rows: Sequence[ManifestRow]) -> list[ChunkOutcome]:
        chunks = chunks_of(rows, self.chunk_size)
        lane, refine = ctx.lane, ctx.refine
        parallel = min(len(chunks), self.threads, lane.max_in_flight)
        tryon_shares = split_slots(lane.max_in_flight, parallel)
        refine_shares = split_slots(refine.max_in_flight, parallel) if refine else []
        fallback_shares = [split_slots(f.max_in_flight, parallel) for f in ctx.fallbacks]
        shares: asyncio.Queue[_Shares] = asyncio.Queue()
        for i, share in enumerate(tryon_shares):
            shares.put_nowait(
                _Shares(
                    tryon=share,
                    refine=refine_shares[i % len(refine_shares)] if refine else 1,
                    fallbacks=tuple(split[i % len(split)] for split in fallback_shares),
                )
            )
        return list(
            await asyncio.gather(*(self._one(ctx, shares, i, c) for i, c in enumerate(chunks)))
        )

    async def _one(
        self,
        ctx: RunContext,
        shares: asyncio.Queue[_Shares],
        index: int,
        chunk: Sequence[ManifestRow],
    ) -> ChunkOutcome:
        lane, refine = ctx.lane, ctx.refine
        share = await shares.get()
        try:
            settings = self.settings.model_copy(
                update={
                    "max_in_flight": share.tryon,
                    "requests_per_second": _rate(lane, share.tryon),
                    "refine_max_in_flight": share.refine,
                    "refine_requests_per_second": _rate(refine, share.refine),
                    "fatal": error_fields(lane.state.fatal),
                    "refine_fatal": error_fields(refine.state.fatal) if refine else None,
                    "track": ctx.track,
                    "fallbacks": [
                        LaneShare(
                            provider=fallback.name,
                            max_in_flight=n,
                            requests_per_second=_rate(fallback, n),
                            fatal=error_fields(fallback.state.fatal),
                        )
                        for fallback, n in zip(ctx.fallbacks, share.fallbacks, strict=True)
                    ],
                }
            )
            future = process_chunk.submit(
                # Not quoted here: the annotation does not survive the trip to a worker.
                ctx.run_id,
                lane.name,
                index,
                list(chunk),
                settings,
                track=ctx.track,
            )
            outcome: ChunkOutcome = await asyncio.to_thread(future.result)
        finally:
            shares.put_nowait(share)
        # The first fatal error wins, as in-process.
        if outcome.fatal and lane.state.fatal is None:
            lane.state.fatal = error_from_fields(outcome.fatal)
            lane.state.fatal_at = time.time()
        if refine and outcome.refine_fatal and refine.state.fatal is None:
            refine.state.fatal = error_from_fields(outcome.refine_fatal)
        for fallback in ctx.fallbacks:
            fields = outcome.fallback_fatal.get(fallback.name)
            if fields and fallback.state.fatal is None:
                fallback.state.fatal = error_from_fields(fields)
                fallback.state.fatal_at = time.time()
        for status, n in outcome.counts.get(Stage.TRYON, {}).items():
            for _ in range(n):
                self.progress.row_done(_FinishedRow(status=status))  # type: ignore[arg-type]
        return outcome
