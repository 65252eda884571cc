"""Contract tests: the ChangeClothesAI client against the emulator (no mocks).

In-process (tests/contract.py) but for ``test_api_key_never_leaks``, on loopback: one of its
errors is a client timeout. Timeouts, refused connections, expiry and keys in general:
test_every_provider.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from pydantic import SecretStr, ValidationError

from emulator import AsyncEmulatorControl
from providers.base import ProviderError, TryOnRequest
from providers.changeclothes.client import (
    GARMENT_PATH,
    PROMPT_PATH,
    ChangeClothesClient,
    PromptOptions,
    parse_response,
)
from providers.changeclothes.errors import ERROR_TABLE
from schemas.results import ErrorKind
from tests import images
from tests.contract import DELETED_KEY, TRIAL_KEY, TRIAL_LIMIT, Cc, ImageHost, garment_fields
from tests.images import band_diff, decode, garment_jpeg, garment_request, person_jpeg, prepared
from tests.providers.sites import assert_secret_kept, expect_error, free_port

CC = "changeclothes"
SECRET = "sk-live-7f3a9c1e5b2d4f6a8c0e"  # distinctive, so any leak is found by substring


def prompt_request(person: bytes, prompt: str = "a blue striped shirt") -> TryOnRequest:
    return TryOnRequest(row_id="row-p", person=prepared(person), prompt=prompt)


# -- success ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["file", "data_uri", "url"])
async def test_garment_try_on_with_each_image_transport(
    transport: str, cc: Cc, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    client = cc.client(image_transport=transport)
    request = image_host.request(person, garment, name=transport)

    result = await client.try_on(request)

    assert result.result_url.startswith(f"{cc.base_url}/files/")
    assert result.mask_url is not None and result.mask_url.startswith(cc.base_url)
    assert result.cache_hit is False
    assert result.request_id
    fetched = image_host.hits[f"/{transport}/person.jpg"]
    assert fetched == (1 if transport == "url" else 0)  # the emulator fetched the URL itself

    output = decode(await client.download(result.result_url))
    mask = decode(await client.download(result.mask_url))
    original = decode(person)
    assert output.shape[:2] == mask.shape[:2] == original.shape[:2]
    assert band_diff(output, original, 0.25, 0.50) > 40  # the red garment covers the torso
    assert band_diff(output, original, 0.00, 0.15) < 6  # the head is untouched
    assert mask[round(0.35 * mask.shape[0]), mask.shape[1] // 2].min() > 200
    assert mask[round(0.05 * mask.shape[0]), mask.shape[1] // 2].max() < 40


async def test_garment_description_is_accepted(
    client: ChangeClothesClient, person: bytes, garment: bytes
) -> None:
    request = garment_request(person, garment, "dresses", garment_description="A red dress")
    result = await client.try_on(request)
    assert result.result_url


async def test_prompt_endpoint_echoes_seed(cc: Cc, person: bytes) -> None:
    options = PromptOptions(seed=1234, guidance_scale=7.5, num_inference_steps=20)
    client = cc.client(prompt_options=options)

    result = await client.try_on(prompt_request(person))

    assert result.seed == 1234
    assert result.mask_url is None  # the prompt endpoint answers no mask
    output = decode(await client.download(result.result_url))
    assert band_diff(output, decode(person), 0.25, 0.50) > 20  # the torso is tinted


async def test_prompt_endpoint_randomizes_seed(cc: Cc, person: bytes) -> None:
    client = cc.client(prompt_options=PromptOptions(seed=5, randomize_seed=True))
    seeds = [(await client.try_on(prompt_request(person))).seed for _ in range(3)]
    assert all(isinstance(s, int) and 0 <= s <= 2_147_483_647 for s in seeds)
    assert len(set(seeds)) == 3


def test_prompt_options_enforce_documented_ranges() -> None:
    for bad in (
        {"guidance_scale": 0.5},
        {"guidance_scale": 101},
        {"num_inference_steps": 0},
        {"num_inference_steps": 51},
        {"seed": -1},
        {"seed": 2_147_483_648},
    ):
        with pytest.raises(ValidationError):
            PromptOptions(**bad)  # type: ignore[arg-type]
    fields = PromptOptions(
        seed=0, randomize_seed=False, guidance_scale=50, num_inference_steps=28
    ).form_fields()
    assert fields == [
        ("seed", "0"),
        ("randomize_seed", "false"),
        ("guidance_scale", "50"),
        ("num_inference_steps", "28"),
    ]


# -- every documented code -------------------------------------------------------------------


def test_error_table_matches_the_document() -> None:
    expected = {
        500: ("SERVER_ERROR", ErrorKind.TRANSIENT),
        10001: ("NOT_LOGIN", ErrorKind.FATAL),
        10002: ("USER_NOT_EXIST", ErrorKind.FATAL),
        10003: ("INSUFFICIENT_CREDITS", ErrorKind.FATAL),
        10004: ("INVALID_PARAM", ErrorKind.PERMANENT),
        10005: ("HARMFUL_CONTENT", ErrorKind.PERMANENT),
        10006: ("INSUFFICIENT_TRAIL_COUNT", ErrorKind.FATAL),
        20001: ("TRY_ON_EXCEPTION", ErrorKind.TRANSIENT),
        30001: ("INVALID_API_KEY", ErrorKind.FATAL),
        30002: ("INVALID_SIGNATURE", ErrorKind.FATAL),
    }
    assert {code: (s.name, s.kind) for code, s in ERROR_TABLE.items()} == expected


@pytest.mark.parametrize("code", sorted(ERROR_TABLE))
async def test_every_documented_code_is_classified(
    code: int,
    client: ChangeClothesClient,
    control: AsyncEmulatorControl,
    person: bytes,
    garment: bytes,
) -> None:
    await control.set_faults(CC, forced_codes=[code])
    error = await expect_error(client.try_on(garment_request(person, garment)))
    spec = ERROR_TABLE[code]
    assert (error.kind, error.code) == (spec.kind, spec.name)
    assert str(code) in error.message
    assert error.http_status is not None and error.http_status >= 400
    assert error.request_id


async def test_500_and_20001_are_transient(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    await control.set_faults(CC, forced_codes=[500, 20001])
    first = await expect_error(client.try_on(garment_request(person, garment)))
    second = await expect_error(client.try_on(garment_request(person, garment)))
    assert (first.code, first.retryable) == ("SERVER_ERROR", True)
    assert (second.code, second.retryable) == ("TRY_ON_EXCEPTION", True)
    assert (await client.try_on(garment_request(person, garment))).result_url  # queue drained


async def test_10001_without_authorization_header(cc: Cc, person: bytes, garment: bytes) -> None:
    response = await cc.raw_post(GARMENT_PATH, garment_fields(person, garment), authorization=None)
    with pytest.raises(ProviderError) as info:
        parse_response(response.status_code, response.headers, response.content)
    assert (info.value.kind, info.value.code) == (ErrorKind.FATAL, "NOT_LOGIN")
    assert info.value.http_status == 401


async def test_10002_deleted_user(cc: Cc, person: bytes, garment: bytes) -> None:
    client = cc.client(api_key=SecretStr(DELETED_KEY))
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "USER_NOT_EXIST")


async def test_10003_when_credits_run_out(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    await control.set_faults(CC, credits=2)
    for _ in range(2):
        assert (await client.try_on(garment_request(person, garment))).result_url
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (
        ErrorKind.FATAL,
        "INSUFFICIENT_CREDITS",
        402,
    )


async def test_10004_bad_category(cc: Cc, person: bytes, garment: bytes) -> None:
    response = await cc.raw_post(GARMENT_PATH, garment_fields(person, garment, category="hats"))
    with pytest.raises(ProviderError) as info:
        parse_response(response.status_code, response.headers, response.content)
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, "INVALID_PARAM")
    assert "category" in info.value.message


async def test_10004_undecodable_image(client: ChangeClothesClient, person: bytes) -> None:
    request = garment_request(person, b"\xff\xd8\xff this is not really a JPEG")
    error = await expect_error(client.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "INVALID_PARAM")
    assert "garmentImg" in error.message


async def test_10004_guidance_scale_out_of_range(cc: Cc, person: bytes) -> None:
    response = await cc.raw_post(
        PROMPT_PATH,
        {
            "modelImg": ("p.jpg", person, "image/jpeg"),
            "prompt": "a green coat",
            "guidance_scale": "150",
        },
    )
    with pytest.raises(ProviderError) as info:
        parse_response(response.status_code, response.headers, response.content)
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, "INVALID_PARAM")
    assert "guidance_scale" in info.value.message


async def test_10004_unreachable_image_url(
    cc: Cc, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    client = cc.client(image_transport="url")
    missing = f"{image_host.base_url}/missing.jpg"
    request = image_host.request(person, garment, name="g-ok", person_url=missing)
    error = await expect_error(client.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "INVALID_PARAM")
    assert "modelImg" in error.message


async def test_10005_harmful_description_and_prompt(
    client: ChangeClothesClient, person: bytes, garment: bytes
) -> None:
    request = garment_request(person, garment, garment_description="NSFW print tee")
    error = await expect_error(client.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "HARMFUL_CONTENT")
    error = await expect_error(client.try_on(prompt_request(person, "something nsfw please")))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "HARMFUL_CONTENT")


async def test_10006_trial_limit(cc: Cc, person: bytes, garment: bytes) -> None:
    client = cc.client(api_key=SecretStr(TRIAL_KEY))
    for _ in range(TRIAL_LIMIT):
        assert (await client.try_on(garment_request(person, garment))).result_url
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "INSUFFICIENT_TRAIL_COUNT")


async def test_30001_wrong_key(cc: Cc, person: bytes, garment: bytes) -> None:
    client = cc.client(api_key=SecretStr(SECRET))
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.FATAL, "INVALID_API_KEY", 401)


async def test_30002_not_a_bearer_header(cc: Cc, person: bytes, garment: bytes) -> None:
    response = await cc.raw_post(
        GARMENT_PATH, garment_fields(person, garment), authorization="Token abc"
    )
    with pytest.raises(ProviderError) as info:
        parse_response(response.status_code, response.headers, response.content)
    assert (info.value.kind, info.value.code) == (ErrorKind.FATAL, "INVALID_SIGNATURE")


async def test_unknown_code_is_permanent_and_named(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    await control.set_faults(CC, forced_codes=[12345])
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNKNOWN_CODE")
    assert "12345" in error.message


# -- transport-level failures ----------------------------------------------------------------


async def test_429_is_transient_with_retry_after(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    await control.set_faults(CC, error_rate_429=1.0, retry_after_s=7)
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (
        ErrorKind.TRANSIENT,
        "RATE_LIMITED",
        429,
    )
    assert error.retry_after == 7.0


async def test_non_json_5xx_is_transient(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    await control.set_faults(CC, error_rate_5xx=1.0)
    error = await expect_error(client.try_on(garment_request(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.TRANSIENT, "HTTP_503", 503)


# -- configuration and secrets ---------------------------------------------------------------


async def test_api_key_never_leaks(cc_loopback: Cc, person: bytes, garment: bytes) -> None:
    key = SecretStr(SECRET)
    clients = [
        cc_loopback.client(api_key=key),
        cc_loopback.client(api_key=key, timeout=0.3),
        cc_loopback.client(api_key=key, base_url=f"http://127.0.0.1:{free_port()}"),
    ]
    errors = [await expect_error(clients[0].try_on(garment_request(person, garment)))]
    await cc_loopback.faults(latency_s=5.0)
    errors.append(await expect_error(clients[1].try_on(garment_request(person, garment))))
    await cc_loopback.faults(latency_s=0.0)
    errors.append(await expect_error(clients[2].try_on(garment_request(person, garment))))
    # A vendor echoing the key in its message is redacted too.
    body = f'{{"code": 30001, "msg": "bad key {SECRET}"}}'.encode()
    with pytest.raises(ProviderError) as info:
        parse_response(401, {}, body, redact=[SECRET])
    errors.append(info.value)

    assert [e.code for e in errors[:3]] == ["INVALID_API_KEY", "TIMEOUT", "CONNECTION_ERROR"]
    assert_secret_kept(SECRET, errors, clients)


async def test_from_env_uses_key_and_base_url(
    monkeypatch: pytest.MonkeyPatch, cc: Cc, person: bytes, garment: bytes
) -> None:
    monkeypatch.setenv("CHANGECLOTHES_API_KEY", cc.key.get_secret_value())
    monkeypatch.setenv("TRYON_CHANGECLOTHES_BASE_URL", cc.base_url + "/")
    client = ChangeClothesClient.from_env(http=cc.http, image_transport="data_uri")
    assert client.base_url == cc.base_url
    assert (await client.try_on(garment_request(person, garment))).result_url


async def test_url_transport_without_url_fails_before_sending(
    cc: Cc, person: bytes, garment: bytes
) -> None:
    error = await expect_error(
        cc.client(image_transport="url").try_on(garment_request(person, garment))
    )
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "NO_IMAGE_URL")
    assert (await cc.provider_stats()).requests == 0


async def test_unsupported_request_shapes(client: ChangeClothesClient, person: bytes) -> None:
    lower = TryOnRequest(
        row_id="r",
        person=prepared(person),
        garment=prepared(garment_jpeg()),
        lower_garment=prepared(garment_jpeg((0, 0, 200))),
        category="upper_body",
    )
    nothing = TryOnRequest(row_id="r", person=prepared(person))
    for request in (lower, nothing):
        error = await expect_error(client.try_on(request))
        assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST")


# -- parse_response on its own ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (401, ErrorKind.FATAL, "HTTP_401"),
        (403, ErrorKind.FATAL, "HTTP_403"),
        (400, ErrorKind.PERMANENT, "HTTP_400"),
        (404, ErrorKind.PERMANENT, "HTTP_404"),
        (429, ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (502, ErrorKind.TRANSIENT, "HTTP_502"),
        (200, ErrorKind.PERMANENT, "MALFORMED_RESPONSE"),
    ],
)
def test_non_json_bodies_are_classified_by_status(status: int, kind: ErrorKind, code: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_response(status, {}, b"<html>oops</html>")
    assert (info.value.kind, info.value.code, info.value.http_status) == (kind, code, status)


def test_json_code_wins_over_http_status() -> None:
    with pytest.raises(ProviderError) as info:
        parse_response(200, {}, b'{"code": 10003, "msg": "no credits"}')
    assert (info.value.kind, info.value.code) == (ErrorKind.FATAL, "INSUFFICIENT_CREDITS")
    assert "no credits" in info.value.message
    result = parse_response(
        200,
        {"X-Request-Id": "abc"},
        b'{"code": 200, "data": {"resultImgUrl": "https://r/x.webp", "seed": 9}}',
    )
    assert (result.result_url, result.seed, result.request_id) == ("https://r/x.webp", 9, "abc")
    assert result.mask_url is None and result.cache_hit is None


def test_success_without_result_url_is_malformed() -> None:
    with pytest.raises(ProviderError) as info:
        parse_response(200, {}, b'{"code": 200, "data": {}}')
    assert info.value.code == "MALFORMED_RESPONSE"


def test_unknown_code_with_gateway_status_keeps_status_meaning() -> None:
    with pytest.raises(ProviderError) as info:
        parse_response(503, {"Retry-After": "2"}, b'{"code": 99, "msg": "busy"}')
    assert (info.value.kind, info.value.retry_after) == (ErrorKind.TRANSIENT, 2.0)


def test_retry_after_as_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    headers = {"Retry-After": format_datetime(when, usegmt=True)}
    with pytest.raises(ProviderError) as info:
        parse_response(429, headers, b"slow down")
    assert info.value.retry_after is not None and 25 <= info.value.retry_after <= 31


async def test_person_only_changes_in_category_region(
    client: ChangeClothesClient, garment: bytes
) -> None:
    person = person_jpeg(shirt=(30, 120, 40))
    result = await client.try_on(garment_request(person, garment, "lower_body"))
    output = decode(await client.download(result.result_url))
    images.assert_dressed(output, decode(person), "lower_body")
