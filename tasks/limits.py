"""Provider limits across runs and workers: Prefect global concurrency limits, leased per run.

Every provider account has a global concurrency limit ``tryon-<provider>`` on the Prefect
server (created at the first run with the provider's default, then the operator's to change in
the UI or with ``global_max_in_flight``). A run leases its ``max_in_flight`` slots once, for as
long as it calls that provider, and enforces them locally with a semaphore: one server round
trip per run and provider, none per request (a per-request acquire would cost the throughput
of fast providers). Runs and workers therefore share the account: the sum of leases never
exceeds the limit; a run that finds no free slots waits for them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.asyncio import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger

PREFIX = "tryon-"
# Leases are renewed in the background while the run holds them. A killed run's slots come
# back once its lease expires and the server's repossessor runs (every 15 s by default): a
# `prefect server start` does this; Prefect's temporary local server runs no repossessor, so
# there a killed run's slots stay taken until reset (README, "Limits").
# The server refuses leases under 60 s.
LEASE_DURATION_S = max(60.0, float(os.environ.get("TRYON_LEASE_DURATION_S", "120")))
# After this long without slots, say why the run waits (it then goes on waiting).
WAIT_WARNING_S = 20.0


def global_limit_name(provider: str) -> str:
    return f"{PREFIX}{provider}"


async def ensure_global_limit(provider: str, *, default: int, override: int | None) -> int:
    """Create the provider's limit if missing (idempotent), or set it when ``override`` is
    given; returns the limit in force."""
    name = global_limit_name(provider)
    async with get_client() as client:
        if override is not None:
            await client.upsert_global_concurrency_limit_by_name(name, override)
            return override
        try:
            return (await client.read_global_concurrency_limit_by_name(name)).limit
        except ObjectNotFound:
            pass
        with suppress(ObjectAlreadyExists):  # another run created it first: theirs stands
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=default)
            )
        return (await client.read_global_concurrency_limit_by_name(name)).limit


@asynccontextmanager
async def leased_slots(
    provider: str, *, wanted: int, default_limit: int, override: int | None = None
) -> AsyncIterator[int]:
    """Hold up to ``wanted`` slots of the provider's global limit; yields how many are held."""
    limit = await ensure_global_limit(provider, default=default_limit, override=override)
    slots = max(1, min(wanted, limit))  # never ask for more than exists: that would wait forever
    name = global_limit_name(provider)

    def lease(timeout_s: float | None) -> AbstractAsyncContextManager[None]:
        return concurrency(
            name,
            occupy=slots,
            strict=True,
            lease_duration=LEASE_DURATION_S,
            timeout_seconds=timeout_s,
        )

    async with AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(lease(WAIT_WARNING_S))
        except TimeoutError:
            get_logger("tryon.limits").warning(
                "waiting for %d slot(s) of the global limit %s (limit %d): other runs hold "
                "them, or a killed run whose lease has not expired yet (%.0f s). Prefect's "
                "temporary local server never reclaims expired leases: reset with "
                "`prefect gcl update %s --active-slots 0` once no run is using it",
                slots,
                name,
                limit,
                LEASE_DURATION_S,
                name,
            )
            await stack.enter_async_context(lease(None))
        yield slots
