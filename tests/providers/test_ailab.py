"""Contract tests: the AILabTools try-on and refiner clients against the emulator (no mocks).

In-process on the fake clock (tests/contract.py) but for ``test_api_key_never_leaks``, on
loopback: two of its errors are client timeouts. Timeouts, refused connections, expiry and
missing keys in general: test_every_provider.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from emulator.ailab import CODES, UNLIMITED_BALANCE
from providers.ailab.client import (
    DEFAULT_POLL_POLICY,
    REFINER_PATH,
    TRYON_PATH,
    AILabRefinerClient,
    AILabTryOnClient,
)
from providers.ailab.errors import CREDITS_CODE, ERROR_TABLE
from providers.ailab.settings import PROFILE as AILAB
from providers.ailab.settings import REFINER_PROFILE as AILAB_REFINER
from providers.ailab.settings import TRYON_CREDITS
from providers.ailab.wire import (
    CREDITS_PATH,
    KEY_HEADER,
    QUERY_PATH,
    UNIVERSAL_CREDITS,
    parse_credits,
    parse_submit,
    parse_task_result,
)
from providers.base import JobState, PollPolicy, ProviderError, RefineRequest, TryOnRequest
from providers.registry import REFINER, provider_spec
from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind
from tasks.images import image_profile_fits, prepare_image
from tests import images
from tests.contract import (
    CONTRACT_CONFIG,
    DELETED_KEY,
    TRIAL_KEY,
    TRIAL_LIMIT,
    Emulated,
    Emulators,
    FakeClock,
    ImageHost,
)
from tests.images import band_diff, decode, garment_jpeg, garment_request, person_jpeg, prepared
from tests.providers.sites import Ai, assert_secret_kept, expect_error, free_port

PROVIDER = "ailab"
SECRET = "ailab-live-5d9e2c7a1f3b8e6d"  # distinctive, so any leak is found by substring


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def tryon(ai: Ai) -> AILabTryOnClient:
    return ai.client()


@pytest.fixture
def refiner(ai: Ai) -> AILabRefinerClient:
    return ai.refiner()


def refine_request(
    person: bytes, garment: bytes, coarse: bytes, gender: str = "woman", **kwargs: Any
) -> RefineRequest:
    return RefineRequest(
        row_id="row-1",
        person=prepared(person),
        top_garment=prepared(garment),
        coarse=prepared(coarse),
        gender=gender,  # type: ignore[arg-type]
        **kwargs,
    )


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def flat(size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    return encode(Image.new("RGB", size, (120, 140, 160)), fmt)


def noise(size: tuple[int, int], fmt: str = "PNG", seed: int = 1) -> bytes:
    """Incompressible pixels: the encoded size is about width * height * 3."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), fmt)


# -- try-on: the job lifecycle ---------------------------------------------------------------


async def test_tryon_job_goes_queued_running_done(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.faults(job_queued_s=0.6, job_running_s=0.6)
    task_id = await tryon.submit(garment_request(person, garment))
    states = [(await tryon.poll(task_id)).state]
    await ai.sleep(0.9)
    states.append((await tryon.poll(task_id)).state)
    await ai.sleep(0.6)
    final = await tryon.poll(task_id)
    states.append(final.state)

    assert states == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert final.result is not None and final.result.request_id == task_id
    assert final.result.result_url is not None
    assert final.result.result_url.startswith(f"{ai.base_url}/files/")
    output = decode(await tryon.download(final.result.result_url))
    assert band_diff(output, decode(person), 0.25, 0.50) > 40  # the red garment is on the torso
    assert band_diff(output, decode(person), 0.00, 0.15) < 6  # the head is untouched


async def test_try_on_reports_the_task_once_before_polling(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.faults(job_queued_s=0.1, job_running_s=0.1)
    seen: list[tuple[str, int]] = []

    async def on_submitted(task_id: str) -> None:
        polls = (await ai.control.stats()).requests.get(f"GET {QUERY_PATH}", 0)
        seen.append((task_id, polls))

    result = await tryon.try_on(garment_request(person, garment), on_submitted=on_submitted)

    assert len(seen) == 1
    task_id, polls_before = seen[0]
    assert polls_before == 0  # reported before the first status query
    assert result.request_id == task_id
    assert result.result_url and await tryon.download(result.result_url)
    assert (await ai.control.stats()).requests[f"GET {QUERY_PATH}"] >= 2


@pytest.mark.parametrize("category", images.CATEGORY_BANDS)
async def test_each_category_maps_to_its_clothes_type(
    category: str, ai: Ai, tryon: AILabTryOnClient, garment: bytes
) -> None:
    await ai.quick_jobs()
    person = person_jpeg(shirt=(30, 120, 40))
    result = await tryon.try_on(garment_request(person, garment, category))
    assert result.result_url is not None
    images.assert_dressed(decode(await tryon.download(result.result_url)), decode(person), category)


async def test_unsupported_request_shapes_fail_before_sending(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    shapes = [
        garment_request(person, garment, lower_garment=prepared(garment_jpeg((0, 0, 200)))),
        TryOnRequest(row_id="r", person=prepared(person), prompt="a red shirt"),
        TryOnRequest(row_id="r", person=prepared(person), garment=prepared(garment)),
    ]
    for request in shapes:
        error = await expect_error(tryon.try_on(request))
        assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST")
    assert (await ai.provider_stats()).requests == 0
    assert not AILabTryOnClient.capabilities.lower_garment
    assert AILabTryOnClient.capabilities.async_jobs


# -- the refiner -----------------------------------------------------------------------------


async def test_refiner_result_differs_from_the_coarse_image(
    ai: Ai, tryon: AILabTryOnClient, refiner: AILabRefinerClient, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs()
    coarse_result = await tryon.try_on(garment_request(person, garment))
    assert coarse_result.result_url is not None
    coarse_webp = await tryon.download(coarse_result.result_url)
    coarse = encode(Image.open(io.BytesIO(coarse_webp)).convert("RGB"), "JPEG", quality=95)
    submitted: list[str] = []

    async def on_submitted(task_id: str) -> None:
        submitted.append(task_id)

    request = refine_request(
        person, garment, coarse, "man", bottom_garment=prepared(garment_jpeg((10, 10, 90)))
    )
    result = await refiner.refine(request, on_submitted=on_submitted)

    assert submitted == [result.request_id]
    assert result.extra.get("image_count") == "1"
    assert result.result_url is not None
    refined = decode(await refiner.download(result.result_url))
    before = decode(coarse)
    assert refined.shape == before.shape
    assert float(np.abs(refined - before).mean()) > 8  # contrast, colour and sharpening


async def test_refiner_gender_is_checked_by_client_and_emulator(
    ai: Ai, refiner: AILabRefinerClient, person: bytes, garment: bytes
) -> None:
    error = await expect_error(refiner.refine(refine_request(person, garment, person, "child")))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST")
    assert (await ai.provider_stats()).requests == 0

    files = [
        ("task_type", (None, "async")),
        ("gender", (None, "female")),
        ("person_image", ("p.jpg", person, "image/jpeg")),
        ("top_garment", ("g.jpg", garment, "image/jpeg")),
        ("coarse_image", ("c.jpg", person, "image/jpeg")),
    ]
    response = await ai.http.post(
        ai.base_url + REFINER_PATH, files=files, headers={KEY_HEADER: ai.key.get_secret_value()}
    )
    with pytest.raises(ProviderError) as info:
        parse_submit(response.status_code, response.headers, response.content)
    assert (info.value.kind, info.value.code) == (
        ErrorKind.PERMANENT,
        "UNSUPPORTED_PARAMETER_VALUES",
    )
    assert response.status_code == 422 and "gender" in info.value.message


async def test_refiner_job_failure_is_permanent(
    ai: Ai, refiner: AILabRefinerClient, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs(async_failure_rate=1.0)
    error = await expect_error(refiner.refine(refine_request(person, garment, person)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "ERROR_TASK_STOPPED_PROCESSING")
    assert error.provider == "ailab_refiner" and error.request_id


# -- every public code, one by one -----------------------------------------------------------


def test_error_table_and_emulator_cover_the_same_public_codes() -> None:
    assert set(ERROR_TABLE) == set(CODES)
    assert {c: s.http_status for c, s in ERROR_TABLE.items()} == CODES
    fatal = {c for c, s in ERROR_TABLE.items() if s.kind is ErrorKind.FATAL}
    assert fatal == {
        "ERROR_USER_NOT_EXISTS",
        "ERROR_APPLICATIONS_NOT_EXISTS",
        "ERROR_USER_LOCKED",
        "AI_SERVICE_UNAUTHORIZED",
        "ERROR_AI_NOT_EXISTS",
        CREDITS_CODE,
    }
    assert all(
        s.kind is ErrorKind.TRANSIENT for s in ERROR_TABLE.values() if (s.http_status or 0) >= 500
    )
    # 403 about one file is the row's problem, not the account's.
    assert ERROR_TABLE["ERROR_ILLEGAL_FILE"].kind is ErrorKind.PERMANENT


@pytest.mark.parametrize("code", sorted(ERROR_TABLE))
async def test_every_public_code_is_answered_and_classified(
    ai: Ai, code: str, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.faults(forced_codes=[code])
    error = await expect_error(tryon.try_on(garment_request(person, garment)))
    spec = ERROR_TABLE[code]
    assert (error.kind, error.code, error.http_status) == (spec.kind, code, spec.http_status)
    assert error.provider == "ailab" and error.request_id
    assert code in error.message


async def test_credits_429_is_fatal_but_rate_limit_429_is_transient(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs(credits=TRYON_CREDITS)  # one try-on's worth
    assert (await tryon.try_on(garment_request(person, garment))).result_url
    credits = await expect_error(tryon.try_on(garment_request(person, garment)))
    assert (credits.kind, credits.code, credits.http_status) == (
        ErrorKind.FATAL,
        CREDITS_CODE,
        429,
    )

    await ai.faults(credits=None, error_rate_429=1.0, retry_after_s=7)
    limited = await expect_error(tryon.try_on(garment_request(person, garment)))
    assert (limited.kind, limited.code, limited.http_status) == (
        ErrorKind.TRANSIENT,
        "RATE_LIMITED",
        429,
    )
    assert limited.retry_after == 7.0

    await ai.faults(error_rate_429=0.0, forced_codes=[429])
    forced = await expect_error(tryon.try_on(garment_request(person, garment)))
    assert (forced.kind, forced.code) == (ErrorKind.TRANSIENT, "RATE_LIMITED")


async def test_trial_key_runs_out_of_credits(ai: Ai, person: bytes, garment: bytes) -> None:
    await ai.quick_jobs()
    client = ai.client(api_key=SecretStr(TRIAL_KEY))
    for _ in range(TRIAL_LIMIT):
        await client.submit(garment_request(person, garment))
    error = await expect_error(client.submit(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, CREDITS_CODE)


async def test_rejected_calls_cost_no_credit(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.faults(credits=TRYON_CREDITS)
    gif = flat((300, 300), "GIF")
    error = await expect_error(tryon.submit(garment_request(person, gif)))
    assert error.code == "UNSUPPORTED_FILE_TYPES"
    assert await tryon.submit(garment_request(person, garment))  # the credit is still there


@pytest.mark.parametrize(
    ("api_key", "code"),
    [(DELETED_KEY, "ERROR_USER_NOT_EXISTS"), (SECRET, "ERROR_APPLICATIONS_NOT_EXISTS")],
)
async def test_bad_keys_are_fatal(
    api_key: str, code: str, ai: Ai, person: bytes, garment: bytes
) -> None:
    client = ai.client(api_key=SecretStr(api_key))
    error = await expect_error(client.submit(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.FATAL, code, 401)


# -- the account's balance (GET /api/common/query-credits) -----------------------------------


async def test_balance_is_answered_and_parsed(
    ai: Ai, tryon: AILabTryOnClient, refiner: AILabRefinerClient
) -> None:
    assert await tryon.credits_balance() == UNLIMITED_BALANCE  # no credits set: unlimited
    await ai.faults(credits=1234)
    # One key, one balance: both clients read the same universal credits.
    assert await tryon.credits_balance() == await refiner.credits_balance() == 1234

    response = await ai.http.get(
        ai.base_url + CREDITS_PATH, headers={KEY_HEADER: ai.key.get_secret_value()}
    )
    body = response.json()
    assert (response.status_code, body["error_code"], body["error_detail"]["code"]) == (200, 0, "")
    signs = [entry["unique_sign"] for entry in body["data"]]
    assert signs[-1] == UNIVERSAL_CREDITS and len(signs) > 1  # found by its sign, not place
    common = body["data"][-1]
    assert common["balance"] == 1234.0 and isinstance(common["balance"], float)  # "float"
    assert set(common) == {
        "unique_sign",
        "name",
        "balance",
        "total",
        "last_recharge_balance",
        "balance_warning",
        "first_buy_time",
        "last_update_time",
    }
    assert parse_credits(response.status_code, response.headers, response.content) == 1234


async def test_balance_goes_down_by_each_call_s_credits(
    ai: Ai,
    tryon: AILabTryOnClient,
    refiner: AILabRefinerClient,
    person: bytes,
    garment: bytes,
) -> None:
    await ai.quick_jobs(credits=100)
    result = await tryon.try_on(garment_request(person, garment))
    assert await tryon.credits_balance() == 100 - 10  # a try-on: 10 credits
    assert result.result_url
    coarse_webp = await tryon.download(result.result_url)
    coarse = encode(Image.open(io.BytesIO(coarse_webp)).convert("RGB"), "JPEG", quality=95)
    assert (await refiner.refine(refine_request(person, garment, coarse))).result_url
    assert await refiner.credits_balance() == 100 - 10 - 25  # a refine: 25 more
    # What the specs say a call takes is what the balance lost.
    assert (provider_spec(PROVIDER).credits_per_call, REFINER.credits_per_call) == (10, 25)

    # 65 left: two refines (50), then 15, too few for another (25) but enough for a try-on.
    for _ in range(2):
        assert await refiner.submit(refine_request(person, garment, coarse))
    error = await expect_error(refiner.submit(refine_request(person, garment, coarse)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, CREDITS_CODE)
    assert await tryon.submit(garment_request(person, garment))
    assert await tryon.credits_balance() == 5


async def test_failed_calls_leave_the_balance_alone(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs(credits=15)
    # Refused at submit (an unsupported file), and by a code the plan forces.
    error = await expect_error(tryon.submit(garment_request(person, flat((300, 300), "GIF"))))
    assert error.code == "UNSUPPORTED_FILE_TYPES"
    await ai.faults(forced_codes=["ERROR_NO_FACE_IN_FILE"])
    error = await expect_error(tryon.submit(garment_request(person, garment)))
    assert error.code == "ERROR_NO_FACE_IN_FILE"
    assert await tryon.credits_balance() == 15
    # Accepted, then the task failed: held while it ran, given back when it ended.
    await ai.faults(async_failure_rate=1.0)
    error = await expect_error(tryon.try_on(garment_request(person, garment)))
    assert error.code == "ERROR_TASK_STOPPED_PROCESSING"
    assert await tryon.credits_balance() == 15
    # One try-on's worth is left, not two: the second is refused and costs nothing.
    await ai.faults(async_failure_rate=0.0)
    assert await tryon.try_on(garment_request(person, garment))
    error = await expect_error(tryon.submit(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, CREDITS_CODE)
    assert await tryon.credits_balance() == 5


async def test_a_trial_key_s_balance_is_its_calls_left(
    ai: Ai, person: bytes, garment: bytes
) -> None:
    client = ai.client(api_key=SecretStr(TRIAL_KEY))
    assert await client.credits_balance() == TRIAL_LIMIT * 10
    assert await client.submit(garment_request(person, garment))
    assert await client.credits_balance() == (TRIAL_LIMIT - 1) * 10


async def test_balance_with_a_bad_key_is_fatal_and_never_shows_it(
    emulators: Emulators,
    clock: FakeClock,
    image_host: ImageHost,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # An emulator whose auth errors quote the key back, as a careless vendor's would.
    echoing = emulators.start(CONTRACT_CONFIG.model_copy(update={"echo_credentials": True}))
    on = Ai(emulators.http, echoing, clock, image_host)
    wrong = on.client(api_key=SecretStr(SECRET))
    refiner = on.refiner(api_key=SecretStr(SECRET))
    errors = [
        await expect_error(wrong.credits_balance()),
        await expect_error(refiner.credits_balance()),
    ]
    for error in errors:
        assert (error.kind, error.code, error.http_status) == (
            ErrorKind.FATAL,
            "ERROR_APPLICATIONS_NOT_EXISTS",
            401,
        )
        assert "***" in error.message  # the echo was there, and was blanked out
    assert {e.provider for e in errors} == {"ailab", "ailab_refiner"}
    deleted = await expect_error(on.client(api_key=SecretStr(DELETED_KEY)).credits_balance())
    assert (deleted.kind, deleted.code) == (ErrorKind.FATAL, "ERROR_USER_NOT_EXISTS")
    assert_secret_kept(SECRET, errors, [wrong, refiner, wrong._wire, refiner._wire])
    assert SECRET not in caplog.text


async def test_emulator_query_credits_is_strict_and_outside_the_fault_plan(ai: Ai) -> None:
    url, key = ai.base_url + CREDITS_PATH, ai.key.get_secret_value()
    no_key = await ai.http.get(url)
    assert (no_key.status_code, no_key.json()["error_detail"]["code"]) == (
        401,
        "ERROR_APPLICATIONS_NOT_EXISTS",
    )
    posted = await ai.http.post(url, headers={KEY_HEADER: key})
    assert (posted.status_code, posted.json()["error_detail"]["code"]) == (
        405,
        "ERROR_ILLEGAL_OPERATION",
    )
    with pytest.raises(ProviderError) as info:
        parse_credits(posted.status_code, posted.headers, posted.content)
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, "ERROR_ILLEGAL_OPERATION")

    # A run asks before it starts: the question spends no code queued for the next call.
    await ai.faults(credits=40, forced_codes=["ERROR_GATEWAY"], error_rate_5xx=1.0)
    assert await ai.client().credits_balance() == 40
    assert (await ai.control.faults())[PROVIDER].forced_codes == ["ERROR_GATEWAY"]


# -- asynchronous failures and deadlines -----------------------------------------------------


async def test_async_job_failure_is_permanent(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs(async_failure_rate=1.0)
    task_id = await tryon.submit(garment_request(person, garment))
    await ai.sleep(0.1)
    status = await tryon.poll(task_id)
    assert status.state is JobState.FAILED and status.error is not None
    error = await expect_error(tryon.wait(task_id))
    assert (error.kind, error.code, error.request_id) == (
        ErrorKind.PERMANENT,
        "ERROR_TASK_STOPPED_PROCESSING",
        task_id,
    )


async def test_poll_deadline_is_transient(ai: Ai, person: bytes, garment: bytes) -> None:
    await ai.faults(job_queued_s=0.0, job_running_s=30.0)
    policy = PollPolicy(initial_s=0.05, max_interval_s=0.05, factor=1.0, deadline_s=0.3)
    client = ai.client(poll_policy=policy)
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "POLL_DEADLINE")
    assert error.request_id  # the task id: a rerun resumes polling it


async def test_transient_poll_errors_are_retried_and_fatal_ones_stop(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs()
    task_id = await tryon.submit(garment_request(person, garment))
    await ai.faults(forced_codes=[503, "ERROR_GATEWAY", 429, "AI_SERVICE_TIMEOUT"])
    result = await tryon.wait(task_id)
    assert result.request_id == task_id and result.result_url

    task_id = await tryon.submit(garment_request(person, garment))
    await ai.faults(forced_codes=["ERROR_USER_LOCKED"])
    error = await expect_error(tryon.wait(task_id))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "ERROR_USER_LOCKED")


async def test_unknown_task_is_a_failed_job(tryon: AILabTryOnClient) -> None:
    status = await tryon.poll("no-such-task")
    assert status.state is JobState.FAILED and status.error is not None
    assert (status.error.kind, status.error.code) == (
        ErrorKind.PERMANENT,
        "ERROR_RESOURCE_NOT_FOUND",
    )


# -- transport ------------------------------------------------------------------------------


async def test_gateway_faults_on_submit_are_transient(
    ai: Ai, tryon: AILabTryOnClient, person: bytes, garment: bytes
) -> None:
    """(A timeout or a refused connection: test_every_provider.py.)"""
    await ai.faults(error_rate_5xx=1.0)
    error = await expect_error(tryon.submit(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.TRANSIENT, "HTTP_503", 503)


# -- the emulator's strictness and image limits ----------------------------------------------


def _raw_fields(person: bytes, garment: bytes) -> dict[str, Any]:
    return {
        "task_type": (None, "async"),
        "clothes_type": (None, "upper_body"),
        "person_image": ("p.jpg", person, "image/jpeg"),
        "clothes_image": ("g.jpg", garment, "image/jpeg"),
    }


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"task_type": (None, "sync")}, 422, "UNSUPPORTED_PARAMETER_VALUES"),
        ({"task_type": None}, 400, "MISSING_PARAMETERS"),
        ({"clothes_type": (None, "hat")}, 422, "UNSUPPORTED_PARAMETER_VALUES"),
        ({"clothes_image": None}, 400, "MISSING_PARAMETERS"),
        ({"clothes_image": (None, "https://example.com/g.jpg")}, 400, "ERROR_INVALID_PARAMETER"),
        ({"person_image": ("p.jpg", b"", "image/jpeg")}, 400, "PARAMETERS_CANNOT_EMPTY"),
    ],
)
async def test_emulator_rejects_malformed_submits(
    change: dict[str, Any], status: int, code: str, ai: Ai, person: bytes, garment: bytes
) -> None:
    fields = {**_raw_fields(person, garment), **change}
    files = [(name, value) for name, value in fields.items() if value is not None]
    response = await ai.http.post(
        ai.base_url + TRYON_PATH, files=files, headers={KEY_HEADER: ai.key.get_secret_value()}
    )
    body = response.json()
    assert (response.status_code, body["error_code"]) == (status, status)
    assert body["error_detail"]["code"] == body["error_code_str"] == code
    with pytest.raises(ProviderError) as info:
        parse_submit(response.status_code, response.headers, response.content)
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, code)


async def test_emulator_wants_key_header_multipart_and_task_id(
    ai: Ai, person: bytes, garment: bytes
) -> None:
    http, url = ai.http, ai.base_url + TRYON_PATH
    no_key = await http.post(url, files=list(_raw_fields(person, garment).items()))
    assert (no_key.status_code, no_key.json()["error_detail"]["code"]) == (
        401,
        "ERROR_APPLICATIONS_NOT_EXISTS",
    )
    headers = {KEY_HEADER: ai.key.get_secret_value()}
    form = await http.post(url, data={"task_type": "async"}, headers=headers)
    assert (form.status_code, form.json()["error_detail"]["code"]) == (400, "ERROR_PARAMETERS")
    query = await http.get(ai.base_url + QUERY_PATH, headers=headers)
    assert (query.status_code, query.json()["error_detail"]["code"]) == (400, "MISSING_PARAMETERS")


ImageFactory = Callable[[], bytes]
IMAGE_CASES: list[tuple[str, str, ImageFactory, str | None]] = [
    # (endpoint, case, image, expected code or None for accepted)
    ("tryon", "gif", lambda: flat((300, 300), "GIF"), "UNSUPPORTED_FILE_TYPES"),
    ("refiner", "gif", lambda: flat((300, 300), "GIF"), "UNSUPPORTED_FILE_TYPES"),
    ("tryon", "bmp", lambda: flat((300, 300), "BMP"), "UNSUPPORTED_FILE_TYPES"),  # JPG/PNG only
    ("refiner", "bmp", lambda: flat((300, 300), "BMP"), None),
    ("tryon", "webp", lambda: flat((300, 300), "WEBP"), "UNSUPPORTED_FILE_TYPES"),
    ("refiner", "100x100", lambda: flat((100, 100)), "ERROR_LOW_RESOLUTION"),
    ("refiner", "150x400", lambda: flat((150, 400)), "ERROR_LOW_RESOLUTION"),  # > 150, not >=
    ("refiner", "151x400", lambda: flat((151, 400)), None),
    ("tryon", "100x100", lambda: flat((100, 100)), None),  # the try-on doc sets no minimum
    ("tryon", "4096x300", lambda: flat((4096, 300), "PNG"), "ERROR_HIGH_RESOLUTION"),
    ("refiner", "300x4096", lambda: flat((300, 4096), "PNG"), "ERROR_HIGH_RESOLUTION"),
    ("tryon", "4095x300", lambda: flat((4095, 300), "PNG"), None),
    # ~4.3 MB: over the try-on's 3 MB, within the refiner's 5 MB
    ("tryon", "4mb", lambda: noise((1200, 1200)), "FILE_SIZE_EXCEEDS_LIMIT"),
    ("refiner", "4mb", lambda: noise((1200, 1200)), None),
    ("refiner", "6mb", lambda: noise((1450, 1450)), "FILE_SIZE_EXCEEDS_LIMIT"),
    ("tryon", "garbage", lambda: b"this is not an image at all", "FILE_DECODING_FAILURE"),
]


@pytest.mark.parametrize(
    ("endpoint", "image", "expected"),
    [pytest.param(e, f, c, id=f"{e}-{name}") for e, name, f, c in IMAGE_CASES],
)
async def test_image_limits_of_each_endpoint(
    endpoint: str,
    image: ImageFactory,
    expected: str | None,
    tryon: AILabTryOnClient,
    refiner: AILabRefinerClient,
    person: bytes,
    garment: bytes,
) -> None:
    data = image()
    submit = (
        tryon.submit(garment_request(person, data))
        if endpoint == "tryon"
        else refiner.submit(refine_request(person, garment, data))
    )
    if expected is None:
        assert await submit
        return
    error = await expect_error(submit)
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, expected)
    assert error.http_status == CODES[expected]


def _source_images() -> dict[str, bytes]:
    rgba = Image.new("RGBA", (900, 1400), (0, 0, 0, 0))
    rgba.paste((200, 40, 40, 255), (100, 100, 800, 1300))
    return {
        "huge-noisy.jpg": noise((5200, 3400), "JPEG", seed=2),
        "tiny.png": flat((60, 90), "PNG"),
        "photo.bmp": flat((1000, 1500), "BMP"),
        "anim.gif": flat((500, 700), "GIF"),
        "alpha.png": encode(rgba, "PNG"),
    }


@pytest.mark.parametrize("profile", [AILAB, AILAB_REFINER], ids=lambda p: p.name)
async def test_prepared_images_always_fit(
    profile: ImageProfile,
    tryon: AILabTryOnClient,
    refiner: AILabRefinerClient,
    person: bytes,
    garment: bytes,
) -> None:
    for name, source in _source_images().items():
        image = await asyncio.to_thread(
            prepare_image, source, profile=profile, source_uri=f"mem://{name}"
        )
        assert image_profile_fits(image.data, profile), name
        if profile is AILAB:
            request = TryOnRequest(row_id=name, person=image, garment=image, category="dresses")
            assert await tryon.submit(request), name
        else:
            refine = RefineRequest(
                row_id=name, person=image, top_garment=image, coarse=image, gender="woman"
            )
            assert await refiner.submit(refine), name


# -- configuration and secrets ---------------------------------------------------------------


async def test_api_key_never_leaks(
    http: httpx.AsyncClient,
    loopback: Emulated,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    on = Ai(http, loopback, None, image_host)
    key = SecretStr(SECRET)
    wrong = on.client(api_key=key)
    slow = on.refiner(api_key=key, timeout=0.3)
    gone = on.client(api_key=key, base_url=f"http://127.0.0.1:{free_port()}")
    errors = [
        await expect_error(wrong.submit(garment_request(person, garment))),
        await expect_error(wrong.poll("some-task")),
    ]
    await on.faults(latency_s=5.0)
    errors.append(await expect_error(slow.submit(refine_request(person, garment, person))))
    errors.append(await expect_error(slow.poll("some-task")))
    await on.faults(latency_s=0.0)
    errors.append(await expect_error(gone.submit(garment_request(person, garment))))
    errors.append(await expect_error(gone.poll("some-task")))
    # A vendor echoing the key in its answer is redacted too.
    body = f'{{"error_code": 401, "error_msg": "bad key {SECRET}"}}'.encode()
    with pytest.raises(ProviderError) as info:
        parse_submit(401, {}, body, redact=[SECRET])
    errors.append(info.value)

    codes = [e.code for e in errors[:6]]
    assert (
        codes == ["ERROR_APPLICATIONS_NOT_EXISTS"] * 2 + ["TIMEOUT"] * 2 + ["CONNECTION_ERROR"] * 2
    )
    clients = (wrong, slow, gone)
    assert_secret_kept(SECRET, errors, [*clients, *(client._wire for client in clients)])
    assert SECRET not in caplog.text


async def test_registry_builds_both_clients_from_env(
    monkeypatch: pytest.MonkeyPatch, ai: Ai, person: bytes, garment: bytes
) -> None:
    monkeypatch.setenv("AILAB_API_KEY", ai.key.get_secret_value())
    monkeypatch.setenv("TRYON_AILAB_BASE_URL", ai.base_url + "/")
    client = provider_spec("ailab").make_client(http=ai.http)
    refine = REFINER.make_client(http=ai.http)
    assert isinstance(client, AILabTryOnClient) and isinstance(refine, AILabRefinerClient)
    assert client.base_url == refine.base_url == ai.base_url
    assert client.profile is AILAB and refine.profile is AILAB_REFINER
    assert client.poll_policy == refine.poll_policy == DEFAULT_POLL_POLICY
    assert DEFAULT_POLL_POLICY.intervals()[:3] == [5.0, 5.0, 5.0]  # the doc's "every 5 s"
    assert await client.submit(garment_request(person, garment))


# -- the parsers on their own ----------------------------------------------------------------


def _body(status: int, code: str = "", legacy: str | None = None, **extra: Any) -> bytes:
    payload = {
        "request_id": "rid",
        "log_id": "lid",
        "error_code": 0 if status == 200 else status,
        "error_code_str": code if legacy is None else legacy,
        "error_msg": "",
        "error_detail": {"status_code": status, "code": code, "code_message": "", "message": ""},
        **extra,
    }
    return json.dumps(payload).encode()


def test_detail_code_wins_over_the_legacy_code_str() -> None:
    # The doc's own example: the precise code and the older, coarser one side by side.
    body = _body(422, "ERROR_NO_FACE_IN_FILE", legacy="FILE_CONTENT_NON_COMPLIANCE")
    with pytest.raises(ProviderError) as info:
        parse_submit(422, {}, body)
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, "ERROR_NO_FACE_IN_FILE")
    assert info.value.request_id == "rid"


@pytest.mark.parametrize(
    ("status", "code", "legacy", "kind", "ours"),
    [
        (429, "", CREDITS_CODE, ErrorKind.FATAL, CREDITS_CODE),  # only the old field says it
        (429, "", "", ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (429, "SOME_NEW_LIMIT", None, ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (403, "SOME_NEW_BAN", None, ErrorKind.FATAL, "SOME_NEW_BAN"),
        (400, "SOME_NEW_PARAM", None, ErrorKind.PERMANENT, "SOME_NEW_PARAM"),
        (502, "", "", ErrorKind.TRANSIENT, "HTTP_502"),
        (200, "ERROR_PARAMETERS", None, ErrorKind.PERMANENT, "ERROR_PARAMETERS"),
    ],
)
def test_classification_by_code_then_status(
    status: int, code: str, legacy: str | None, kind: ErrorKind, ours: str
) -> None:
    with pytest.raises(ProviderError) as info:
        parse_submit(status, {"Retry-After": "3"}, _body(status, code, legacy))
    assert (info.value.kind, info.value.code, info.value.http_status) == (kind, ours, status)
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (401, ErrorKind.FATAL, "HTTP_401"),
        (400, ErrorKind.PERMANENT, "HTTP_400"),
        (429, ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (504, ErrorKind.TRANSIENT, "HTTP_504"),
        (200, ErrorKind.PERMANENT, "MALFORMED_RESPONSE"),
    ],
)
def test_non_json_submit_answers_are_classified_by_status(
    status: int, kind: ErrorKind, code: str
) -> None:
    with pytest.raises(ProviderError) as info:
        parse_submit(status, {}, b"<html>oops</html>")
    assert (info.value.kind, info.value.code) == (kind, code)


def test_submit_task_id_locations() -> None:
    assert parse_submit(200, {}, _body(200, task_id="t-1")) == "t-1"
    assert parse_submit(200, {}, _body(200, data={"task_id": "t-2"})) == "t-2"
    with pytest.raises(ProviderError) as info:
        parse_submit(200, {}, _body(200))
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, "MALFORMED_RESPONSE")


@pytest.mark.parametrize(
    ("extra", "state", "url"),
    [
        ({"task_status": 0}, JobState.QUEUED, None),
        ({"task_status": 1}, JobState.RUNNING, None),
        ({"task_status": 1, "output": {"task_status": "UNKNOWN"}}, JobState.RUNNING, None),
        ({"output": {"task_status": "PENDING", "image_url": ""}}, JobState.QUEUED, None),
        ({"task_status": 7}, JobState.RUNNING, None),  # unknown: keep polling
        ({"task_status": 2, "data": {"image": "https://r/a.png"}}, JobState.SUCCEEDED, "a"),
        (
            {"task_status": 2, "output": {"task_status": "SUCCEEDED", "image_url": "https://r/b"}},
            JobState.SUCCEEDED,
            "b",
        ),
        ({"task_status": 2, "data": {"images": ["https://r/c.png"]}}, JobState.SUCCEEDED, "c"),
        ({"task_status": 2, "output": {"task_status": "FAILED"}}, JobState.FAILED, None),
        ({"task_status": 2, "data": {"image": ""}}, JobState.FAILED, None),  # no URL
    ],
)
def test_task_result_shapes(extra: dict[str, Any], state: JobState, url: str | None) -> None:
    status = parse_task_result(200, {}, _body(200, **extra), task_id="t")
    assert status.state is state
    if url is not None:
        assert status.result is not None and status.result.result_url is not None
        assert status.result.result_url.startswith(f"https://r/{url}")
        assert status.result.request_id == "t"
    if state is JobState.FAILED:
        assert status.error is not None and status.error.kind is ErrorKind.PERMANENT


def test_task_result_errors_about_the_call_are_raised() -> None:
    for status, code, kind in [
        (401, "ERROR_APPLICATIONS_NOT_EXISTS", ErrorKind.FATAL),
        (429, CREDITS_CODE, ErrorKind.FATAL),
        (503, "AI_SERVICE_FLOW_RESTRICTION", ErrorKind.TRANSIENT),
    ]:
        with pytest.raises(ProviderError) as info:
            parse_task_result(status, {}, _body(status, code), task_id="t")
        assert (info.value.kind, info.value.code, info.value.request_id) == (kind, code, "t")
    with pytest.raises(ProviderError) as info:  # garbled: ask again, the job may be fine
        parse_task_result(200, {}, b"not json", task_id="t")
    assert info.value.kind is ErrorKind.TRANSIENT
    failed = parse_task_result(422, {}, _body(422, "ERROR_NO_FACE_IN_FILE"), task_id="t")
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error.code == "ERROR_NO_FACE_IN_FILE"


def _credits_body(*entries: Any, **extra: Any) -> bytes:
    data = [
        {
            "unique_sign": sign,
            "name": sign,
            "balance": balance,
            "total": 2000.0,
            "last_recharge_balance": 2000.0,
            "balance_warning": 0.0,
            "first_buy_time": 0,
            "last_update_time": 0,
        }
        for sign, balance in entries
    ]
    return _body(200, **{"data": data, **extra})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_credits_body(("common", 1990.0)), 1990),
        (_credits_body(("common", 99.9)), 99),  # a part of a credit pays no call
        # API-specific credits are not counted, wherever they are listed.
        (_credits_body(("portrait_try_on_clothes", 500.0), ("common", 30)), 30),
        (_credits_body(("common", 30), ("portrait_try_on_clothes_refiner", 500.0)), 30),
        (_credits_body(("portrait_try_on_clothes", 500.0)), 0),  # no universal credits
        (_credits_body(), 0),
    ],
)
def test_credits_answers(body: bytes, expected: int) -> None:
    assert parse_credits(200, {}, body) == expected


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (_body(200), "without a data array"),
        # The docs' 2025 example: one object, not an array.
        (_body(200, data={"unique_sign": "common", "balance": 10.0}), "without a data array"),
        (_body(200, data=["common"]), "data[0] without a unique_sign"),
        (_body(200, data=[{"balance": 10.0}]), "data[0] without a unique_sign"),
        (_credits_body(("common", "10")), "data[0] without a numeric balance"),
        (_credits_body(("common", None)), "data[0] without a numeric balance"),
        (_credits_body(("common", True)), "data[0] without a numeric balance"),
        (_credits_body(("x", 1.0), ("common", float("nan"))), "data[1] with balance nan"),
        (_credits_body(("common", 1.0), ("common", 2.0)), "2 'common' entries"),
    ],
)
def test_malformed_credits_answers_are_permanent(body: bytes, what: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_credits(200, {}, body, provider="ailab_refiner")
    error = info.value
    assert (error.kind, error.code, error.provider) == (
        ErrorKind.PERMANENT,
        "MALFORMED_RESPONSE",
        "ailab_refiner",
    )
    assert what in error.message and "query-credits" in error.message


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (200, b"<html>maintenance</html>", ErrorKind.PERMANENT, "MALFORMED_RESPONSE"),
        (502, b"<html>bad gateway</html>", ErrorKind.TRANSIENT, "HTTP_502"),
        (401, _body(401, "ERROR_USER_NOT_EXISTS"), ErrorKind.FATAL, "ERROR_USER_NOT_EXISTS"),
        (403, _body(403, "ERROR_USER_LOCKED"), ErrorKind.FATAL, "ERROR_USER_LOCKED"),
        (503, _body(503, "AI_SERVICE_FLOW_RESTRICTION"), ErrorKind.TRANSIENT, None),
        # An error code with HTTP 200 is an error still, whatever data it carries.
        (200, _body(200, "ERROR_PARAMETERS", data=[]), ErrorKind.PERMANENT, "ERROR_PARAMETERS"),
    ],
)
def test_credits_errors_are_classified_by_the_error_table(
    status: int, body: bytes, kind: ErrorKind, code: str | None
) -> None:
    with pytest.raises(ProviderError) as info:
        parse_credits(status, {}, body)
    assert info.value.kind is kind
    assert info.value.code == (code or "AI_SERVICE_FLOW_RESTRICTION")
