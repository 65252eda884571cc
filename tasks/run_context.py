"""What every row of a run shares: its lanes (provider accounts with their limits and fatal
stop), the retry policy, the sinks that watch rows finish, and the ``RunContext`` holding them.

One ``RunContext`` is shared by every chunk of a run in the flow's process, so the concurrency
limit, the rate limit, the prepared-image cache and the fatal-error stop apply to the whole run,
not per chunk. A refiner out of credits does not stop the try-on provider: each account is a
``Lane`` of its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol

import httpx

from providers.base import ProviderError, RefinerClient, TryOnClient
from schemas.image_profile import ImageProfile
from schemas.results import PRIMARY_TRACK, RowRecord
from tasks.images import PreparedImageCache
from tasks.lake import Lake
from tasks.ledger import WorkLedger
from tasks.money import Budget
from tasks.staging import InputStager


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
    """One provider account in a run: its client, its limits, its fatal stop, and where its
    inputs are staged when it takes URLs only. Shared by every track that calls it."""

    client: TryOnClient | RefinerClient
    max_in_flight: int
    requests_per_second: float | None = None
    stager: InputStager | None = None
    price: Decimal | None = None  # per charged call, in the run's currency; None: unknown
    bills_failed_jobs: bool = False  # the vendor charges an accepted job that then fails
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

    def stop(self, error: ProviderError) -> None:
        """No call starts on this lane from now on (the first run-fatal error wins)."""
        if self.state.fatal is None:
            self.state.fatal = error
            self.state.fatal_at = time.time()

    def cost_of_calls(self, charged: int) -> float | None:
        """What ``charged`` calls cost, for a record's ``cost``; None when the price is unknown."""
        return None if self.price is None else float(self.price * charged)


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
    """One track of a run: rows whose own provider is ``lane`` (the primary track, with its
    fallbacks), or every row a compared provider gets (a track named after it)."""

    run_id: str
    lane: Lane  # the try-on provider
    http: httpx.AsyncClient  # for fetching inputs (clients have their own for the provider)
    lake: Lake
    images: PreparedImageCache
    track: str = PRIMARY_TRACK
    fallbacks: tuple[Lane, ...] = ()  # tried in order when ``lane`` fails a row
    refine: Lane | None = None  # the refiner, when the run refines
    default_gender: Literal["woman", "man"] | None = None  # for rows without one (refiner)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    storage_options: dict[str, object] = field(default_factory=dict)
    progress: ProgressSink | None = None
    ledger: WorkLedger | None = None  # None: no reuse of earlier work (benchmarks, tests)
    thumbnails: ThumbnailSink | None = None  # contact-sheet thumbnails made during the run
    budget: Budget | None = None  # the run's spend, and its cap when it has one
    work_locks: dict[str, tuple[asyncio.Lock, int]] = field(default_factory=dict)
    row_slots: asyncio.Semaphore = field(init=False)  # rows in progress: bounds prefetch, memory

    def __post_init__(self) -> None:
        self.row_slots = asyncio.Semaphore(rows_in_progress(self.lane.max_in_flight))

    @property
    def client(self) -> TryOnClient:
        return self.lane.client  # type: ignore[return-value]

    @property
    def key(self) -> tuple[str, str, str]:
        """Chunks find their context by this (``tasks.tryon``)."""
        return (self.run_id, self.lane.name, self.track)
