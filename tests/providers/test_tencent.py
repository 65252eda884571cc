"""Contract tests: Tencent AI Art ChangeClothes, our client and the official SDK, against the
emulator over loopback (no mocks). Input images are served by a loopback HTTP server, since
Tencent takes URLs only."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
import traceback
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import SecretStr, ValidationError
from tencentcloud.aiart.v20221229 import aiart_client, models
from tencentcloud.common import credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.http.request import RequestInternal
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.common.sign import Sign

from emulator import AsyncEmulatorControl, EmulatorConfig, EmulatorServer, tencent_wire
from emulator import tencent as emulated
from emulator.keys import accepted_key
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
from tests.contract import ImageHost, band_diff, prepared

PROVIDER = "tencent"
SECRET_ID = accepted_key("TENCENTCLOUD_SECRET_ID")
SECRET_KEY = accepted_key("TENCENTCLOUD_SECRET_KEY")
LEAKY = "tc-secret-9d8c7b6a5f4e3d2c1b0a"  # distinctive, so any leak is found by substring
PERSON_SIZE = (600, 800)  # 3:4, each side inside Tencent's (512, 3000)

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


# -- images and helpers ----------------------------------------------------------------------


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def person_jpeg(size: tuple[int, int] = PERSON_SIZE) -> bytes:
    w, h = size
    image = Image.new("RGB", (w, h), (205, 205, 210))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.4, h * 0.03, w * 0.6, h * 0.16), fill=(210, 170, 140))
    draw.rectangle((w * 0.28, h * 0.18, w * 0.72, h * 0.52), fill=(20, 40, 120))
    draw.rectangle((w * 0.32, h * 0.52, w * 0.68, h * 0.95), fill=(90, 90, 90))
    return jpeg(image)


def garment_jpeg(size: tuple[int, int] = (600, 600)) -> bytes:
    image = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    ImageDraw.Draw(image).rectangle((w * 0.15, h * 0.12, w * 0.85, h * 0.9), fill=(220, 30, 30))
    return jpeg(image)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def person() -> bytes:
    return person_jpeg()


@pytest.fixture(scope="module")
def garment() -> bytes:
    return garment_jpeg()


@pytest.fixture
def tencent(http: httpx.AsyncClient, emulator: EmulatorServer) -> TencentClient:
    return make_client(http, emulator.base_url)


def make_client(
    http: httpx.AsyncClient,
    base_url: str,
    *,
    secret_id: str = SECRET_ID,
    secret_key: str = SECRET_KEY,
    **kwargs: Any,
) -> TencentClient:
    return TencentClient(
        http=http,
        secret_id=SecretStr(secret_id),
        secret_key=SecretStr(secret_key),
        base_url=base_url,
        **kwargs,
    )


def tryon(
    host: ImageHost,
    person: bytes,
    garment: bytes,
    category: str = "upper_body",
    *,
    name: str = "row",
) -> TryOnRequest:
    """A request whose images are served by ``host`` (as the flow's staging would)."""
    return TryOnRequest(
        row_id=name,
        person=prepared(person, url=host.add(f"{name}/person.jpg", person)),
        garment=prepared(garment, url=host.add(f"{name}/garment.jpg", garment)),
        category=category,  # type: ignore[arg-type]
    )


async def expect_error(coro: object) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await coro  # type: ignore[misc]
    return info.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sdk_client(
    emulator: EmulatorServer,
    *,
    secret_id: str = SECRET_ID,
    secret_key: str = SECRET_KEY,
    unsigned_payload: bool = False,
) -> aiart_client.AiartClient:
    """The official SDK, pointed at the emulator over plain HTTP."""
    profile = ClientProfile(
        httpProfile=HttpProfile(protocol="http", endpoint=f"127.0.0.1:{emulator.port}")
    )
    profile.unsignedPayload = unsigned_payload
    return aiart_client.AiartClient(
        credential.Credential(secret_id, secret_key), "ap-singapore", profile
    )


async def raw_post(
    http: httpx.AsyncClient,
    emulator: EmulatorServer,
    body: dict[str, Any],
    *,
    timestamp: int | None = None,
    drop: tuple[str, ...] = (),
    override: dict[str, str] | None = None,
    signed_host: str | None = None,
) -> dict[str, Any]:
    """A hand-made, hand-signed call (what our client never sends); returns ``Response``."""
    payload = json.dumps(body).encode()
    host = f"127.0.0.1:{emulator.port}"
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": CONTENT_TYPE,
        "Host": host,
        "X-TC-Action": ACTION,
        "X-TC-Version": VERSION,
        "X-TC-Region": "ap-singapore",
        "X-TC-Timestamp": str(ts),
        "Authorization": sign_tc3(
            secret_id=SECRET_ID,
            secret_key=SECRET_KEY,
            host=signed_host or host,
            payload=payload,
            timestamp=ts,
        ),
    }
    for name in drop:
        del headers[name]
    headers.update(override or {})
    response = await http.post(f"{emulator.base_url}/", content=payload, headers=headers)
    assert response.status_code == 200  # Tencent answers errors with HTTP 200 too
    assert response.headers["content-type"] == "application/json"  # what the SDK requires
    result: dict[str, Any] = response.json()["Response"]
    assert result["RequestId"]
    return result


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
    http: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    local = make_client(http, emulator.base_url)
    assert local.host == f"127.0.0.1:{emulator.port}"
    public = make_client(http, "https://aiart.intl.tencentcloudapi.com")
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
    emulator: EmulatorServer,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    body: dict[str, Any] = {
        "ModelUrl": image_host.add(f"sdk-{rsp_img_type}/p.jpg", person),
        "ClothesUrl": image_host.add(f"sdk-{rsp_img_type}/g.jpg", garment),
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
    output = pixels(data)
    assert output.shape[:2] == (768, 576)  # the composite keeps the model photo's 3:4
    assert band_diff(output, pixels(person_jpeg((576, 768))), 0.25, 0.5) > 40  # garment on
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"


def test_official_sdk_with_a_wrong_secret_key_is_refused(emulator: EmulatorServer) -> None:
    request = models.ChangeClothesRequest()
    request.from_json_string(json.dumps({"ModelUrl": "http://127.0.0.1:9/p.jpg"}))
    with pytest.raises(TencentCloudSDKException) as info:
        sdk_client(emulator, secret_key="not-the-key").ChangeClothes(request)
    assert info.value.get_code() == "AuthFailure.SignatureFailure"
    assert info.value.get_request_id()
    with pytest.raises(TencentCloudSDKException) as info:
        sdk_client(emulator, secret_id="AKIDnobodyHasThisId").ChangeClothes(request)
    assert info.value.get_code() == "AuthFailure.SecretIdNotFound"


async def test_a_stale_timestamp_is_refused(
    http: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    response = await raw_post(http, emulator, {}, timestamp=int(time.time()) - 3600)
    assert response["Error"]["Code"] == "AuthFailure.SignatureExpire"


async def test_our_client_with_a_skewed_clock_is_fatal(
    http: httpx.AsyncClient, emulator: EmulatorServer, image_host: ImageHost, person: bytes
) -> None:
    client = make_client(http, emulator.base_url, clock=lambda: time.time() + 3600)
    error = await expect_error(client.try_on(tryon(image_host, person, person, name="skew")))
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
    change: dict[str, Any], code: str, http: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    response = await raw_post(http, emulator, {"ClothesType": "Dress"}, **change)
    assert response["Error"]["Code"] == code


async def test_a_foreign_service_in_the_credential_is_refused(
    http: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    payload, ts = b"{}", int(time.time())
    authorization = sign_tc3(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        host=f"127.0.0.1:{emulator.port}",
        payload=payload,
        timestamp=ts,
        service="cvm",
    )
    response = await raw_post(http, emulator, {}, override={"Authorization": authorization})
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
async def test_the_body_is_validated(
    change: dict[str, Any], code: str, http: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    body = {k: v for k, v in {**VALID_BODY, **change}.items() if v is not None}
    response = await raw_post(http, emulator, body)
    assert response["Error"]["Code"] == code


# -- our client: success -----------------------------------------------------------------------


@pytest.mark.parametrize("category", ["upper_body", "lower_body", "dresses"])
async def test_url_result_puts_the_garment_on_the_person(
    category: str,
    tencent: TencentClient,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    result = await tencent.try_on(tryon(image_host, person, garment, category, name=category))

    assert result.result_url is not None and result.result_data is None
    assert result.request_id
    output = pixels(await tencent.download(result.result_url))
    original = pixels(person_jpeg((576, 768)))  # the composite's size
    bands = {"upper_body": (0.25, 0.5), "lower_body": (0.6, 0.85), "dresses": (0.3, 0.8)}
    assert band_diff(output, original, *bands[category]) > 40  # the red garment is there
    assert band_diff(output, original, 0.0, 0.15) < 8  # the head is untouched
    assert image_host.hits[f"/{category}/person.jpg"] == 1  # Tencent fetched our URL


async def test_base64_result_is_returned_as_bytes(
    http: httpx.AsyncClient,
    emulator: EmulatorServer,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    client = make_client(http, emulator.base_url, options=TencentOptions(rsp_img_type="base64"))
    result = await client.try_on(tryon(image_host, person, garment, name="b64"))
    assert result.result_url is None and result.result_data is not None
    assert pixels(result.result_data).shape[:2] == (768, 576)
    assert result.request_id


async def test_logo_is_drawn_unless_turned_off(
    http: httpx.AsyncClient,
    emulator: EmulatorServer,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    async def render(options: TencentOptions) -> np.ndarray:
        as_bytes = options.model_copy(update={"rsp_img_type": "base64"})
        client = make_client(http, emulator.base_url, options=as_bytes)
        result = await client.try_on(tryon(image_host, person, garment, name="logo"))
        assert result.result_data is not None
        return pixels(result.result_data)

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
    control: AsyncEmulatorControl,
    code: str,
    tencent: TencentClient,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    await control.set_faults(PROVIDER, forced_codes=[code])
    error = await expect_error(tencent.try_on(tryon(image_host, person, garment, name="codes")))
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
async def test_auth_failures_are_fatal(
    secret_id: str,
    secret_key: str,
    code: str,
    http: httpx.AsyncClient,
    emulator: EmulatorServer,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    client = make_client(http, emulator.base_url, secret_id=secret_id, secret_key=secret_key)
    error = await expect_error(client.try_on(tryon(image_host, person, garment, name="auth")))
    assert (error.kind, error.code) == (ErrorKind.FATAL, code)


async def test_second_concurrent_task_gets_job_num_exceed(
    control: AsyncEmulatorControl,
    tencent: TencentClient,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    await control.set_faults(PROVIDER, latency_s=0.8)
    outcomes = await asyncio.gather(
        tencent.try_on(tryon(image_host, person, garment, name="c1")),
        tencent.try_on(tryon(image_host, person, garment, name="c2")),
        return_exceptions=True,
    )
    errors = [o for o in outcomes if isinstance(o, ProviderError)]
    assert len(errors) == 1, outcomes
    assert (errors[0].code, errors[0].kind) == (
        "RequestLimitExceeded.JobNumExceed",
        ErrorKind.TRANSIENT,
    )
    # The slot is free again once the first task is done.
    assert (await tencent.try_on(tryon(image_host, person, garment, name="c3"))).result_url


async def test_concurrency_limit_is_configurable(
    monkeypatch: pytest.MonkeyPatch,
    http: httpx.AsyncClient,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    monkeypatch.setenv(emulated.CONCURRENCY_ENV, "2")
    config = EmulatorConfig(faults={"tencent": {"latency_s": 0.5}})  # type: ignore[dict-item]
    with EmulatorServer.start(config) as server:
        client = make_client(http, server.base_url)
        results = await asyncio.gather(
            *(client.try_on(tryon(image_host, person, garment, name=f"p{i}")) for i in range(2))
        )
        assert all(r.result_url for r in results)
        stats = await AsyncEmulatorControl(server.base_url, http=http).stats()
        assert stats.provider(PROVIDER).max_in_flight == 2


async def test_exhausted_credits_are_low_balance(
    control: AsyncEmulatorControl,
    tencent: TencentClient,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    await control.set_faults(PROVIDER, credits=1)
    assert (await tencent.try_on(tryon(image_host, person, garment, name="cr"))).result_url
    error = await expect_error(tencent.try_on(tryon(image_host, person, garment, name="cr")))
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
    size: tuple[int, int],
    code: str,
    kind: ErrorKind,
    tencent: TencentClient,
    image_host: ImageHost,
    garment: bytes,
) -> None:
    request = tryon(image_host, person_jpeg(size), garment, name=f"size{size[0]}x{size[1]}")
    error = await expect_error(tencent.try_on(request))
    assert (error.code, error.kind) == (code, kind)
    assert "ModelUrl" in error.message


async def test_a_file_over_8_mb_as_base64_is_image_size_exceed(
    tencent: TencentClient, image_host: ImageHost, person: bytes
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1800, 1800, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG", compress_level=0)  # ~9.7 MB, 13 MB as base64
    request = tryon(image_host, person, buffer.getvalue(), name="huge")
    error = await expect_error(tencent.try_on(request))
    assert (error.code, error.kind) == ("FailedOperation.ImageSizeExceed", ErrorKind.PERMANENT)
    assert "ClothesUrl" in error.message


async def test_limits_edges_are_accepted(
    tencent: TencentClient, image_host: ImageHost, garment: bytes
) -> None:
    for size in ((513, 684), (2000, 2000), (2999, 1333)):
        request = tryon(image_host, person_jpeg(size), garment, name=f"edge{size[0]}")
        assert (await tencent.try_on(request)).result_url


@pytest.mark.parametrize("size", [(4000, 3000), (300, 400), (3600, 1000)])
async def test_prepared_images_stay_inside_tencent_limits(
    size: tuple[int, int], tencent: TencentClient, image_host: ImageHost, garment: bytes
) -> None:
    source = person_jpeg(size)
    image = prepare_image(source, profile=TENCENT, source_uri=f"mem://{size}")
    assert image_profile_fits(image.data, TENCENT)
    short, long = sorted((image.width, image.height))
    assert short > tencent_wire.MIN_SIDE_EXCLUSIVE and long < tencent_wire.MAX_SIDE_EXCLUSIVE
    assert image.width * image.height <= tencent_wire.MAX_PIXELS
    assert TENCENT.encoded_size(len(image.data)) < tencent_wire.MAX_BASE64_BYTES
    request = tryon(image_host, image.data, garment, name=f"prep{size[0]}")
    assert (await tencent.try_on(request)).result_url  # so never refused for its size


def test_images_no_scale_can_fit_are_refused_before_sending() -> None:
    with pytest.raises(ImageInputError) as info:
        prepare_image(person_jpeg((5000, 600)), profile=TENCENT, source_uri="mem://strip")
    assert info.value.code == "ASPECT_RATIO"


async def test_undecodable_and_unreachable_images(
    tencent: TencentClient, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    broken = tryon(image_host, person, b"\xff\xd8\xff not really a JPEG", name="broken")
    error = await expect_error(tencent.try_on(broken))
    assert (error.code, error.kind) == ("FailedOperation.ImageDecodeFailed", ErrorKind.PERMANENT)
    assert "ClothesUrl" in error.message

    missing = TryOnRequest(
        row_id="missing",
        person=prepared(person, url=f"{image_host.base_url}/no/such.jpg"),
        garment=prepared(garment, url=image_host.add("missing/g.jpg", garment)),
        category="upper_body",
    )
    error = await expect_error(tencent.try_on(missing))
    assert (error.code, error.kind) == ("FailedOperation.ImageDownloadError", ErrorKind.TRANSIENT)

    illegal = TryOnRequest(
        row_id="ftp",
        person=prepared(person, url="ftp://example.com/p.jpg"),
        garment=prepared(garment, url=image_host.add("ftp/g.jpg", garment)),
        category="upper_body",
    )
    error = await expect_error(tencent.try_on(illegal))
    assert (error.code, error.kind) == ("InvalidParameterValue.UrlIllegal", ErrorKind.PERMANENT)


async def test_no_staged_url_fails_before_sending(
    control: AsyncEmulatorControl,
    tencent: TencentClient,
    person: bytes,
    garment: bytes,
) -> None:
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
    assert (await control.stats()).provider(PROVIDER).requests == 0


# -- transport, faults and expiry --------------------------------------------------------------


async def test_injected_faults_are_classified(
    control: AsyncEmulatorControl,
    tencent: TencentClient,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    request = tryon(image_host, person, garment, name="faults")
    await control.set_faults(PROVIDER, error_rate_5xx=1.0)
    error = await expect_error(tencent.try_on(request))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.TRANSIENT, "HTTP_503", 503)
    await control.set_faults(PROVIDER, error_rate_5xx=0.0, error_rate_429=1.0)
    error = await expect_error(tencent.try_on(request))
    # Tencent's frequency limit is JSON with HTTP 200, not a 429.
    assert (error.kind, error.code, error.http_status) == (
        ErrorKind.TRANSIENT,
        "RequestLimitExceeded",
        200,
    )
    await control.set_faults(PROVIDER, error_rate_429=0.0, forced_codes=[502, 429])
    error = await expect_error(tencent.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "HTTP_502")
    error = await expect_error(tencent.try_on(request))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "RequestLimitExceeded")
    assert (await tencent.try_on(request)).result_url  # queue drained
    stats = (await control.stats()).provider(PROVIDER)
    assert stats.errors == {"503": 1, "502": 1, "RequestLimitExceeded": 2}


async def test_timeout_is_transient(
    control: AsyncEmulatorControl,
    http: httpx.AsyncClient,
    emulator: EmulatorServer,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    await control.set_faults(PROVIDER, latency_s=5.0)
    client = make_client(http, emulator.base_url, timeout=0.3)
    error = await expect_error(client.try_on(tryon(image_host, person, garment, name="slow")))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "TIMEOUT")
    await control.wait_idle(PROVIDER)  # the hung-up call gave its slot back
    await control.set_faults(PROVIDER, latency_s=0.0)
    assert (await client.try_on(tryon(image_host, person, garment, name="slow"))).result_url


async def test_connection_refused_is_transient(
    http: httpx.AsyncClient, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    client = make_client(http, f"http://127.0.0.1:{free_port()}")
    error = await expect_error(client.try_on(tryon(image_host, person, garment, name="down")))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "CONNECTION_ERROR")


async def test_expired_result_url_is_permanent(
    http: httpx.AsyncClient, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    with EmulatorServer.start(EmulatorConfig(result_ttl_s=0.3)) as server:
        client = make_client(http, server.base_url)
        result = await client.try_on(tryon(image_host, person, garment, name="ttl"))
        assert result.result_url is not None
        assert await client.download(result.result_url)  # fresh: still there
        await asyncio.sleep(0.5)
        error = await expect_error(client.download(result.result_url))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "HTTP_404")


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
    no_tencent_env: pytest.MonkeyPatch,
    http: httpx.AsyncClient,
    emulator: EmulatorServer,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    no_tencent_env.setenv("TENCENTCLOUD_SECRET_ID", SECRET_ID)
    no_tencent_env.setenv("TENCENTCLOUD_SECRET_KEY", SECRET_KEY)
    no_tencent_env.setenv("TENCENTCLOUD_REGION", "ap-guangzhou")
    no_tencent_env.setenv("TRYON_TENCENT_BASE_URL", emulator.base_url + "/")
    client = TencentClient.from_env(http=http)
    assert (client.base_url, client.region) == (emulator.base_url, "ap-guangzhou")
    assert (await client.try_on(tryon(image_host, person, garment, name="env"))).result_url
    # A session token is sent as X-TC-Token: this emulator issued none, so it is refused.
    no_tencent_env.setenv("TENCENTCLOUD_TOKEN", LEAKY)
    client = TencentClient.from_env(http=http)
    error = await expect_error(client.try_on(tryon(image_host, person, garment, name="env")))
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
    control: AsyncEmulatorControl,
    http: httpx.AsyncClient,
    emulator: EmulatorServer,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    request = tryon(image_host, person, garment, name="leak")
    clients = [
        make_client(http, emulator.base_url, secret_key=LEAKY, session_token=SecretStr(LEAKY)),
        make_client(http, emulator.base_url, secret_key=LEAKY, timeout=0.3),
        make_client(http, f"http://127.0.0.1:{free_port()}", secret_key=LEAKY),
    ]
    errors = [await expect_error(clients[0].try_on(request))]
    # An injected hang happens before the signature check, so a wrong key still times out.
    await control.set_faults(PROVIDER, timeout_rate=1.0, timeout_s=5.0)
    errors.append(await expect_error(clients[1].try_on(request)))
    await control.wait_idle(PROVIDER)
    await control.set_faults(PROVIDER, timeout_rate=0.0)
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
    for error in errors:
        rendered = "".join(traceback.format_exception(error))
        for text in (str(error), repr(error), error.message, rendered, repr(error.args)):
            assert LEAKY not in text
        assert error.__context__ is None and error.__cause__ is None
    for client in clients:
        assert LEAKY not in repr(client) and LEAKY not in str(vars(client))


def test_empty_keys_are_rejected() -> None:
    with pytest.raises(ProviderError) as info:
        make_client(httpx.AsyncClient(), "http://x", secret_key="")
    assert (info.value.kind, info.value.code) == (ErrorKind.FATAL, "MISSING_API_KEY")
