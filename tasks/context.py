"""Building a run's working context: provider lanes, input fetching, staging.

The flow builds one ``RunContext`` per provider for chunks that run in its own process (the
default: chunks share its event loop, HTTP pools and limiter). A chunk that runs elsewhere (a
Dask worker) cannot reach those objects: it gets ``ChunkSettings`` instead, plain data with its
share of the run's leased slots, and rebuilds a context of its own with ``standalone_context``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from providers.base import ProviderError
from providers.registry import PROVIDERS, REFINER, ProviderSpec
from providers.settings import API_KEY_ENV
from providers.transport import provider_http_client
from schemas.results import ErrorKind
from tasks.credentials import load_secret_blocks
from tasks.fetch_guard import inputs_client_for
from tasks.images import PreparedImageCache
from tasks.lake import Lake
from tasks.ledger import WorkLedger
from tasks.process import Lane, RetryPolicy, RunContext, rows_in_progress
from tasks.staging import InputStager

# Provider calls wait long (async jobs, big uploads); connecting should not.
PROVIDER_TIMEOUT = httpx.Timeout(180.0, connect=10.0)


def credential_env_names(providers: list[str], *, refine: bool) -> list[str]:
    """The environment variables holding the credentials of these accounts."""
    accounts = [*providers, *(["ailab"] if refine else [])]
    return [env for name in accounts for env in API_KEY_ENV[name]]


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
    return Lane(client=client, max_in_flight=in_flight, requests_per_second=requests_per_second)


def open_stager(stack: AsyncExitStack, lake: Lake, lane: Lane) -> InputStager | None:
    """For providers that take image URLs only; raises ``ValueError`` if none can be given."""
    if not lane.client.capabilities.needs_urls:
        return None
    stager = InputStager(lake, provider_base_url=lane.client.base_url)
    stack.callback(stager.close)
    return stager


class ChunkSettings(BaseModel):
    """What a chunk needs to rebuild its run's context in another process. Plain data: it
    travels as a task parameter (never credentials: those come from the worker's environment
    or Prefect Secret blocks)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lake: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    max_in_flight: int = Field(ge=1, description="This chunk's share of the run's slots.")
    requests_per_second: float | None = Field(default=None, gt=0)
    refine: bool = False
    refine_max_in_flight: int = Field(default=1, ge=1)
    refine_requests_per_second: float | None = Field(default=None, gt=0)
    refine_gender: Literal["woman", "man"] | None = None
    max_attempts: int = Field(default=4, ge=1)
    fetch_allow: list[str] = Field(default_factory=list)  # BatchParams.fetch_allow, checked
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    # A run-fatal error another chunk already hit: this chunk records its rows as not
    # attempted instead of calling the provider again.
    fatal: dict[str, Any] | None = None
    refine_fatal: dict[str, Any] | None = None


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
    await load_secret_blocks(credential_env_names([provider], refine=settings.refine))
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
        yield RunContext(
            run_id=run_id,
            lane=lane,
            refine=refine,
            default_gender=settings.refine_gender,
            stager=open_stager(stack, lake, lane),
            http=await stack.enter_async_context(
                inputs_client_for(settings.fetch_allow, timeout_s=settings.fetch_timeout_s)
            ),
            lake=lake,
            images=PreparedImageCache(),
            retry=RetryPolicy(max_attempts=settings.max_attempts),
            storage_options=settings.storage_options,
            ledger=WorkLedger(lake, run_id),
        )


def split_slots(total: int, parts: int) -> list[int]:
    """``total`` slots as ``parts`` near-equal shares, none empty (``parts <= total``)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]
