"""The contract every provider's client keeps, whatever its vendor, checked on each: expired
result URLs, timeouts, refused connections and missing keys are classified alike.

In-process (tests/contract.py) but for ``test_timeout_is_transient``, on loopback: the
in-process transport ignores client timeouts. Refused connections go to a closed loopback port.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from emulator import EmulatorConfig, FaultPlan
from providers.ailab.client import AILabRefinerClient, AILabTryOnClient
from providers.base import AsyncJobClient, JobState, ProviderError
from providers.changeclothes.client import ChangeClothesClient
from providers.fal.client import FalClient, FalKolorsClient
from providers.fashn.client import FashnClient
from providers.hidream.client import HiDreamClient
from providers.tencent.client import TencentClient
from schemas.results import ErrorKind
from tests.contract import Emulated, Emulators, ImageHost
from tests.providers.sites import (
    expect_error,
    free_port,
    plugins_installed,
    site,
    standard_request,
)

PROVIDERS = ["changeclothes", "ailab", "hidream", "tencent", "fashn", "fal"]


@pytest.fixture(autouse=True, scope="module")
def _plugins() -> Iterator[None]:
    """The providers shipped as plugins (entry points only), registered as if installed."""
    with plugins_installed():
        yield


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_expired_result_url_is_permanent(
    provider: str, emulators: Emulators, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    quick_jobs = FaultPlan(job_queued_s=0.02, job_running_s=0.02)
    config = EmulatorConfig(result_ttl_s=0.3, faults={provider: quick_jobs})
    on = site(provider, emulators.http, emulators.start(config), emulators.clock, image_host)
    client: Any = on.client()
    result = await client.try_on(standard_request(on, person, garment))
    assert result.result_url is not None
    assert await client.download(result.result_url)  # fresh: still there
    await on.sleep(0.5)
    error = await expect_error(client.download(result.result_url))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "HTTP_404")
    if isinstance(client, AILabTryOnClient):
        # The task itself is forgotten too, as the vendor drops results after 24 h.
        assert (await client.poll(str(result.request_id))).state is JobState.FAILED


@pytest.mark.parametrize(
    ("provider", "fault"),
    [
        *(pytest.param(p, {"latency_s": 5.0}, id=f"{p}-latency") for p in PROVIDERS),
        pytest.param("hidream", {"timeout_rate": 1.0, "timeout_s": 5.0}, id="hidream-hang"),
    ],
)
async def test_timeout_is_transient(
    provider: str,
    fault: dict[str, Any],
    http: httpx.AsyncClient,
    loopback: Emulated,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    on = site(provider, http, loopback, None, image_host)
    await on.faults(**fault)
    client: Any = on.client(timeout=0.3)
    request = standard_request(on, person, garment)
    error = await expect_error(client.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "TIMEOUT")
    await on.control.wait_idle(provider)  # the hung-up call gave its slot back
    await on.faults(latency_s=0.0, timeout_rate=0.0, job_queued_s=0.0, job_running_s=0.0)
    # (With the default timeout: rendering alone may take 0.3 s on a busy machine.)
    assert (await on.client().try_on(request)).result_url


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_connection_refused_is_transient(
    provider: str,
    http: httpx.AsyncClient,
    emulator: Emulated,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    on = site(provider, http, emulator, None, image_host)
    client: Any = on.client(base_url=f"http://127.0.0.1:{free_port()}")
    calls = [client.try_on(standard_request(on, person, garment))]
    if isinstance(client, AsyncJobClient):
        calls.append(client.poll("t-1"))
    for call in calls:
        error = await expect_error(call)
        assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "CONNECTION_ERROR")


@pytest.mark.parametrize(
    ("client_class", "variable"),
    [
        (ChangeClothesClient, "CHANGECLOTHES_API_KEY"),
        (HiDreamClient, "HIDREAM_API_KEY"),
        (AILabTryOnClient, "AILAB_API_KEY"),
        (AILabRefinerClient, "AILAB_API_KEY"),
        (FashnClient, "FASHN_API_KEY"),
        (FalClient, "FAL_KEY"),
        (FalKolorsClient, "FAL_KEY"),
    ],
)
def test_from_env_requires_the_key(
    client_class: Any, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ProviderError) as error:
        client_class.from_env(http=httpx.AsyncClient())
    assert (error.value.kind, error.value.code) == (ErrorKind.FATAL, "MISSING_API_KEY")
    assert variable in str(error.value)


EMPTY_KEY: dict[str, Any] = {
    "changeclothes": lambda http: ChangeClothesClient(
        http=http, api_key=SecretStr(""), base_url="http://x"
    ),
    "ailab": lambda http: AILabTryOnClient(http=http, api_key=SecretStr(""), base_url="http://x"),
    "hidream": lambda http: HiDreamClient(http=http, api_key=SecretStr(""), base_url="http://x"),
    "fashn": lambda http: FashnClient(http=http, api_key=SecretStr(""), base_url="http://x"),
    "fal": lambda http: FalClient(http=http, api_key=SecretStr(""), base_url="http://x"),
    "tencent": lambda http: TencentClient(
        http=http, secret_id=SecretStr("AKIDx"), secret_key=SecretStr(""), base_url="http://x"
    ),
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_empty_key_is_rejected(provider: str) -> None:
    with pytest.raises(ProviderError) as error:
        EMPTY_KEY[provider](httpx.AsyncClient())
    assert (error.value.kind, error.value.code) == (ErrorKind.FATAL, "MISSING_API_KEY")
