"""Provider limits across runs and workers: Prefect global concurrency limits, leased per run.

Every provider account has a global concurrency limit ``tryon-<provider>`` on the Prefect
server (the refiner's: ``tryon-ailab-refiner``), created at the first run with the provider's
default, then the operator's to change in the UI or with ``global_max_in_flight``. A run leases
its ``max_in_flight`` slots once, for as long as it calls that provider, and enforces them
locally with a semaphore: one server round trip per run and provider, none per request (a
per-request acquire would cost the throughput of fast providers). Runs and workers therefore
share the account: the sum of leases never exceeds the limit; a run that finds no free slots
waits for them.

A run killed outright (``kill -9``, a lost machine) cannot hand its slots back. The server's
repossessor takes them back once the lease expires, but only ``prefect server start`` runs
one, and only after the lease's duration. So each lease is also noted in a file under
``PREFECT_HOME`` with the process holding it; before leasing, and while waiting for slots, a
run releases the leases whose process on this machine is gone. That needs no repossessor and
no wait, and is what frees a killed run's slots on the CLI's local server (whose leases live
in files too, and so survive its restarts: see ``flows.local_server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import httpx
import psutil
from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

PREFIX = "tryon-"
# The server refuses leases under 60 s.
LEASE_DURATION_S = max(60.0, float(os.environ.get("TRYON_LEASE_DURATION_S", "120")))
# A lease is renewed well before it would expire, so one failed renewal can be retried.
RENEW_EVERY_S = LEASE_DURATION_S / 4
# After this long without slots, say why the run waits (it then goes on waiting).
WAIT_WARNING_S = 20.0
# While waiting, look for holders that died this often (the server's Retry-After may be longer).
RECLAIM_EVERY_S = 5.0
_HTTP_LOCKED = 423
# A SQLite-backed server answers a lease request that lost a write race with 503 ("database is
# locked"); Prefect's client would wait 2 s, then 4 s. The race is over in milliseconds.
_HTTP_UNAVAILABLE = 503
_UNAVAILABLE_RETRIES_S = (0.05, 0.1, 0.2, 0.4, 0.8)
_HTTP_GONE = (404, 410)

logger = get_logger("tryon.limits")


def global_limit_name(provider: str) -> str:
    """``tryon-<provider>``, with dashes for underscores as in every Prefect name we make (the
    refiner, ``ailab_refiner``: ``tryon-ailab-refiner``)."""
    return PREFIX + provider.replace("_", "-")


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


# ------------------------------------------------------------------------------ holder notes


@dataclass(frozen=True, slots=True)
class HolderNote:
    """Who holds a lease: enough to tell, later, that the holder is gone."""

    lease_id: str
    limit: str
    slots: int
    host: str
    pid: int
    # The process's start time tells a reused pid from the holder.
    pid_started: float

    def holder_is_gone(self) -> bool:
        if self.host != socket.gethostname():
            return False  # another machine's process: its server's repossessor decides
        try:
            started = psutil.Process(self.pid).create_time()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return True
        except psutil.Error:
            return False
        return abs(started - self.pid_started) > 1.0


def holder_notes_dir() -> Path:
    return Path(get_current_settings().home) / "tryon-leases"


def _this_process_started() -> float:
    return psutil.Process(os.getpid()).create_time()


def write_note(lease_id: UUID, limit: str, slots: int) -> Path:
    note = HolderNote(
        lease_id=str(lease_id),
        limit=limit,
        slots=slots,
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_started=_this_process_started(),
    )
    folder = holder_notes_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{lease_id}.json"
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(asdict(note)))
    staged.replace(path)
    return path


def read_notes() -> list[tuple[Path, HolderNote]]:
    found: list[tuple[Path, HolderNote]] = []
    folder = holder_notes_dir()
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            found.append((path, HolderNote(**data)))
        except (OSError, ValueError, TypeError):
            # Unreadable notes are not ours to act on; a stale one is harmless.
            continue
    return found


async def release_leases_of_gone_holders(client: PrefectClient) -> int:
    """Release every noted lease whose holder process on this machine is gone; returns how
    many slots came back (as noted: a lease the server already dropped frees nothing)."""
    freed = 0
    for path, note in read_notes():
        if not note.holder_is_gone():
            continue
        try:
            # Releasing a lease the server no longer has is a no-op, never a double release.
            await client.release_concurrency_slots_with_lease(UUID(note.lease_id))
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning(
                "could not release the lease of a stopped run on %s (%s); trying again later",
                note.limit,
                type(exc).__name__,
            )
            continue
        path.unlink(missing_ok=True)
        freed += note.slots
        logger.info(
            "released %d slot(s) of %s held by a run that no longer exists (pid %d)",
            note.slots,
            note.limit,
            note.pid,
        )
    return freed


# ------------------------------------------------------------------------------------ leases


def _holder() -> ConcurrencyLeaseHolder | None:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id)


async def _acquire(client: PrefectClient, name: str, slots: int, limit: int) -> UUID:
    """Wait for ``slots`` of ``name`` and lease them; the lease's id."""
    started = time.monotonic()
    warned = False
    last_reclaim = started
    while True:
        try:
            response = await _increment_with_lease(client, name, slots)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != _HTTP_LOCKED:
                raise
            retry_after = float(exc.response.headers.get("Retry-After", "1"))
        else:
            body = response.json()
            if not body.get("limits"):
                raise RuntimeError(f"the global concurrency limit {name} does not exist")
            return UUID(body["lease_id"])
        waited = time.monotonic() - started
        if not warned and waited >= WAIT_WARNING_S:
            warned = True
            logger.warning(
                "waiting for %d slot(s) of the global limit %s (limit %d): other runs hold "
                "them. Slots of a run that was killed come back when the next run on its "
                "machine starts, or when its lease expires (%.0f s) on a `prefect server`",
                slots,
                name,
                limit,
                LEASE_DURATION_S,
            )
        if time.monotonic() - last_reclaim >= RECLAIM_EVERY_S:
            last_reclaim = time.monotonic()
            if await release_leases_of_gone_holders(client):
                continue
        await asyncio.sleep(min(max(retry_after, 0.1), RECLAIM_EVERY_S))


async def _increment_with_lease(client: PrefectClient, name: str, slots: int) -> httpx.Response:
    """The lease request; a 503 is asked again within milliseconds a few times, then with
    Prefect's own retries."""

    async def ask() -> httpx.Response:
        return await client.increment_concurrency_slots_with_lease(
            names=[name],
            slots=slots,
            mode="concurrency",
            lease_duration=LEASE_DURATION_S,
            holder=_holder(),
        )

    for pause in _UNAVAILABLE_RETRIES_S:
        try:
            with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
                return await ask()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != _HTTP_UNAVAILABLE:
                raise
        await asyncio.sleep(pause)
    return await ask()


async def _renew(client: PrefectClient, lease_id: UUID, name: str) -> None:
    while True:
        await asyncio.sleep(RENEW_EVERY_S)
        try:
            await client.renew_concurrency_lease(lease_id, lease_duration=LEASE_DURATION_S)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in _HTTP_GONE:
                logger.error(
                    "the lease on %s was taken back by the server: this run's calls are no "
                    "longer counted against the global limit",
                    name,
                )
                return
            logger.warning(
                "renewing the lease on %s failed (HTTP %d)", name, exc.response.status_code
            )
        except httpx.HTTPError as exc:
            logger.warning("renewing the lease on %s failed (%s)", name, type(exc).__name__)


@asynccontextmanager
async def leased_slots(
    provider: str, *, wanted: int, default_limit: int, override: int | None = None
) -> AsyncIterator[int]:
    """Hold up to ``wanted`` slots of the provider's global limit; yields how many are held."""
    limit = await ensure_global_limit(provider, default=default_limit, override=override)
    slots = max(1, min(wanted, limit))  # never ask for more than exists: that would wait forever
    name = global_limit_name(provider)
    async with get_client() as client:
        await release_leases_of_gone_holders(client)
        lease_id = await _acquire(client, name, slots, limit)
        note: Path | None = None
        renewal: asyncio.Task[None] | None = None
        try:
            note = write_note(lease_id, name, slots)
            renewal = asyncio.create_task(_renew(client, lease_id, name))
            yield slots
        finally:
            # Handed back even when the run is being cancelled (Ctrl-C).
            with anyio.CancelScope(shield=True):
                if renewal is not None:
                    renewal.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await renewal
                try:
                    await client.release_concurrency_slots_with_lease(lease_id)
                except httpx.HTTPError as exc:
                    logger.warning(
                        "could not release the lease on %s (%s): its slots come back when it "
                        "expires or the next run here starts",
                        name,
                        type(exc).__name__,
                    )
                    note = None  # keep the note: the next run here releases the lease
            if note is not None:
                note.unlink(missing_ok=True)
