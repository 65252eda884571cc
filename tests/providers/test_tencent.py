"""Contract tests: Tencent AI Art ChangeClothes, our client and the official SDK, against the
emulator (no mocks). Input images are served by a loopback HTTP server, since Tencent takes
URLs only.

Our client runs in-process (tests/contract.py). On loopback: the official SDK's tests (its own
HTTP stack), ``test_client_signs_the_host_it_sends_with_its_port`` (a real host:port) and
``test_secrets_never_leak`` (one of its errors is a client timeout). Timeouts, refused
connections, expiry and empty keys: test_every_provider.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr, ValidationError
from tencentcloud.aiart.v20221229 import aiart_client, models
from tencentcloud.common import credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.http.request import RequestInternal
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.common.sign import Sign

from emulator import EmulatorConfig, EmulatorServer, tencent_wire
from emulator import tencent as emulated
from providers.base import ProviderError, TryOnRequest
from providers.tencent.client import (
    ACTION,
    CONTENT_TYPE,
    SERVICE,
    VERSION,
    TencentClient,
    TencentOptions,
    parse_response,
    sign_tc3,
    tc3_canonical_request,
    tc3_date,
    tc3_signature,
    tc3_string_to_sign,
)
from providers.tencent.errors import ERROR_TABLE, classify_code
from providers.tencent.settings import PROFILE as TENCENT
from schemas.results import ErrorKind
from tasks.images import ImageInputError, image_profile_fits, prepare_image
from tests.contract import Emulated, Emulators, ImageHost
from tests.images import band_diff, decode, person_jpeg, prepared
from tests.providers.sites import Tc, assert_secret_kept, expect_error, free_port

PROVIDER = "tencent"
SECRET_ID, SECRET_KEY = Tc.secret_id, Tc.secret_key
LEAKY = "tc-secret-9d8c7b6a5f4e3d2c1b0a"  # distinctive, so any leak is found by substring

# Doc 002's error table and the kind we decided for each (see providers/tencent/errors.py).
DOC_CODES: dict[str, ErrorKind] = {
    "AuthFailure.UnauthorizedOperation": ErrorKind.FATAL,
    "FailedOperation.GenerateImageFailed": ErrorKind.TRANSIENT,
    "FailedOperation.ImageDecodeFailed": ErrorKind.PERMANENT,
    "FailedOperation.ImageDownloadError": ErrorKind.TRANSIENT,
    "FailedOperation.ImageResolutionExceed": ErrorKind.PERMANENT,
    "FailedOperation.ImageSizeExceed": ErrorKind.PERMANENT,
    "FailedOperation.InnerError": ErrorKind.TRANSIENT,
    "FailedOperation.RequestEntityTooLarge": ErrorKind.PERMANENT,
    "FailedOperation.RequestTimeout": ErrorKind.TRANSIENT,
    "FailedOperation.RpcFail": ErrorKind.TRANSIENT,
    "FailedOperation.ServerError": ErrorKind.TRANSIENT,
    "FailedOperation.Unknown": ErrorKind.TRANSIENT,
    "InvalidParameter.InvalidParameter": ErrorKind.PERMANENT,
    "InvalidParameterValue.ImageEmpty": ErrorKind.PERMANENT,
    "InvalidParameterValue.ParameterValueError": ErrorKind.PERMANENT,
    "InvalidParameterValue.StyleConflict": ErrorKind.PERMANENT,
    "InvalidParameterValue.TextLengthExceed": ErrorKind.PERMANENT,
    "InvalidParameterValue.UrlIllegal": ErrorKind.PERMANENT,
    "OperationDenied.ImageIllegalDetected": ErrorKind.PERMANENT,
    "OperationDenied.TextIllegalDetected": ErrorKind.PERMANENT,
    "RequestLimitExceeded": ErrorKind.TRANSIENT,
    "RequestLimitExceeded.JobNumExceed": ErrorKind.TRANSIENT,
    "ResourceUnavailable.Delivering": ErrorKind.FATAL,
    "ResourceUnavailable.InArrears": ErrorKind.FATAL,
    "ResourceUnavailable.LowBalance": ErrorKind.FATAL,
    "ResourceUnavailable.NotExist": ErrorKind.FATAL,
    "ResourceUnavailable.StopUsing": ErrorKind.FATAL,
    "ResourcesSoldOut.ChargeStatusException": ErrorKind.FATAL,
}
# Cloud API 3.0 common error codes (tencentcloud.com, "Common Error Codes").
COMMON_CODES = (
    "ActionOffline",
    "AuthFailure.InvalidAuthorization",
    "AuthFailure.InvalidSecretId",
    "AuthFailure.MFAFailure",
    "AuthFailure.SecretIdNotFound",
    "AuthFailure.SignatureExpire",
    "AuthFailure.SignatureFailure",
    "AuthFailure.TokenFailure",
    "AuthFailure.UnauthorizedOperation",
    "DryRunOperation",
    "FailedOperation",
    "InternalError",
    "InvalidAction",
    "InvalidParameter",
    "InvalidParameterValue",
    "InvalidRequest",
    "IpInBlacklist",
    "IpNotInWhitelist",
    "LimitExceeded",
    "MissingParameter",
    "NoSuchProduct",
    "NoSuchVersion",
    "RequestLimitExceeded",
    "RequestLimitExceeded.GlobalRegionUinLimitExceeded",
    "RequestLimitExceeded.IPLimitExceeded",
    "RequestLimitExceeded.UinLimitExceeded",
    "RequestSizeLimitExceeded",
    "ResourceInUse",
    "ResourceInsufficient",
    "ResourceNotFound",
    "ResourceUnavailable",
    "ResponseSizeLimitExceeded",
    "ServiceUnavailable",
    "UnauthorizedOperation",
    "UnknownParameter",
    "UnsupportedOperation",
    "UnsupportedProtocol",
    "UnsupportedRegion",
)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def tencent(tc: Tc) -> TencentClient:
    return tc.client()


def sdk_client(
    server: EmulatorServer,
    *,
    secret_id: str = SECRET_ID,
    secret_key: str = SECRET_KEY,
    unsigned_payload: bool = False,
) -> aiart_client.AiartClient:
    """The official SDK, pointed at the emulator on loopback over plain HTTP."""
    profile = ClientProfile(
        httpProfile=HttpProfile(protocol="http", endpoint=f"127.0.0.1:{server.port}")
    )
    profile.unsignedPayload = unsigned_payload
    return aiart_client.AiartClient(
        credential.Credential(secret_id, secret_key), "ap-singapore", profile
    )


# -- TC3 signing: ours equals the official SDK's -----------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "params", "token"),
    [
        ("aiart.intl.tencentcloudapi.com", {"ModelUrl": "https://x/a.jpg"}, None),
        (
            "127.0.0.1:18080",
            {"ModelUrl": "https://x/a.jpg", "ClothesType": "Dress", "LogoAdd": 0},
            "session-token",
        ),
        ("aiart.tencentcloudapi.com", {"LogoParam": {"LogoImage": "未命名 ünïcode"}}, None),
    ],
)
def test_sign_tc3_equals_the_official_sdk(
    endpoint: str, params: dict[str, Any], token: str | None
) -> None:
    profile = ClientProfile(httpProfile=HttpProfile(endpoint=endpoint))
    cred = credential.Credential("AKIDexampleId", "example-secret-key", token)
    client = aiart_client.AiartClient(cred, "ap-guangzhou", profile)
    request = RequestInternal(endpoint, "POST", "/", header={})
    client._build_req_with_tc3_signature(ACTION, params, request)  # the SDK's own signing

    ours = sign_tc3(
        secret_id="AKIDexampleId",
        secret_key="example-secret-key",
        host=request.header["Host"],
        payload=request.data.encode(),
        timestamp=int(request.header["X-TC-Timestamp"]),
    )

    assert ours == request.header["Authorization"]
    assert request.header["Content-Type"] == CONTENT_TYPE


def test_tc3_signature_equals_the_sdk_sign_tc3() -> None:
    canonical, signed = tc3_canonical_request(
        method="POST",
        canonical_uri="/",
        canonical_query="",
        headers={"Host": "aiart.intl.tencentcloudapi.com", "Content-Type": CONTENT_TYPE},
        payload=b'{"ClothesType":"Upper-body"}',
    )
    assert signed == "content-type;host"
    assert canonical.splitlines()[3:5] == [
        f"content-type:{CONTENT_TYPE}",
        "host:aiart.intl.tencentcloudapi.com",
    ]
    to_sign = tc3_string_to_sign(timestamp=1551113065, service=SERVICE, canonical_request=canonical)
    assert to_sign.splitlines()[:3] == [
        "TC3-HMAC-SHA256",
        "1551113065",
        "2019-02-25/aiart/tc3_request",
    ]
    date = tc3_date(1551113065)
    assert tc3_signature("k3y", date=date, service=SERVICE, string_to_sign=to_sign) == (
        Sign.sign_tc3("k3y", date, SERVICE, to_sign)
    )


async def test_client_signs_the_host_it_sends_with_its_port(
    tc: Tc, emulator_server: EmulatorServer
) -> None:
    local = tc.client(base_url=emulator_server.base_url)
    assert local.host == f"127.0.0.1:{emulator_server.port}"
    public = tc.client(base_url="https://aiart.intl.tencentcloudapi.com")
    assert (public.host, public.endpoint) == (
        "aiart.intl.tencentcloudapi.com",
        "https://aiart.intl.tencentcloudapi.com/",
    )
    headers = public.signed_headers(b"{}", timestamp=1700000000)
    assert headers["Authorization"] == sign_tc3(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        host="aiart.intl.tencentcloudapi.com",
        payload=b"{}",
        timestamp=1700000000,
    )
    assert headers["X-TC-Action"] == ACTION and headers["X-TC-Version"] == VERSION
    assert headers["X-TC-Region"] == "ap-singapore" and "X-TC-Token" not in headers


# -- the official SDK against the emulator -----------------------------------------------------


@pytest.mark.parametrize(
    ("rsp_img_type", "unsigned_payload"), [("url", False), (None, False), ("url", True)]
)
def test_official_sdk_gets_a_result(
    rsp_img_type: str | None,
    unsigned_payload: bool,
    emulator_server: EmulatorServer,
    image_host: ImageHost,
) -> None:
    emulator = emulator_server
    body: dict[str, Any] = {
        "ModelUrl": image_host.add(f"sdk-{rsp_img_type}/p.jpg", Tc.person),
        "ClothesUrl": image_host.add(f"sdk-{rsp_img_type}/g.jpg", Tc.garment),
        "ClothesType": "Upper-body",
    }
    if rsp_img_type:
        body["RspImgType"] = rsp_img_type
    request = models.ChangeClothesRequest()
    request.from_json_string(json.dumps(body))

    response = sdk_client(emulator, unsigned_payload=unsigned_payload).ChangeClothes(request)

    assert response.RequestId
    if rsp_img_type == "url":
        assert response.ResultImage.startswith(f"{emulator.base_url}/files/")
        data = httpx.get(response.ResultImage).raise_for_status().content
    else:  # the doc's default: base64
        data = base64.b64decode(response.ResultImage, validate=True)
    output = decode(data)
    assert output.shape[:2] == (768, 576)  # the composite keeps the model photo's 3:4
    assert band_diff(output, decode(person_jpeg(size=(576, 768))), 0.25, 0.5) > 40  # garment on
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"


def test_official_sdk_with_a_wrong_secret_key_is_refused(emulator_server: EmulatorServer) -> None:
    emulator = emulator_server
    request = models.ChangeClothesRequest()
    request.from_json_string(json.dumps({"ModelUrl": "http://127.0.0.1:9/p.jpg"}))
    with pytest.raises(TencentCloudSDKException) as info:
        sdk_client(emulator, secret_key="not-the-key").ChangeClothes(request)
    assert info.value.get_code() == "AuthFailure.SignatureFailure"
    assert info.value.get_request_id()
    with pytest.raises(TencentCloudSDKException) as info:
        sdk_client(emulator, secret_id="AKIDnobodyHasThisId").ChangeClothes(request)
    assert info.value.get_code() == "AuthFailure.SecretIdNotFound"


async def test_a_stale_timestamp_is_refused(tc: Tc) -> None:
    response = await tc.raw_post({}, timestamp=int(time.time()) - 3600)
    assert response["Error"]["Code"] == "AuthFailure.SignatureExpire"


async def test_our_client_with_a_skewed_clock_is_fatal(tc: Tc) -> None:
    client = tc.client(clock=lambda: time.time() + 3600)
    error = await expect_error(client.try_on(tc.request(tc.person, tc.person, name="skew")))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "AuthFailure.SignatureExpire")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"drop": ("Authorization",)}, "MissingParameter"),
        ({"drop": ("X-TC-Action",)}, "MissingParameter"),
        ({"drop": ("X-TC-Region",)}, "MissingParameter"),
        ({"override": {"X-TC-Action": "GenerateAvatar"}}, "InvalidAction"),
        ({"override": {"X-TC-Version": "2020-01-01"}}, "NoSuchVersion"),
        ({"override": {"X-TC-Region": "Mars Base"}}, "UnsupportedRegion"),
        ({"override": {"Authorization": "Bearer abc"}}, "AuthFailure.InvalidAuthorization"),
        ({"signed_host": "aiart.intl.tencentcloudapi.com"}, "AuthFailure.SignatureFailure"),
        ({"override": {"X-TC-Token": "not-issued"}}, "AuthFailure.TokenFailure"),
    ],
)
async def test_the_gateway_checks_common_parameters_and_signature(
    change: dict[str, Any], code: str, tc: Tc
) -> None:
    response = await tc.raw_post({"ClothesType": "Dress"}, **change)
    assert response["Error"]["Code"] == code


async def test_a_foreign_service_in_the_credential_is_refused(tc: Tc) -> None:
    payload, ts = b"{}", int(time.time())
    authorization = sign_tc3(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        host=tc.host,
        payload=payload,
        timestamp=ts,
        service="cvm",
    )
    response = await tc.raw_post({}, override={"Authorization": authorization})
    assert response["Error"]["Code"] == "AuthFailure.InvalidAuthorization"
    assert "Service" in response["Error"]["Message"]


VALID_BODY = {"ModelUrl": "http://h/p.jpg", "ClothesUrl": "http://h/g.jpg", "ClothesType": "Dress"}


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"ModelUrl": None}, "InvalidParameterValue.ImageEmpty"),
        ({"ClothesUrl": ""}, "InvalidParameterValue.ImageEmpty"),
        ({"ModelUrl": "ftp://h/p.jpg"}, "InvalidParameterValue.UrlIllegal"),
        ({"ClothesUrl": "not a url"}, "InvalidParameterValue.UrlIllegal"),
        ({"ClothesType": "Hat"}, "InvalidParameterValue.ParameterValueError"),
        ({"ClothesType": None}, "MissingParameter"),
        ({"RspImgType": "gif"}, "InvalidParameterValue.ParameterValueError"),
        ({"Seed": 1}, "UnknownParameter"),
        ({"LogoAdd": "1"}, "InvalidParameter"),
        ({"LogoParam": {"LogoRect": {"X": 1}}}, "InvalidParameterValue.ParameterValueError"),
        ({"LogoParam": {"Logo": "x"}}, "UnknownParameter"),
    ],
)
async def test_the_body_is_validated(change: dict[str, Any], code: str, tc: Tc) -> None:
    body = {k: v for k, v in {**VALID_BODY, **change}.items() if v is not None}
    response = await tc.raw_post(body)
    assert response["Error"]["Code"] == code


# -- our client: success -----------------------------------------------------------------------


@pytest.mark.parametrize("category", ["upper_body", "lower_body", "dresses"])
async def test_url_result_puts_the_garment_on_the_person(
    category: str, tc: Tc, tencent: TencentClient, image_host: ImageHost
) -> None:
    result = await tencent.try_on(tc.request(category=category, name=category))

    assert result.result_url is not None and result.result_data is None
    assert result.request_id
    output = decode(await tencent.download(result.result_url))
    original = decode(person_jpeg(size=(576, 768)))  # the composite's size
    bands = {"upper_body": (0.25, 0.5), "lower_body": (0.6, 0.85), "dresses": (0.3, 0.8)}
    assert band_diff(output, original, *bands[category]) > 40  # the red garment is there
    assert band_diff(output, original, 0.0, 0.15) < 8  # the head is untouched
    assert image_host.hits[f"/{category}/person.jpg"] == 1  # Tencent fetched our URL


async def test_base64_result_is_returned_as_bytes(tc: Tc) -> None:
    client = tc.client(options=TencentOptions(rsp_img_type="base64"))
    result = await client.try_on(tc.request(name="b64"))
    assert result.result_url is None and result.result_data is not None
    assert decode(result.result_data).shape[:2] == (768, 576)
    assert result.request_id


async def test_logo_is_drawn_unless_turned_off(tc: Tc) -> None:
    async def render(options: TencentOptions) -> np.ndarray:
        as_bytes = options.model_copy(update={"rsp_img_type": "base64"})
        result = await tc.client(options=as_bytes).try_on(tc.request(name="logo"))
        assert result.result_data is not None
        return decode(result.result_data)

    default = await render(TencentOptions())
    off = await render(TencentOptions(logo_add=0))
    green = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 200, 0)).save(green, "PNG")
    custom = await render(
        TencentOptions(
            logo_param={
                "LogoImage": base64.b64encode(green.getvalue()).decode(),
                "LogoRect": {"X": 0, "Y": 0, "Width": 100, "Height": 50},
            }
        )
    )
    corner = (slice(-30, -5), slice(-120, -10))  # "Generated by AI", bottom-right
    assert np.abs(default[corner] - off[corner]).mean() > 20
    assert np.abs(default[:400, :400] - off[:400, :400]).mean() < 2  # elsewhere the same
    # The custom logo fills LogoRect (given in the model photo's 600 px; the result is 576 px).
    assert custom[20, 40].tolist() == pytest.approx([0, 200, 0], abs=30)
    assert np.abs(custom[corner] - off[corner]).mean() < 2


# -- our client: every documented error code ---------------------------------------------------


def test_error_table_covers_the_doc_and_the_common_codes() -> None:
    assert set(DOC_CODES) <= set(ERROR_TABLE)
    assert set(COMMON_CODES) <= set(ERROR_TABLE)
    assert set(DOC_CODES) <= set(tencent_wire.CODES)  # the emulator knows every documented code


@pytest.mark.parametrize("code", sorted(DOC_CODES))
async def test_each_documented_code_is_classified(
    code: str, tc: Tc, tencent: TencentClient
) -> None:
    await tc.faults(forced_codes=[code])
    error = await expect_error(tencent.try_on(tc.request(name="codes")))
    assert (error.code, error.kind) == (code, DOC_CODES[code])
    assert ERROR_TABLE[code].kind is DOC_CODES[code]
    assert error.http_status == 200 and error.request_id
    assert code in error.message


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("AuthFailure.SomethingNew", ErrorKind.FATAL),
        ("ResourceUnavailable.Frozen", ErrorKind.FATAL),
        ("ResourcesSoldOut.Other", ErrorKind.FATAL),
        ("RequestLimitExceeded.Other", ErrorKind.TRANSIENT),
        ("InternalError.Db", ErrorKind.TRANSIENT),
        ("FailedOperation.SomethingElse", ErrorKind.PERMANENT),
        ("Totally.Unknown", ErrorKind.PERMANENT),
    ],
)
def test_unknown_codes_are_classified_by_prefix(code: str, kind: ErrorKind) -> None:
    assert classify_code(code) is kind
    body = json.dumps({"Response": {"Error": {"Code": code, "Message": "m"}, "RequestId": "r"}})
    with pytest.raises(ProviderError) as info:
        parse_response(200, {}, body.encode())
    assert (info.value.kind, info.value.code, info.value.request_id) == (kind, code, "r")


@pytest.mark.parametrize(
    ("secret_id", "secret_key", "code"),
    [
        (SECRET_ID, "wrong-key", "AuthFailure.SignatureFailure"),
        ("AKIDunknownUnknownUnknown", SECRET_KEY, "AuthFailure.SecretIdNotFound"),
        ("not-a-tencent-id", SECRET_KEY, "AuthFailure.InvalidSecretId"),
    ],
)
async def test_auth_failures_are_fatal(secret_id: str, secret_key: str, code: str, tc: Tc) -> None:
    client = tc.client(secret_id=secret_id, secret_key=secret_key)
    error = await expect_error(client.try_on(tc.request(name="auth")))
    assert (error.kind, error.code) == (ErrorKind.FATAL, code)


async def test_second_concurrent_task_gets_job_num_exceed(tc: Tc, tencent: TencentClient) -> None:
    await tc.faults(latency_s=0.8)
    outcomes = await asyncio.gather(
        tencent.try_on(tc.request(name="c1")),
        tencent.try_on(tc.request(name="c2")),
        return_exceptions=True,
    )
    errors = [o for o in outcomes if isinstance(o, ProviderError)]
    assert len(errors) == 1, outcomes
    assert (errors[0].code, errors[0].kind) == (
        "RequestLimitExceeded.JobNumExceed",
        ErrorKind.TRANSIENT,
    )
    # The slot is free again once the first task is done.
    assert (await tencent.try_on(tc.request(name="c3"))).result_url


async def test_concurrency_limit_is_configurable(
    monkeypatch: pytest.MonkeyPatch, emulators: Emulators, image_host: ImageHost
) -> None:
    monkeypatch.setenv(emulated.CONCURRENCY_ENV, "2")
    config = EmulatorConfig(faults={"tencent": {"latency_s": 0.5}})  # type: ignore[dict-item]
    server = emulators.start(config)
    on = Tc(emulators.http, server, emulators.clock, image_host)
    client = on.client()
    results = await asyncio.gather(*(client.try_on(on.request(name=f"p{i}")) for i in range(2)))
    assert all(r.result_url for r in results)
    assert (await on.provider_stats()).max_in_flight == 2


async def test_exhausted_credits_are_low_balance(tc: Tc, tencent: TencentClient) -> None:
    await tc.faults(credits=1)
    assert (await tencent.try_on(tc.request(name="cr"))).result_url
    error = await expect_error(tencent.try_on(tc.request(name="cr")))
    assert (error.code, error.kind) == ("ResourceUnavailable.LowBalance", ErrorKind.FATAL)


# -- image limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "code", "kind"),
    [
        ((500, 700), "InvalidParameterValue.ParameterValueError", ErrorKind.PERMANENT),
        ((512, 683), "InvalidParameterValue.ParameterValueError", ErrorKind.PERMANENT),
        ((3000, 1000), "FailedOperation.ImageResolutionExceed", ErrorKind.PERMANENT),
        ((2100, 2100), "FailedOperation.ImageResolutionExceed", ErrorKind.PERMANENT),
    ],
)
async def test_images_outside_the_limits_get_the_vendor_error(
    size: tuple[int, int], code: str, kind: ErrorKind, tc: Tc, tencent: TencentClient
) -> None:
    request = tc.request(person_jpeg(size=size), name=f"size{size[0]}x{size[1]}")
    error = await expect_error(tencent.try_on(request))
    assert (error.code, error.kind) == (code, kind)
    assert "ModelUrl" in error.message


async def test_a_file_over_8_mb_as_base64_is_image_size_exceed(
    tc: Tc, tencent: TencentClient
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1800, 1800, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG", compress_level=0)  # ~9.7 MB, 13 MB as base64
    request = tc.request(garment=buffer.getvalue(), name="huge")
    error = await expect_error(tencent.try_on(request))
    assert (error.code, error.kind) == ("FailedOperation.ImageSizeExceed", ErrorKind.PERMANENT)
    assert "ClothesUrl" in error.message


async def test_limits_edges_are_accepted(tc: Tc, tencent: TencentClient) -> None:
    for size in ((513, 684), (2000, 2000), (2999, 1333)):
        request = tc.request(person_jpeg(size=size), name=f"edge{size[0]}")
        assert (await tencent.try_on(request)).result_url


@pytest.mark.parametrize("size", [(4000, 3000), (300, 400), (3600, 1000)])
async def test_prepared_images_stay_inside_tencent_limits(
    size: tuple[int, int], tc: Tc, tencent: TencentClient
) -> None:
    source = person_jpeg(size=size)
    image = prepare_image(source, profile=TENCENT, source_uri=f"mem://{size}")
    assert image_profile_fits(image.data, TENCENT)
    short, long = sorted((image.width, image.height))
    assert short > tencent_wire.MIN_SIDE_EXCLUSIVE and long < tencent_wire.MAX_SIDE_EXCLUSIVE
    assert image.width * image.height <= tencent_wire.MAX_PIXELS
    assert TENCENT.encoded_size(len(image.data)) < tencent_wire.MAX_BASE64_BYTES
    request = tc.request(image.data, name=f"prep{size[0]}")
    assert (await tencent.try_on(request)).result_url  # so never refused for its size


def test_images_no_scale_can_fit_are_refused_before_sending() -> None:
    with pytest.raises(ImageInputError) as info:
        prepare_image(person_jpeg(size=(5000, 600)), profile=TENCENT, source_uri="mem://strip")
    assert info.value.code == "ASPECT_RATIO"


async def test_undecodable_and_unreachable_images(tc: Tc, tencent: TencentClient) -> None:
    image_host, person, garment = tc.image_host, tc.person, tc.garment
    broken = tc.request(garment=b"\xff\xd8\xff not really a JPEG", name="broken")
    error = await expect_error(tencent.try_on(broken))
    assert (error.code, error.kind) == ("FailedOperation.ImageDecodeFailed", ErrorKind.PERMANENT)
    assert "ClothesUrl" in error.message

    missing = image_host.request(
        person, garment, name="missing", person_url=f"{image_host.base_url}/no/such.jpg"
    )
    error = await expect_error(tencent.try_on(missing))
    assert (error.code, error.kind) == ("FailedOperation.ImageDownloadError", ErrorKind.TRANSIENT)

    illegal = image_host.request(person, garment, name="ftp", person_url="ftp://example.com/p.jpg")
    error = await expect_error(tencent.try_on(illegal))
    assert (error.code, error.kind) == ("InvalidParameterValue.UrlIllegal", ErrorKind.PERMANENT)


async def test_no_staged_url_fails_before_sending(tc: Tc, tencent: TencentClient) -> None:
    person, garment = tc.person, tc.garment
    request = TryOnRequest(
        row_id="r", person=prepared(person), garment=prepared(garment), category="dresses"
    )
    error = await expect_error(tencent.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "NO_IMAGE_URL")
    unsupported = [
        TryOnRequest(row_id="r", person=prepared(person, url="http://h/p.jpg")),
        TryOnRequest(
            row_id="r",
            person=prepared(person, url="http://h/p.jpg"),
            garment=prepared(garment, url="http://h/g.jpg"),
        ),
        TryOnRequest(
            row_id="r",
            person=prepared(person, url="http://h/p.jpg"),
            garment=prepared(garment, url="http://h/g.jpg"),
            lower_garment=prepared(garment, url="http://h/l.jpg"),
            category="upper_body",
        ),
    ]
    for shape in unsupported:
        error = await expect_error(tencent.try_on(shape))
        assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST")
    assert (await tc.provider_stats()).requests == 0


# -- transport, faults and expiry --------------------------------------------------------------


async def test_injected_faults_are_classified(tc: Tc, tencent: TencentClient) -> None:
    request = tc.request(name="faults")
    await tc.faults(error_rate_5xx=1.0)
    error = await expect_error(tencent.try_on(request))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.TRANSIENT, "HTTP_503", 503)
    await tc.faults(error_rate_5xx=0.0, error_rate_429=1.0)
    error = await expect_error(tencent.try_on(request))
    # Tencent's frequency limit is JSON with HTTP 200, not a 429.
    assert (error.kind, error.code, error.http_status) == (
        ErrorKind.TRANSIENT,
        "RequestLimitExceeded",
        200,
    )
    await tc.faults(error_rate_429=0.0, forced_codes=[502, 429])
    error = await expect_error(tencent.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "HTTP_502")
    error = await expect_error(tencent.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "RequestLimitExceeded")
    assert (await tencent.try_on(request)).result_url  # queue drained
    assert (await tc.provider_stats()).errors == {"503": 1, "502": 1, "RequestLimitExceeded": 2}


# -- parse_response on its own -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (200, b"<html>proxy</html>", ErrorKind.TRANSIENT, "MALFORMED_RESPONSE"),
        (200, b'{"Response": {"RequestId": "r"}}', ErrorKind.PERMANENT, "MALFORMED_RESPONSE"),
        (200, b'{"Response": {"ResultImage": "x", "RequestId": "r"}}', ErrorKind.PERMANENT,
         "MALFORMED_RESPONSE"),
        (502, b"Bad Gateway", ErrorKind.TRANSIENT, "HTTP_502"),
        (429, b"slow down", ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (403, b"forbidden", ErrorKind.FATAL, "HTTP_403"),
        (404, b"not found", ErrorKind.PERMANENT, "HTTP_404"),
    ],
)  # fmt: skip
def test_responses_without_a_result(status: int, body: bytes, kind: ErrorKind, code: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_response(status, {}, body)
    assert (info.value.kind, info.value.code, info.value.http_status) == (kind, code, status)


def test_base64_results_are_decoded_strictly() -> None:
    good = base64.b64encode(b"RIFF-webp-bytes").decode()
    envelope = {"Response": {"ResultImage": good, "RequestId": "r1"}}
    result = parse_response(200, {}, json.dumps(envelope).encode(), rsp_img_type="base64")
    assert (result.result_data, result.result_url, result.request_id) == (
        b"RIFF-webp-bytes",
        None,
        "r1",
    )
    envelope["Response"]["ResultImage"] = "not base64!"
    with pytest.raises(ProviderError) as info:
        parse_response(200, {}, json.dumps(envelope).encode(), rsp_img_type="base64")
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, "MALFORMED_RESPONSE")


# -- configuration and secrets -----------------------------------------------------------------


@pytest.fixture
def no_tencent_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in (
        "TENCENTCLOUD_SECRET_ID",
        "TENCENTCLOUD_SECRET_KEY",
        "TENCENTCLOUD_TOKEN",
        "TENCENTCLOUD_SECURITY_TOKEN",
        "TENCENTCLOUD_REGION",
        "TRYON_TENCENT_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def test_from_env_requires_both_keys(no_tencent_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProviderError) as info:
        TencentClient.from_env(http=httpx.AsyncClient())
    assert (info.value.kind, info.value.code) == (ErrorKind.FATAL, "MISSING_API_KEY")
    assert "TENCENTCLOUD_SECRET_ID" in str(info.value)
    assert "TENCENTCLOUD_SECRET_KEY" in str(info.value)
    no_tencent_env.setenv("TENCENTCLOUD_SECRET_ID", LEAKY)
    with pytest.raises(ProviderError) as info:
        TencentClient.from_env(http=httpx.AsyncClient())
    assert "TENCENTCLOUD_SECRET_KEY" in str(info.value)
    assert "TENCENTCLOUD_SECRET_ID" not in str(info.value) and LEAKY not in str(info.value)


async def test_from_env_uses_keys_region_base_url_and_token(
    no_tencent_env: pytest.MonkeyPatch, tc: Tc
) -> None:
    no_tencent_env.setenv("TENCENTCLOUD_SECRET_ID", SECRET_ID)
    no_tencent_env.setenv("TENCENTCLOUD_SECRET_KEY", SECRET_KEY)
    no_tencent_env.setenv("TENCENTCLOUD_REGION", "ap-guangzhou")
    no_tencent_env.setenv("TRYON_TENCENT_BASE_URL", tc.base_url + "/")
    client = TencentClient.from_env(http=tc.http)
    assert (client.base_url, client.region) == (tc.base_url, "ap-guangzhou")
    assert (await client.try_on(tc.request(name="env"))).result_url
    # A session token is sent as X-TC-Token: this emulator issued none, so it is refused.
    no_tencent_env.setenv("TENCENTCLOUD_TOKEN", LEAKY)
    client = TencentClient.from_env(http=tc.http)
    error = await expect_error(client.try_on(tc.request(name="env")))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "AuthFailure.TokenFailure")
    assert LEAKY not in repr(client) and LEAKY not in str(vars(client))


def test_registry_builds_the_client(no_tencent_env: pytest.MonkeyPatch) -> None:
    from providers.registry import provider_spec

    no_tencent_env.setenv("TENCENTCLOUD_SECRET_ID", SECRET_ID)
    no_tencent_env.setenv("TENCENTCLOUD_SECRET_KEY", SECRET_KEY)
    client = provider_spec("tencent").make_client(http=httpx.AsyncClient())
    assert isinstance(client, TencentClient)
    assert client.base_url == "https://aiart.intl.tencentcloudapi.com"
    assert client.capabilities.needs_urls and client.profile is TENCENT


def test_options_are_validated() -> None:
    with pytest.raises(ValidationError):
        TencentOptions(rsp_img_type="gif")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TencentOptions(logo_param={"LogoRect": {"X": 0, "Y": 0, "Width": 0, "Height": 1}})
    with pytest.raises(ValidationError):
        TencentOptions(logo_param={"Logo": "x"})  # type: ignore[arg-type]
    assert TencentOptions().body_fields() == {"RspImgType": "url"}  # LogoAdd: vendor default


async def test_secrets_never_leak(
    http: httpx.AsyncClient, loopback: Emulated, image_host: ImageHost
) -> None:
    on = Tc(http, loopback, None, image_host)
    request = on.request(name="leak")
    clients = [
        on.client(secret_key=LEAKY, session_token=SecretStr(LEAKY)),
        on.client(secret_key=LEAKY, timeout=0.3),
        on.client(base_url=f"http://127.0.0.1:{free_port()}", secret_key=LEAKY),
    ]
    errors = [await expect_error(clients[0].try_on(request))]
    # An injected hang happens before the signature check, so a wrong key still times out.
    await on.faults(timeout_rate=1.0, timeout_s=5.0)
    errors.append(await expect_error(clients[1].try_on(request)))
    await on.control.wait_idle(PROVIDER)
    await on.faults(timeout_rate=0.0)
    errors.append(await expect_error(clients[2].try_on(request)))
    # A vendor echoing a secret in its message is redacted too.
    error_body = {"Code": "InternalError", "Message": f"key={LEAKY}"}
    echo = {"Response": {"Error": error_body, "RequestId": "r"}}
    with pytest.raises(ProviderError) as info:
        parse_response(200, {}, json.dumps(echo).encode(), redact=[LEAKY])
    errors.append(info.value)

    assert [e.code for e in errors[:3]] == [
        "AuthFailure.SignatureFailure",
        "TIMEOUT",
        "CONNECTION_ERROR",
    ]
    assert_secret_kept(LEAKY, errors, clients)
