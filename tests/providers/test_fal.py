"""Contract tests: the fal queue client (FASHN v1.6 as ``fal``, Kling Kolors as ``fal_kolors``)
against the emulator's fal routes (no mocks), in-process on the fake clock; and its spec as
the entry points register it. Expiry, timeouts, refused connections and missing keys:
test_every_provider.py."""

from __future__ import annotations

import io
import json
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from emulator import EmulatorConfig, FaultPlan
from emulator.fal import EMULATED as FAL_EMULATED
from providers.base import JobState, TryOnRequest
from providers.fal import KOLORS_SPEC, SPEC
from providers.fal.client import (
    FalClient,
    FalKolorsClient,
    parse_result_response,
    parse_submit_response,
)
from providers.fal.settings import FASHN, KOLORS
from schemas.results import ErrorKind
from tests.contract import CONTRACT_CONFIG, Emulated, Emulators, ImageHost
from tests.images import garment_jpeg, garment_request, person_jpeg, prepared
from tests.providers.sites import Fal, assert_secret_kept, expect_error, plugin_served

REPO = Path(__file__).resolve().parents[2]
SUBMIT = f"POST /{FASHN.model_id}"
STATUS = f"GET /{FASHN.app_id}/requests/{{request_id}}/status"
RESULT = f"GET /{FASHN.app_id}/requests/{{request_id}}"
SECRET = "fal-live-7c1d9e3a5b"  # distinctive, so any leak is found by substring


@pytest.fixture(scope="module", autouse=True)
def _fal_served() -> Iterator[None]:
    """The emulators of this module serve fal (registered by entry points only)."""
    with plugin_served(FAL_EMULATED):
        yield


@pytest.fixture
def emulator(emulators: Emulators) -> Emulated:
    """Jobs that take half a (fake) second: two or three polls each."""
    quick = FaultPlan(job_queued_s=0.2, job_running_s=0.3)
    return emulators.start(CONTRACT_CONFIG.model_copy(update={"faults": {"fal": quick}}))


@pytest.fixture
def fal(http: httpx.AsyncClient, emulator: Emulated, clock: Any, image_host: ImageHost) -> Fal:
    return Fal(http, emulator, clock, image_host)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def jpeg(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 130, 140)).save(out, "JPEG")
    return out.getvalue()


# -- the spec, as the entry points register it ------------------------------------------------


def test_entry_points_name_the_specs_and_the_emulator() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    providers = project["entry-points"]["tryon_flows.providers"]
    for name, target in (
        ("fal", "providers.fal:SPEC"),
        ("fal_kolors", "providers.fal:KOLORS_SPEC"),
    ):
        assert providers[name] == target
        module, _, attr = target.partition(":")
        assert getattr(import_module(module), attr).name == name  # registry.discover's rule
    emulated = project["entry-points"]["tryon_flows.emulator"]["fal"]
    module, _, attr = emulated.partition(":")
    assert getattr(import_module(module), attr).name == "fal"


@pytest.mark.parametrize("spec", [SPEC, KOLORS_SPEC], ids=lambda s: s.name)
def test_each_model_is_a_spec_on_one_account(spec: Any) -> None:
    client = spec.client_class()
    assert client.name == spec.name and client.capabilities is spec.capabilities
    assert client.model.profile is spec.profile
    assert spec.account == "fal" and spec.credential_env == ("FAL_KEY",)
    assert spec.default_base_url == "https://queue.fal.run"
    assert spec.requests_per_second == 10.0 and not spec.bills_failed_jobs
    assert spec.credits_per_call is None  # no documented balance endpoint: no balance check
    assert spec.capabilities.async_jobs and not spec.capabilities.prompt


def test_prices_are_the_published_ones_or_unknown() -> None:
    assert SPEC.price is not None and str(SPEC.price.amount) == "0.075"
    assert SPEC.price.currency == "USD" and "fashn/tryon/v1.6" in SPEC.price.source
    assert KOLORS_SPEC.price is None  # not found published: unknown, never 0


def test_from_env_reads_the_accounts_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAL_KEY", SECRET)
    monkeypatch.setenv("TRYON_FAL_BASE_URL", "http://proxy.example/")
    for spec in (SPEC, KOLORS_SPEC):
        client = spec.make_client(http=httpx.AsyncClient())
        assert client.base_url == "http://proxy.example"  # both models: the one queue
        assert SECRET not in repr(client) and SECRET not in str(vars(client))


# -- a try-on, end to end on the wire ---------------------------------------------------------


@pytest.mark.parametrize(
    ("category", "sent"),
    [("upper_body", "tops"), ("lower_body", "bottoms"), ("dresses", "one-pieces")],
)
async def test_fashn_try_on_queues_polls_and_fetches_the_result(
    fal: Fal, person: bytes, garment: bytes, category: str, sent: str
) -> None:
    client = fal.client()
    assert client.build_input(garment_request(person, garment, category))["category"] == sent
    result = await client.try_on(garment_request(person, garment, category))
    assert result.result_url and result.request_id
    assert decoded(await client.download(result.result_url)).size[0] > 100
    stats = await fal.control.stats()
    assert stats.requests[SUBMIT] == 1 and stats.requests[RESULT] == 1
    assert stats.requests[STATUS] >= 2  # queued, then completed at least
    assert (await fal.provider_stats()).succeeded == stats.requests[SUBMIT] + stats.requests[
        STATUS
    ] + stats.requests[RESULT]


async def test_kolors_takes_no_category_and_answers_one_image(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    client = fal.kolors()
    body = client.build_input(garment_request(person, garment, "dresses"))
    assert set(body) == {"human_image_url", "garment_image_url"}
    assert body["human_image_url"].startswith("data:image/jpeg;base64,")
    result = await client.try_on(garment_request(person, garment, "dresses"))
    assert result.result_url and decoded(await client.download(result.result_url))
    assert (await fal.control.stats()).requests[f"POST /{KOLORS.model_id}"] == 1


async def test_rows_the_models_cannot_take_are_refused_before_any_call(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    client = fal.client()
    prompt = TryOnRequest(row_id="p", person=prepared(person), prompt="a red shirt")
    pair = garment_request(person, garment, lower_garment=prepared(garment))
    for request in (prompt, pair, garment_request(person, garment, None)):
        error = await expect_error(client.try_on(request))
        assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST")
    assert await fal.control.posts() == 0


# -- the job lifecycle ------------------------------------------------------------------------


async def test_the_queue_reports_position_progress_and_completion(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    client = fal.client()
    first = await client.submit(garment_request(person, garment))
    second = await client.submit(garment_request(person, garment, "dresses"))
    raw = await fal.raw("GET", f"/{FASHN.app_id}/requests/{second}/status")
    assert raw.status_code == 200
    assert raw.json()["status"] == "IN_QUEUE" and raw.json()["queue_position"] == 1
    assert (await client.poll(first)).state is JobState.QUEUED
    await fal.sleep(0.25)
    assert (await client.poll(first)).state is JobState.RUNNING
    await fal.sleep(0.3)
    done = await client.poll(first)
    assert done.state is JobState.SUCCEEDED and done.result and done.result.request_id == first
    # The status lives under the app id only, not the model's full path.
    wrong = await fal.raw("GET", f"/{FASHN.model_id}/requests/{first}/status")
    assert wrong.status_code in (404, 405)


async def test_an_unknown_or_other_models_request_is_a_failed_job(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    request_id = await fal.client().submit(garment_request(person, garment))
    for client, job in ((fal.client(), "no-such-request"), (fal.kolors(), request_id)):
        status = await client.poll(job)
        assert status.state is JobState.FAILED and status.error is not None
        assert (status.error.kind, status.error.code) == (ErrorKind.PERMANENT, "REQUEST_NOT_FOUND")


async def test_a_moderated_request_fails_its_row_and_is_not_billed(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    await fal.faults(credits=1, forced_codes=["job:content_policy_violation"])
    client = fal.client()
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "CONTENT_POLICY_VIOLATION")
    assert error.http_status == 422 and error.request_id
    # Its credit came back: the one credit left pays for the next request.
    assert (await client.try_on(garment_request(person, garment))).result_url
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "INSUFFICIENT_CREDITS")
    assert "Exhausted balance" in error.message


async def test_a_runner_failure_is_a_transient_failed_job(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    await fal.faults(forced_codes=["job:runner_server_error"])
    error = await expect_error(fal.client().try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "RUNNER_SERVER_ERROR")
    assert error.http_status == 500


async def test_inputs_outside_the_models_limits_fail_as_the_runner_says(
    fal: Fal, garment: bytes
) -> None:
    small = person_jpeg(size=(280, 420))  # >= FASHN's 256, < Kolors' 300
    assert (await fal.client().try_on(garment_request(small, garment))).result_url
    error = await expect_error(fal.kolors().try_on(garment_request(small, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "IMAGE_TOO_SMALL")
    broken = TryOnRequest(
        row_id="b",
        person=prepared(b"\xff\xd8 not a jpeg"),
        garment=prepared(garment),
        category="upper_body",
    )
    error = await expect_error(fal.client().try_on(broken))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "IMAGE_LOAD_ERROR")


async def test_a_bad_output_is_handed_out_as_the_fault_plan_says(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    await fal.faults(bad_outputs=["blank"])
    client = fal.client()
    result = await client.try_on(garment_request(person, garment))
    low, high = decoded(await client.download(str(result.result_url))).convert("L").getextrema()
    assert high - low < 8
    assert (await fal.provider_stats()).bad_outputs == {"blank": 1}


# -- account, rate and gateway errors ---------------------------------------------------------


async def test_a_refused_key_stops_the_run_and_never_leaks(
    emulators: Emulators,
    http: httpx.AsyncClient,
    clock: Any,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    loud = emulators.start(CONTRACT_CONFIG.model_copy(update={"echo_credentials": True}))
    on = Fal(http, loud, clock, image_host)
    client = on.client(api_key=SecretStr(SECRET))
    errors = [await expect_error(client.try_on(garment_request(person, garment)))]
    errors.append(await expect_error(client.poll("some-id")))
    for error in errors:
        assert (error.kind, error.code) == (ErrorKind.FATAL, "UNAUTHORIZED")
    assert_secret_kept(SECRET, errors, [client])
    bearer = await on.raw(
        "POST", f"/{FASHN.model_id}", body={}, authorization=f"Bearer {on.key.get_secret_value()}"
    )
    assert bearer.status_code == 401  # fal's scheme is Key


async def test_submissions_beyond_ten_a_second_are_rate_limited(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    client = fal.client()
    for _ in range(10):
        await client.submit(garment_request(person, garment))
    error = await expect_error(client.submit(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "RATE_LIMITED")
    await fal.sleep(1.0)
    assert await client.submit(garment_request(person, garment))


@pytest.mark.parametrize(
    ("forced", "kind", "code"),
    [
        (403, ErrorKind.FATAL, "INSUFFICIENT_CREDITS"),
        (422, ErrorKind.PERMANENT, "INVALID_INPUT"),
        (429, ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (503, ErrorKind.TRANSIENT, "RUNNER_SCHEDULING_FAILURE"),
        (504, ErrorKind.TRANSIENT, "REQUEST_TIMEOUT"),
    ],
)
async def test_submit_answers_are_classified(
    fal: Fal, person: bytes, garment: bytes, forced: int, kind: ErrorKind, code: str
) -> None:
    await fal.faults(forced_codes=[forced])
    error = await expect_error(fal.client().submit(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (kind, code, forced)


async def test_gateway_faults_during_polling_are_asked_again(
    fal: Fal, person: bytes, garment: bytes
) -> None:
    client = fal.client()
    request_id = await client.submit(garment_request(person, garment))
    await fal.faults(error_rate_5xx=1.0)
    error = await expect_error(client.poll(request_id))
    assert error.kind is ErrorKind.TRANSIENT  # wait_for_job polls again
    await fal.faults(error_rate_5xx=0.0)
    assert (await client.wait(request_id)).result_url


# -- parsing answers made by hand -------------------------------------------------------------


def test_results_in_either_shape_and_errors_by_header() -> None:
    for body in (
        {"images": [{"url": "https://v3.fal.media/a.png"}]},
        {"image": {"url": "https://v3.fal.media/a.png"}},
    ):
        done = parse_result_response(200, {}, json.dumps(body).encode(), request_id="r")
        assert done.state is JobState.SUCCEEDED and done.result
        assert done.result.result_url == "https://v3.fal.media/a.png"
    failed = parse_result_response(
        503,
        {"X-Fal-Error-Type": "runner_disconnected"},
        b"upstream gone",
        request_id="r",
        failed=True,
    )
    assert failed.state is JobState.FAILED and failed.error
    assert (failed.error.kind, failed.error.code) == (ErrorKind.TRANSIENT, "RUNNER_DISCONNECTED")
    with pytest.raises(Exception) as blip:  # not failed: the result endpoint's own blip
        parse_result_response(502, {}, b"<html>", request_id="r")
    assert blip.value.kind is ErrorKind.TRANSIENT  # type: ignore[attr-defined]


def test_a_locked_account_and_an_unknown_model_stop_the_run() -> None:
    locked = json.dumps({"detail": "User is locked. Reason: Admin lock."}).encode()
    with pytest.raises(Exception) as error:
        parse_submit_response(403, {}, locked)
    assert (error.value.kind, error.value.code) == (ErrorKind.FATAL, "FORBIDDEN")  # type: ignore[attr-defined]
    with pytest.raises(Exception) as error:
        parse_submit_response(404, {}, b'{"detail": "Application not found"}')
    assert (error.value.kind, error.value.code) == (ErrorKind.FATAL, "UNKNOWN_MODEL")  # type: ignore[attr-defined]


def test_clients_are_one_class_per_model() -> None:
    assert issubclass(FalKolorsClient, FalClient)
    assert (FalClient.model, FalKolorsClient.model) == (FASHN, KOLORS)
    assert FASHN.app_id == "fal-ai/fashn" and KOLORS.app_id == "fal-ai/kling"
    assert garment_jpeg() and EmulatorConfig()  # shared helpers stay importable
