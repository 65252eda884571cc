"""Contract tests: the FASHN client against its emulator routes (no mocks), in-process on the
fake clock (tests/contract.py). FASHN is registered by entry points only; the tests register
it in this process as its installed entry points would (``tests.providers.sites.installed``).
Timeouts, refused connections, expired URLs and missing keys: test_every_provider.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from emulator import fashn as emulated
from providers.base import JobState, TryOnRequest
from providers.fashn import SPEC
from providers.fashn.client import (
    FashnClient,
    parse_credits_response,
    parse_run_response,
    parse_status_response,
)
from providers.fashn.settings import (
    CREDITS_PATH,
    MODEL_ENV,
    PROFILE,
    RUN_PATH,
    STATUS_PATH,
)
from schemas.results import ErrorKind
from tests.contract import Emulators, ImageHost, site_fixture
from tests.images import garment_jpeg, garment_request, person_jpeg, prepared
from tests.providers.sites import Fa, assert_secret_kept, expect_error, installed

FA = "fashn"
RUN = f"POST {RUN_PATH}"


@pytest.fixture(autouse=True, scope="module")
def _installed() -> Iterator[None]:
    with installed(FA):
        yield


fa = site_fixture(Fa, "fa")


async def quick(fa: Fa, **fields: Any) -> None:
    await fa.faults(job_queued_s=0.2, job_running_s=0.4, **fields)


def run_body(person: bytes, garment: bytes, **inputs: Any) -> dict[str, Any]:
    def uri(data: bytes) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(data).decode()

    return {
        "model_name": "tryon-v1.6",
        "inputs": {"model_image": uri(person), "garment_image": uri(garment), **inputs},
    }


# -- the happy path, the request it sends -------------------------------------------------------


async def test_a_try_on_runs_to_a_downloadable_result(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    await quick(fa)
    client = fa.client()
    result = await client.try_on(garment_request(person, garment))
    assert result.result_url and result.request_id
    assert (await client.download(result.result_url))[:4] == b"RIFF"  # the emulator's WEBP
    stats = await fa.provider_stats()
    assert stats.errors == {} and stats.succeeded >= 2  # the run and the polls


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("upper_body", "tops"), ("lower_body", "bottoms"), ("dresses", "one-pieces")],
)
def test_the_body_names_the_model_and_fashn_s_category(
    ours: str, theirs: str, person: bytes, garment: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MODEL_ENV, raising=False)
    client = FashnClient(http=httpx.AsyncClient(), api_key="k", base_url="http://x")
    body = client.build_body(garment_request(person, garment, ours))
    assert body["model_name"] == "tryon-v1.6"
    inputs = body["inputs"]
    assert inputs["category"] == theirs
    assert inputs["model_image"] == "data:image/jpeg;base64," + base64.b64encode(person).decode()
    assert set(inputs) == {"model_image", "garment_image", "category"}


def test_the_model_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODEL_ENV, "tryon-v1.5")
    monkeypatch.setenv("FASHN_API_KEY", "k")
    client = FashnClient.from_env(http=httpx.AsyncClient())
    assert client.model == "tryon-v1.5" and "tryon-v1.5" in repr(client)
    assert FashnClient(http=httpx.AsyncClient(), api_key="k", base_url="x", model="m").model == "m"


async def test_an_unknown_model_is_a_bad_request(fa: Fa, person: bytes, garment: bytes) -> None:
    client = fa.client(model="tryon-v9")
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.PERMANENT, "BadRequest", 400)
    assert "model_name" in error.message


async def test_shapes_fashn_cannot_take_are_refused_before_sending(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    client = fa.client()
    two = TryOnRequest(
        row_id="r",
        person=prepared(person),
        garment=prepared(garment),
        lower_garment=prepared(garment),
        category="upper_body",
    )
    prompt = TryOnRequest(row_id="r", person=prepared(person), prompt="a coat")
    for request in (two, prompt):
        error = await expect_error(client.try_on(request))
        assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST")
    assert (await fa.provider_stats()).requests == 0


async def test_extra_inputs_go_with_every_prediction_and_base64_outputs_are_read(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    await quick(fa)
    client = fa.client(inputs={"mode": "quality", "return_base64": True, "seed": 42})
    result = await client.try_on(garment_request(person, garment))
    assert result.result_url is None and result.result_data and result.result_data[:4] == b"RIFF"
    with pytest.raises(ValueError, match="category"):
        fa.client(inputs={"category": "auto"})


# -- the emulator's strictness, as a client meets it --------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [(None, "no header"), ("Token abc", "another scheme"), ("Bearer wrong-key", "unknown key")],
)
async def test_auth_is_a_bearer_key_and_anything_else_is_401(
    fa: Fa, authorization: str | None, detail: str
) -> None:
    response = await fa.raw("POST", RUN_PATH, body={}, authorization=authorization)
    assert response.status_code == 401, detail
    assert response.json()["error"] == "UnauthorizedAccess"


async def test_a_wrong_key_is_fatal_and_never_shown(
    emulators: Emulators, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    from emulator import EmulatorConfig

    secret = "fa-live-7c1e9a3b5d"
    echoing = emulators.start(EmulatorConfig(echo_credentials=True))
    on = Fa(emulators.http, echoing, emulators.clock, image_host)
    client = on.client(api_key=SecretStr(secret))
    errors = [await expect_error(client.try_on(garment_request(person, garment)))]
    errors.append(await expect_error(client.credits_balance()))
    errors.append(await expect_error(client.poll("p-1")))
    for error in errors:
        assert (error.kind, error.code) == (ErrorKind.FATAL, "UnauthorizedAccess")
    assert_secret_kept(secret, errors, [client])


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": {}}, "model_name"),
        ({"model_name": "tryon-v1.6"}, "inputs"),
        ({"model_name": "tryon-v1.6", "inputs": {"model_image": "x"}}, "garment_image"),
        ("category", "category"),
        ("mode", "mode"),
        ("unknown", "unknown inputs"),
        ("seed", "seed"),
        ("samples", "num_samples"),
        ("top", "top-level"),
    ],
)
async def test_fields_are_checked(
    fa: Fa, person: bytes, garment: bytes, body: Any, says: str
) -> None:
    changes = {
        "category": {"category": "upper_body"},  # ours, not FASHN's
        "mode": {"mode": "fast"},
        "unknown": {"garment_description": "a shirt"},
        "seed": {"seed": "42"},
        "samples": {"num_samples": 9},
    }
    if body == "top":
        body = {**run_body(person, garment), "webhook": "http://x"}
    elif isinstance(body, str):
        body = run_body(person, garment, **changes[body])
    response = await fa.raw("POST", RUN_PATH, body=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "BadRequest" and says in response.json()["message"]


async def test_json_only(fa: Fa) -> None:
    response = await fa.raw("POST", RUN_PATH, content=b"model_name=tryon-v1.6")
    assert response.status_code == 400 and "application/json" in response.json()["message"]


async def test_a_prediction_goes_starting_in_queue_processing_completed(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    await fa.faults(job_queued_s=2.0, job_running_s=2.0)
    accepted = await fa.raw("POST", RUN_PATH, body=run_body(person, garment, category="tops"))
    assert accepted.status_code == 200 and accepted.json()["error"] is None
    prediction = accepted.json()["id"]
    seen = []
    for _ in range(5):
        answer = (await fa.raw("GET", STATUS_PATH.format(id=prediction))).json()
        assert answer["id"] == prediction
        seen.append(answer["status"])
        await fa.sleep(1.0)
    assert seen == ["starting", "in_queue", "processing", "processing", "completed"]
    assert answer["output"][0].startswith(fa.base_url + "/files/") and answer["error"] is None
    missing = await fa.raw("GET", STATUS_PATH.format(id="no-such-id"))
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"


async def test_inputs_that_do_not_load_fail_the_prediction(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    """The docs list ImageLoadError among runtime errors: accepted, then failed."""
    await quick(fa)
    client = fa.client()
    raw_base64 = run_body(person, garment)
    raw_base64["inputs"]["model_image"] = base64.b64encode(person).decode()  # no data: prefix
    accepted = await fa.raw("POST", RUN_PATH, body=raw_base64)
    assert accepted.status_code == 200
    await fa.sleep(1.0)
    status = await client.poll(accepted.json()["id"])
    assert status.state is JobState.FAILED and status.error is not None
    assert (status.error.kind, status.error.code) == (ErrorKind.PERMANENT, "ImageLoadError")

    broken = garment_request(b"\xff\xd8\xff\xe0 not a jpeg", garment)
    error = await expect_error(client.try_on(broken))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "ImageLoadError")


async def test_an_input_over_2000_px_fails_and_the_profile_keeps_inputs_within(
    fa: Fa, garment: bytes
) -> None:
    assert PROFILE.max_side == 2000 and SPEC.profile is PROFILE
    await quick(fa)
    big = person_jpeg(size=(1400, 2100))
    error = await expect_error(fa.client().try_on(garment_request(big, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "InputValidationError")
    assert "2000" in error.message


@pytest.mark.parametrize(
    ("forced", "kind"),
    [
        ("failed:PoseError", ErrorKind.PERMANENT),
        ("failed:ContentModerationError", ErrorKind.PERMANENT),
        ("failed:PipelineError", ErrorKind.TRANSIENT),
        ("failed:SomethingNew", ErrorKind.PERMANENT),
    ],
)
async def test_runtime_errors_by_name(
    fa: Fa, person: bytes, garment: bytes, forced: str, kind: ErrorKind
) -> None:
    await quick(fa, forced_codes=[forced])
    error = await expect_error(fa.client().try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (kind, forced.removeprefix("failed:"))
    assert error.request_id  # the prediction id


async def test_run_rate_limit_is_50_per_60_s_with_retry_after(fa: Fa, person: bytes) -> None:
    for _ in range(50):  # bad requests count too: the window is per call
        assert (await fa.raw("POST", RUN_PATH, body={})).status_code == 400
    limited = await fa.raw("POST", RUN_PATH, body={})
    assert limited.status_code == 429 and limited.json()["error"] == "RateLimitExceeded"
    assert int(limited.headers["retry-after"]) == 60
    error = await expect_error(fa.client().submit(garment_request(person, garment_jpeg())))
    assert (error.kind, error.code, error.retry_after) == (
        ErrorKind.TRANSIENT,
        "RateLimitExceeded",
        60.0,
    )
    await fa.sleep(30.0)
    assert (await fa.raw("POST", RUN_PATH, body={})).status_code == 429  # still in the window
    await fa.sleep(30.5)
    assert (await fa.raw("POST", RUN_PATH, body={})).status_code == 400  # the window moved on
    # /status has its own window: 50 per 10 s.
    for _ in range(50):
        assert (await fa.raw("GET", STATUS_PATH.format(id="x"))).status_code == 404
    assert (await fa.raw("GET", STATUS_PATH.format(id="x"))).status_code == 429


async def test_six_predictions_at_once_and_the_seventh_waits(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    await fa.faults(job_queued_s=5.0, job_running_s=5.0)
    client = fa.client()
    ids = [await client.submit(garment_request(person, garment)) for _ in range(6)]
    assert len(set(ids)) == 6 and SPEC.max_in_flight == 6
    error = await expect_error(client.submit(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "ConcurrencyLimitExceeded")
    await fa.sleep(10.5)
    assert await client.submit(garment_request(person, garment))


async def test_credits_are_spent_per_image_and_the_balance_reads_them(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    await quick(fa, credits=3)
    client = fa.client()
    assert await client.credits_balance() == 3
    await client.try_on(garment_request(person, garment))
    assert await client.credits_balance() == 2
    # A failed prediction gives its credit back (settings.BILLS_FAILED_JOBS).
    await fa.faults(forced_codes=["failed:PoseError"])
    await expect_error(client.try_on(garment_request(person, garment)))
    assert await client.credits_balance() == 2
    await client.try_on(garment_request(person, garment))
    await client.try_on(garment_request(person, garment))
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.FATAL, "OutOfCredits", 429)
    assert await client.credits_balance() == 0
    answer = (await fa.raw("GET", CREDITS_PATH)).json()
    assert answer == {"credits": {"total": 0, "subscription": 0, "on_demand": 0}}
    assert SPEC.credits_per_call == 1 and SPEC.account_name == FA


@pytest.mark.parametrize(
    ("fault", "kind", "code"),
    [
        ({"error_rate_5xx": 1.0}, ErrorKind.TRANSIENT, "HTTP_503"),
        ({"error_rate_429": 1.0, "retry_after_s": 7}, ErrorKind.TRANSIENT, "RateLimitExceeded"),
        ({"forced_codes": ["OutOfCredits"]}, ErrorKind.FATAL, "OutOfCredits"),
        ({"forced_codes": ["InternalServerError"]}, ErrorKind.TRANSIENT, "InternalServerError"),
        ({"forced_codes": [502]}, ErrorKind.TRANSIENT, "HTTP_502"),
        (
            {"forced_codes": ["ConcurrencyLimitExceeded"]},
            ErrorKind.TRANSIENT,
            "ConcurrencyLimitExceeded",
        ),
    ],
)
async def test_injected_faults_are_classified(
    fa: Fa, person: bytes, garment: bytes, fault: dict[str, Any], kind: ErrorKind, code: str
) -> None:
    await fa.faults(**fault)
    error = await expect_error(fa.client().submit(garment_request(person, garment)))
    assert (error.kind, error.code) == (kind, code)
    if "retry_after_s" in fault:
        assert error.retry_after == 7.0


async def test_a_failed_status_query_is_asked_again_and_a_forgotten_prediction_is_gone(
    emulators: Emulators, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    from emulator import EmulatorConfig, FaultPlan

    config = EmulatorConfig(result_ttl_s=5.0, faults={FA: FaultPlan(job_queued_s=0.2)})
    on = Fa(emulators.http, emulators.start(config), emulators.clock, image_host)
    client = on.client()
    prediction = await client.submit(garment_request(person, garment))
    await on.faults(forced_codes=[503, 503])  # two status queries hit the proxy's page
    result = await client.wait(prediction)
    assert result.result_url
    await on.sleep(6.0)
    status = await client.poll(prediction)
    assert status.state is JobState.FAILED and status.error is not None
    assert (status.error.kind, status.error.code) == (ErrorKind.PERMANENT, "NotFound")


async def test_bad_outputs_replace_results(fa: Fa, person: bytes, garment: bytes) -> None:
    await quick(fa, bad_outputs=["blank"])
    client = fa.client()
    result = await client.try_on(garment_request(person, garment))
    assert result.result_url
    assert (await fa.provider_stats()).bad_outputs == {"blank": 1}


async def test_async_failures_are_drawn_from_the_plan(
    fa: Fa, person: bytes, garment: bytes
) -> None:
    await quick(fa, async_failure_rate=1.0)
    error = await expect_error(fa.client().try_on(garment_request(person, garment)))
    assert error.code in ("PoseError", "ContentModerationError")
    assert error.kind is ErrorKind.PERMANENT


# -- parsing answers made by hand ----------------------------------------------------------------


def answer(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_run_answers() -> None:
    assert parse_run_response(200, {}, answer({"id": "p1", "error": None})) == "p1"
    for status, body, kind, code in [
        (200, {"error": None}, ErrorKind.PERMANENT, "MALFORMED_RESPONSE"),
        (200, b"<html>", ErrorKind.PERMANENT, "MALFORMED_RESPONSE"),
        (
            401,
            {"error": "UnauthorizedAccess", "message": "x"},
            ErrorKind.FATAL,
            "UnauthorizedAccess",
        ),
        (429, {"error": "OutOfCredits", "message": "x"}, ErrorKind.FATAL, "OutOfCredits"),
        (429, {"error": "RateLimitExceeded"}, ErrorKind.TRANSIENT, "RateLimitExceeded"),
        (429, b"slow down", ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (400, {"error": "BadRequest", "message": "x"}, ErrorKind.PERMANENT, "BadRequest"),
        (418, {"error": "Teapot", "message": "x"}, ErrorKind.PERMANENT, "Teapot"),
        (502, b"<html>bad gateway</html>", ErrorKind.TRANSIENT, "HTTP_502"),
    ]:
        raw = body if isinstance(body, bytes) else answer(body)
        with pytest.raises(Exception) as caught:
            parse_run_response(status, {"Retry-After": "3"}, raw)
        error: Any = caught.value
        assert (error.kind, error.code) == (kind, code), (status, body)
        assert error.retry_after == 3.0


def test_status_answers() -> None:
    def parse(body: Any, status: int = 200) -> Any:
        return parse_status_response(status, {}, answer(body), prediction_id="p1")

    assert parse({"id": "p1", "status": "in_queue"}).state is JobState.QUEUED
    assert parse({"id": "p1", "status": "processing"}).state is JobState.RUNNING
    done = parse({"id": "p1", "status": "completed", "output": ["https://cdn/x.png"]})
    assert done.result.result_url == "https://cdn/x.png"
    bare = parse({"id": "p1", "status": "failed", "error": "PoseError"})
    assert (bare.error.kind, bare.error.code) == (ErrorKind.PERMANENT, "PoseError")
    nameless = parse({"id": "p1", "status": "failed", "error": None})
    assert nameless.error.code == "failed"
    for body, code in [
        ({"id": "p1", "status": "completed", "output": []}, "MALFORMED_RESPONSE"),
        ({"id": "p1", "status": "exploded"}, "UNKNOWN_STATUS"),
        ({"id": "p2", "status": "processing"}, "ID_MISMATCH"),
    ]:
        with pytest.raises(Exception) as caught:
            parse(body)
        assert caught.value.code == code  # type: ignore[attr-defined]


def test_credits_answers() -> None:
    body = {"credits": {"total": 234, "subscription": 100, "on_demand": 134}}
    assert parse_credits_response(200, {}, answer(body)) == 234  # the docs' example
    for bad in ({"credits": {"total": "many"}}, {"credits": 5}, {"total": 5}):
        with pytest.raises(Exception) as caught:
            parse_credits_response(200, {}, answer(bad))
        assert caught.value.code == "MALFORMED_RESPONSE"  # type: ignore[attr-defined]


def test_the_emulator_registers_under_its_name() -> None:
    assert emulated.EMULATED.name == FA and emulated.EMULATED.default_keys == {
        "FASHN_API_KEY": emulated.DEFAULT_KEY
    }
    assert SPEC.name == FA and SPEC.client_class() is FashnClient
    assert SPEC.client_class().capabilities is SPEC.capabilities
