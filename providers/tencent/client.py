"""Tencent Cloud AI Art ChangeClothes client (doc 002): one signed JSON POST, answered in sync.

Tencent Cloud API 3.0: ``POST /`` with the action, version and region in ``X-TC-*`` headers and
a TC3-HMAC-SHA256 ``Authorization`` header (``sign_tc3``, ours, checked against the official
SDK in the tests). Inputs are URLs only (``ModelUrl``, ``ClothesUrl``): the flow stages the
prepared images and sets ``PreparedImage.url``. Every answer, errors included, is HTTP 200 with
``{"Response": {..., "RequestId"}}``; an error carries ``Response.Error.{Code, Message}``.

Choices not fixed by the document (configurable, unverified against a live account):
- Region defaults to ``ap-singapore``: the document's domain is the international one
  (``aiart.intl.tencentcloudapi.com``), which an international account uses; it does not list
  which regions serve ChangeClothes. Override with ``TENCENTCLOUD_REGION``.
- A session token (temporary credentials) is read from ``TENCENTCLOUD_TOKEN`` (tccli's name),
  else ``TENCENTCLOUD_SECURITY_TOKEN`` (the Terraform provider's); the Python SDK reads none.
- ``RspImgType`` defaults to ``url`` (the vendor's default is base64, which the document warns
  may fail for large results); the URL lives 1 hour, so the flow downloads it at once.

Balance: doc 002 documents no AI Art endpoint for it. Tencent Cloud's Billing API has
``DescribeAccountBalance`` (``billing.intl.tencentcloudapi.com``, Version 2018-07-09, TC3-signed,
no parameters; ``Response.RealBalance`` etc., in cents): the whole account's cash, not the
ChangeClothes resource packages a run draws on first. Not a seed doc's and not verified: not
implemented.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from providers import settings
from providers.base import (
    Capabilities,
    OnSubmitted,
    TryOnClient,
    TryOnRequest,
    TryOnResult,
)
from providers.common import (
    ResponseContext,
    as_secret,
    body_snippet,
    classify_status,
    missing_key,
    send,
    staged_url,
    unsupported_category,
    unsupported_request,
)
from providers.tencent.errors import ERROR_TABLE, classify_code
from providers.tencent.settings import (
    CAPABILITIES,
    CLOTHES_TYPES,
    DEFAULT_BASE_URL,
    DEFAULT_REGION,
    NAME,
    PROFILE,
    REGION_ENV,
    SECRET_ID_ENV,
    SECRET_KEY_ENV,
    TOKEN_ENVS,
)
from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind

SERVICE = "aiart"
ACTION = "ChangeClothes"
VERSION = "2022-12-29"
ALGORITHM = "TC3-HMAC-SHA256"
CONTENT_TYPE = "application/json"
# Only the gateway's plain HTTP errors (no vendor JSON) lack a RequestId in the body.
REQUEST_ID_HEADERS = ("x-tc-requestid", "x-request-id")

RspImgType = Literal["url", "base64"]
_log = logging.getLogger(__name__)


# -- TC3-HMAC-SHA256 ---------------------------------------------------------------------------


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def tc3_date(timestamp: int) -> str:
    """The credential-scope date: the UTC day of ``timestamp``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def tc3_canonical_request(
    *,
    method: str,
    canonical_uri: str,
    canonical_query: str,
    headers: Mapping[str, str],
    payload: bytes,
) -> tuple[str, str]:
    """``(canonical request, signed headers)``: header names sorted, names and values lowercased
    and trimmed, as the TC3 specification prescribes."""
    normalized = sorted((k.strip().lower(), v.strip().lower()) for k, v in headers.items())
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in normalized)
    signed_headers = ";".join(k for k, _ in normalized)
    request = "\n".join(
        (
            method.upper(),
            canonical_uri,
            canonical_query,
            canonical_headers,
            signed_headers,
            _sha256_hex(payload),
        )
    )
    return request, signed_headers


def tc3_string_to_sign(*, timestamp: int, service: str, canonical_request: str) -> str:
    scope = f"{tc3_date(timestamp)}/{service}/tc3_request"
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{_sha256_hex(canonical_request.encode())}"


def tc3_signature(secret_key: str, *, date: str, service: str, string_to_sign: str) -> str:
    """Hex HMAC of ``string_to_sign`` under the key derived date -> service -> tc3_request."""
    k_date = _hmac(f"TC3{secret_key}".encode(), date)
    k_service = _hmac(k_date, service)
    k_signing = _hmac(k_service, "tc3_request")
    return hmac.new(k_signing, string_to_sign.encode(), hashlib.sha256).hexdigest()


def sign_tc3(
    *,
    secret_id: str,
    secret_key: str,
    host: str,
    payload: bytes,
    timestamp: int,
    service: str = SERVICE,
    content_type: str = CONTENT_TYPE,
    method: str = "POST",
    canonical_uri: str = "/",
    canonical_query: str = "",
) -> str:
    """The ``Authorization`` header value for one request, signing content-type and host.

    Pure: the same inputs always give the same header (``timestamp`` is Unix seconds).
    """
    canonical, signed_headers = tc3_canonical_request(
        method=method,
        canonical_uri=canonical_uri,
        canonical_query=canonical_query,
        headers={"content-type": content_type, "host": host},
        payload=payload,
    )
    to_sign = tc3_string_to_sign(timestamp=timestamp, service=service, canonical_request=canonical)
    signature = tc3_signature(
        secret_key, date=tc3_date(timestamp), service=service, string_to_sign=to_sign
    )
    return (
        f"{ALGORITHM} Credential={secret_id}/{tc3_date(timestamp)}/{service}/tc3_request, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )


# -- options -----------------------------------------------------------------------------------


class Rect(BaseModel):
    """``LogoRect``: where a custom logo goes in the result image (pixels, top-left origin)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    X: int = Field(ge=0)
    Y: int = Field(ge=0)
    Width: int = Field(gt=0)
    Height: int = Field(gt=0)


class LogoParam(BaseModel):
    """A custom logo instead of the vendor's "Generated by AI" text; passed through as given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    LogoUrl: str | None = None
    LogoImage: str | None = None  # base64; the vendor prefers LogoUrl when both are set
    LogoRect: Rect | None = None


class TencentOptions(BaseModel):
    """Optional request fields. Unset fields are not sent, so the vendor's defaults apply."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    logo_add: int | None = Field(
        default=None, description="LogoAdd: 1 add (vendor default), 0 not."
    )
    logo_param: LogoParam | None = None
    rsp_img_type: RspImgType = "url"

    def body_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"RspImgType": self.rsp_img_type}
        if self.logo_add is not None:
            fields["LogoAdd"] = self.logo_add
        if self.logo_param is not None:
            fields["LogoParam"] = self.logo_param.model_dump(exclude_none=True)
        return fields


# -- responses ---------------------------------------------------------------------------------


def parse_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    rsp_img_type: RspImgType = "url",
    redact: Iterable[str] = (),
) -> TryOnResult:
    """A ChangeClothes answer -> ``TryOnResult``, or a classified ``ProviderError``.

    Pure (no IO). ``rsp_img_type`` says how to read ``ResultImage``; ``redact``: secrets to
    blank out of any text taken from the response.
    """
    response = _vendor_response(body)
    body_id = response.get("RequestId") if response is not None else None
    ctx = ResponseContext(
        NAME,
        status,
        headers,
        redact=redact,
        request_id_headers=REQUEST_ID_HEADERS,
        request_id=body_id if isinstance(body_id, str) else None,
        read_retry_after=False,  # Tencent sends none, even with RequestLimitExceeded
    )
    if response is None:
        kind, code = _classify_status(status)
        snippet = body_snippet(body)
        ctx.fail(kind, code, f"HTTP {status} without Tencent's JSON Response: {snippet!r}")
    error = response.get("Error")
    if error is not None:
        code, message = _error_fields(error)
        spec = ERROR_TABLE.get(code)
        meaning = f" ({spec.meaning})" if spec else ""
        charged = spec.charged if spec else False
        ctx.fail(classify_code(code), code, f"{code}{meaning}: {message}", charged=charged)
    if status != 200:
        kind, code = _classify_status(status)
        ctx.fail(kind, code, f"HTTP {status} with a Response but no Error")
    return _success(response, ctx, rsp_img_type)


def _vendor_response(body: bytes) -> dict[str, Any] | None:
    """``body["Response"]`` when the body is Tencent's JSON envelope, else None."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("Response"), dict):
        return None
    response: dict[str, Any] = payload["Response"]
    return response


def _error_fields(error: object) -> tuple[str, str]:
    if not isinstance(error, dict):
        return "MalformedError", f"Response.Error is not an object: {str(error)[:200]!r}"
    code = error.get("Code")
    message = str(error.get("Message") or "")[:500]
    return (code if isinstance(code, str) and code else "MalformedError"), message


def _classify_status(status: int) -> tuple[ErrorKind, str]:
    """An answer without Tencent's envelope: a gateway, proxy or broken body."""
    if 200 <= status < 300:
        # A garbled or truncated 200 is transport trouble more often than a vendor answer.
        return ErrorKind.TRANSIENT, "MALFORMED_RESPONSE"
    return classify_status(status)


def _success(
    response: dict[str, Any], ctx: ResponseContext, rsp_img_type: RspImgType
) -> TryOnResult:
    image = response.get("ResultImage")
    if not isinstance(image, str) or not image:
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "success without Response.ResultImage")
    assert isinstance(image, str)
    if rsp_img_type == "url":
        if not image.lower().startswith(("http://", "https://")):
            ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "ResultImage is not a URL")
        return TryOnResult(result_url=image, request_id=ctx.request_id)
    encoded = image.split(",", 1)[1] if image.startswith("data:") else image  # tolerate a data URI
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "ResultImage is not valid base64")
    if not data:
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "ResultImage decodes to no bytes")
    return TryOnResult(result_data=data, request_id=ctx.request_id)


# -- the client --------------------------------------------------------------------------------


class TencentClient(TryOnClient):
    """Tencent AI Art ChangeClothes over httpx. Credentials are ``SecretStr``, never echoed."""

    name: ClassVar[str] = NAME
    capabilities: ClassVar[Capabilities] = CAPABILITIES

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile = PROFILE,
        secret_id: SecretStr,
        secret_key: SecretStr,
        base_url: str,
        region: str = DEFAULT_REGION,
        session_token: SecretStr | None = None,
        options: TencentOptions | None = None,
        timeout: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(http=http, profile=profile)
        secret_id, secret_key = as_secret(secret_id), as_secret(secret_key)
        if not secret_id.get_secret_value() or not secret_key.get_secret_value():
            raise missing_key(NAME, "the SecretId or SecretKey is empty")
        if not region.strip():
            raise ValueError("region must not be empty")
        self._secret_id = secret_id
        self._secret_key = secret_key
        self._token = as_secret(session_token) if session_token is not None else None
        self.base_url = base_url.rstrip("/")
        url = httpx.URL(self.base_url + "/")
        # The signed host must equal the Host header sent: with the port when non-default.
        self.host = url.host + (f":{url.port}" if url.port is not None else "")
        self.endpoint = str(url)
        self.canonical_uri = url.raw_path.decode("ascii").split("?", 1)[0] or "/"
        self.region = region.strip()
        self.options = options or TencentOptions()
        self.timeout = timeout
        self._clock = clock  # injectable so tests can sign in the past

    @classmethod
    def from_env(
        cls,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile = PROFILE,
        options: TencentOptions | None = None,
        timeout: float = 120.0,
    ) -> TencentClient:
        """SecretId/SecretKey from ``TENCENTCLOUD_SECRET_ID``/``_KEY``, region from
        ``TENCENTCLOUD_REGION``, base URL from ``TRYON_TENCENT_BASE_URL``."""
        secret_id = settings.credential(SECRET_ID_ENV)
        secret_key = settings.credential(SECRET_KEY_ENV)
        missing = [
            env for env, value in ((SECRET_ID_ENV, secret_id), (SECRET_KEY_ENV, secret_key))
            if value is None
        ]  # fmt: skip
        if missing:
            raise missing_key(NAME, f"{' and '.join(missing)} not set")
        assert secret_id is not None and secret_key is not None
        token = next((t for env in TOKEN_ENVS if (t := settings.credential(env))), None)
        return cls(
            http=http,
            profile=profile,
            secret_id=secret_id,
            secret_key=secret_key,
            session_token=token,
            base_url=settings.base_url(NAME, DEFAULT_BASE_URL),
            region=os.environ.get(REGION_ENV) or DEFAULT_REGION,
            options=options,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, region={self.region!r}, "
            f"rsp_img_type={self.options.rsp_img_type!r}, timeout={self.timeout!r})"
        )

    def request_body(self, request: TryOnRequest) -> dict[str, Any]:
        """The JSON body for ``request``; raises ``ProviderError`` for shapes Tencent lacks."""
        if request.garment is None:
            raise unsupported_request(NAME, "needs a garment image")
        if request.lower_garment is not None:
            raise unsupported_request(NAME, "no separate lower garment")
        clothes_type = CLOTHES_TYPES.get(request.category or "")
        if clothes_type is None:
            raise unsupported_category(NAME, request.category)
        return {
            "ModelUrl": staged_url(request.person, provider=NAME),
            "ClothesUrl": staged_url(request.garment, provider=NAME),
            "ClothesType": clothes_type,
            **self.options.body_fields(),
        }

    def signed_headers(self, payload: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        """Every header of one call, ``Authorization`` included, for ``payload``."""
        ts = int(self._clock()) if timestamp is None else timestamp
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Host": self.host,
            "X-TC-Action": ACTION,
            "X-TC-Version": VERSION,
            "X-TC-Region": self.region,
            "X-TC-Timestamp": str(ts),
            "Authorization": sign_tc3(
                secret_id=self._secret_id.get_secret_value(),
                secret_key=self._secret_key.get_secret_value(),
                host=self.host,
                payload=payload,
                timestamp=ts,
                canonical_uri=self.canonical_uri,
            ),
        }
        if self._token is not None:
            headers["X-TC-Token"] = self._token.get_secret_value()
        return headers

    async def try_on(
        self, request: TryOnRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult:
        """One synchronous call (no job id exists, so ``on_submitted`` is unused)."""
        payload = json.dumps(self.request_body(request), separators=(",", ":")).encode()
        secrets = self._secrets()
        response = await send(
            self.http,
            "POST",
            self.endpoint,
            provider=NAME,
            timeout=self.timeout,
            secrets=secrets,
            content=payload,
            headers=self.signed_headers(payload),
        )
        _log.debug("tencent %s -> HTTP %s", ACTION, response.status_code)
        return parse_response(
            response.status_code,
            response.headers,
            response.content,
            rsp_img_type=self.options.rsp_img_type,
            redact=secrets,
        )

    def _secrets(self) -> list[str]:
        values = [self._secret_key, self._secret_id, self._token]
        return [v.get_secret_value() for v in values if v is not None]
