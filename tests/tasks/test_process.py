"""The row pipeline's retry semantics, against the emulator over loopback (no Prefect)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from emulator.keys import accepted_key
from emulator.server import EmulatorConfig, EmulatorServer
from providers.changeclothes.client import ChangeClothesClient
from schemas.manifest import ManifestRow
from schemas.results import Status
from tasks.images import PreparedImageCache
from tasks.lake import Lake
from tasks.process import Lane, RetryPolicy, RunContext, process_rows

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "images"


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer.start(EmulatorConfig())
    yield server
    server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def faults(emulator: EmulatorServer, **plan: object) -> None:
    emulator.control.reset(faults=True)
    emulator.control.set_faults("changeclothes", **plan)


def context(
    emulator: EmulatorServer, http: httpx.AsyncClient, tmp_path: Path, *, retry: RetryPolicy
) -> RunContext:
    client = ChangeClothesClient(
        http=http,
        api_key=SecretStr(accepted_key("CHANGECLOTHES_API_KEY")),
        base_url=emulator.base_url,
    )
    return RunContext(
        run_id="run-1",
        lane=Lane(client=client, max_in_flight=4),
        http=http,
        lake=Lake.open(str(tmp_path)),
        images=PreparedImageCache(),
        retry=retry,
    )


def rows(n: int) -> list[ManifestRow]:
    return [
        ManifestRow(
            row_index=i,
            id=f"r{i}",
            person_image=str(SAMPLE / "person_ana.jpg"),
            garment_image=str(SAMPLE / "garment_red_tee.jpg"),
            category="upper_body",
        )
        for i in range(n)
    ]


async def test_429_retry_after_is_waited_out(
    emulator: EmulatorServer, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    # Every other call is refused with 429 and Retry-After: 1. Our own backoff would wait at
    # most base_delay (0.05 s) before the first retry: a row retried after a 429 that took
    # over a second waited for the server, not for us.
    faults(emulator, error_rate_429=0.5, retry_after_s=1)
    ctx = context(emulator, http, tmp_path, retry=RetryPolicy(max_attempts=6, base_delay_s=0.05))
    records = await process_rows(rows(8), ctx)
    assert all(r.status is Status.SUCCEEDED for r in records)
    retried = [r for r in records if r.attempts > 1]
    assert retried, "the fault plan should have refused some calls"
    assert all(r.provider_ms is not None and r.provider_ms >= 1000 for r in retried)
    assert all(
        r.provider_ms is not None and r.provider_ms < 1000 for r in records if r.attempts == 1
    )
    stats = emulator.control.stats().provider("changeclothes")
    assert stats.errors.get("429", 0) == sum(r.attempts - 1 for r in records)


async def test_attempt_budget_is_spent_then_recorded(
    emulator: EmulatorServer, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    faults(emulator, error_rate_5xx=1.0)
    ctx = context(emulator, http, tmp_path, retry=RetryPolicy(max_attempts=3, base_delay_s=0.01))
    [record] = await process_rows(rows(1), ctx)
    assert record.status is Status.FAILED
    assert record.error_kind == "transient" and record.attempts == 3
    requests = emulator.control.stats().requests
    assert requests["POST /api/openapi/change-clothes-ai"] == 3


def test_backoff_is_exponential_jittered_bounded_and_yields_to_retry_after() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=4.0)
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 4.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.7  # full jitter spreads over the whole window
    assert policy.delay(1, retry_after=3.0) == 3.0  # the server's word wins when longer
    assert policy.delay(1, retry_after=60.0) == 16.0  # but a run never sleeps unbounded


async def test_progress_counts_a_row_once_its_refine_is_over(
    emulator: EmulatorServer, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A row is done for progress bars only when its last stage is: with a refiner that
    rejects the key, every row is reported once, as its unsuccessful refine, not its coarse
    success."""
    from providers.ailab.client import AILabRefinerClient
    from schemas.results import Stage

    faults(emulator)
    ctx = context(emulator, http, tmp_path, retry=RetryPolicy(max_attempts=1))
    refiner = AILabRefinerClient(
        http=http, api_key=SecretStr("not-a-key"), base_url=emulator.base_url
    )
    ctx.refine = Lane(client=refiner, max_in_flight=2)
    ctx.default_gender = "woman"
    reported: list[tuple[str, str, str]] = []

    class Sink:
        def started(self, total: int) -> None: ...

        def row_done(self, record: object) -> None:
            reported.append((record.row_id, str(record.stage), str(record.status)))  # type: ignore[attr-defined]

    ctx.progress = Sink()
    records = await process_rows(rows(3), ctx)
    coarse = [r for r in records if r.stage == Stage.TRYON]
    assert [r.status for r in coarse] == [Status.SUCCEEDED] * 3
    # Once per row, as its refine; the bad key is fatal for the refiner, so rows whose refine
    # had not started by then skip it.
    assert sorted(row_id for row_id, _, _ in reported) == ["r0", "r1", "r2"]
    assert {stage for _, stage, _ in reported} == {"refine"}
    assert "failed" in {status for _, _, status in reported}
    assert {status for _, _, status in reported} <= {"failed", "skipped"}
