"""Tencent Cloud AI Art ChangeClothes (doc 002) as the emulator speaks it: API 3.0 over ``POST /``.

Strict like the real gateway: the common parameters in ``X-TC-*`` headers and the
TC3-HMAC-SHA256 ``Authorization`` header are checked (signature recomputed here, independently
of the client's code, with the key ``TENCENTCLOUD_SECRET_KEY`` the emulator accepts), then the
body. Every answer is HTTP 200 with ``{"Response": {..., "RequestId"}}``; errors carry
``Response.Error.{Code, Message}`` (the official SDK only reads errors from a body whose
Content-Type is exactly ``application/json``, which is what we send).

Our decisions where the document is silent (UNVERIFIED against the live service):
- A missing ``Authorization`` header is ``MissingParameter``; a malformed one, a foreign service
  or unsigned content-type/host is ``AuthFailure.InvalidAuthorization``; a SecretId not shaped
  like Tencent's (``AKID...``) is ``AuthFailure.InvalidSecretId``, an unknown one
  ``AuthFailure.SecretIdNotFound``; a timestamp more than 300 s off ``AuthFailure.SignatureExpire``.
- Image limits: each side must be > 512 and < 3000 px (the parameter description) and the area at
  most 2000x2000 px (the ``ImageResolutionExceed`` text): both statements hold at once. Sides of
  512 px or less answer ``InvalidParameterValue.ParameterValueError`` (no code in the table
  fits); larger ones ``FailedOperation.ImageResolutionExceed``. Base64 size must be < 8 MB
  (``FailedOperation.ImageSizeExceed``).
- Missing or empty image URLs are ``InvalidParameterValue.ImageEmpty``; a missing ClothesType
  ``MissingParameter``; undeclared fields ``UnknownParameter``.
- Concurrency: at most ``concurrency_limit`` calls are processed at once (doc: 1 per account by
  default); more answer ``RequestLimitExceeded.JobNumExceed`` at once. Set it with
  ``TRYON_EMULATOR_TENCENT_CONCURRENCY`` before the emulator starts. The fault plan's latency is
  spent inside that slot: it stands for generation time.
- Injected faults: a "429" is the gateway's frequency limit, which Tencent answers as HTTP 200
  ``RequestLimitExceeded`` (no Retry-After); a 5xx is the load balancer's HTML 503; a timeout
  hangs, then answers ``FailedOperation.RequestTimeout``; exhausted credits answer
  ``ResourceUnavailable.LowBalance``. Forced codes are Tencent code strings (an int 429 or 5xx
  means the fault of that name).
- Results: ``RspImgType`` defaults to base64 (the doc's default); ``url`` results expire after
  ``result_ttl_s`` (1 h by default, like Tencent's). With ``LogoAdd`` absent or not 0, "Generated
  by AI" is written bottom-right (the vendor's default logo), or the ``LogoParam`` image is pasted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import logging
import os
import time
import uuid
from datetime import UTC, datetime
from functools import partial

from PIL import Image, ImageDraw, ImageFont
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from emulator import common, composite
from emulator.common import (
    GatewayAnswers,
    InputError,
    cache_key,
    fetch_url,
    pass_gateway,
    sleep_unless_disconnected,
)
from emulator.keys import accepted_key
from emulator.state import EmulatorState, QuotaError, QuotaTicket
from emulator.tencent_wire import (
    ACTION,
    CODES,
    DEFAULT_LOGO_TEXT,
    MAX_SKEW_S,
    REGION,
    SERVICE,
    VERSION,
    TencentCall,
    VendorError,
    check_image,
    expected_signature,
    parse_authorization,
    parse_body,
)

PROVIDER = "tencent"
PATH = "/"
SECRET_ID_ENV = "TENCENTCLOUD_SECRET_ID"
SECRET_KEY_ENV = "TENCENTCLOUD_SECRET_KEY"
TOKEN_ENV = "TENCENTCLOUD_TOKEN"  # a session token the emulator accepts, when set
CONCURRENCY_ENV = "TRYON_EMULATOR_TENCENT_CONCURRENCY"
DEFAULT_CONCURRENCY_LIMIT = 1  # doc 002: 1 concurrent task per account by default

_log = logging.getLogger(__name__)


def routes(state: EmulatorState) -> list[Route]:
    """Tencent's endpoint (the root path), bound to the shared state."""
    api = TencentApi(state, concurrency_limit=_concurrency_from_env())
    return [Route(PATH, api.handle, methods=["POST"], name="tencent_api")]


def _concurrency_from_env() -> int:
    raw = os.environ.get(CONCURRENCY_ENV)
    if not raw:
        return DEFAULT_CONCURRENCY_LIMIT
    value = int(raw)
    if value < 1:
        raise ValueError(f"{CONCURRENCY_ENV} must be >= 1, got {value}")
    return value


class TencentApi:
    """One emulated account: its keys, its concurrency slot(s), its calls."""

    def __init__(self, state: EmulatorState, *, concurrency_limit: int) -> None:
        self.state = state
        self.provider = state.provider(PROVIDER)
        self.secret_id = accepted_key(SECRET_ID_ENV)
        self.secret_key = accepted_key(SECRET_KEY_ENV)
        self.token = os.environ.get(TOKEN_ENV) or None
        self.concurrency_limit = concurrency_limit
        self.processing = 0  # calls holding a concurrency slot (the loop is single-threaded)

    async def handle(self, request: Request) -> Response:
        ps = self.provider
        request_id = str(uuid.uuid4())
        answers = GatewayAnswers(
            # A hang ends in the service's RequestTimeout, counted once (as the timeout).
            timed_out=partial(
                self._json_error, request_id, "FailedOperation.RequestTimeout", record=False
            ),
            # Tencent's frequency limit is HTTP 200 RequestLimitExceeded, without Retry-After.
            rate_limited=partial(self._json_error, request_id, "RequestLimitExceeded"),
            unavailable=partial(_html_error, 503),
            # Forced codes are answered only once the caller is authenticated (below).
        )
        # The latency stays: it is spent inside the concurrency slot, standing for generation.
        admitted = await pass_gateway(request, ps, answers, spend_latency=False)
        if isinstance(admitted, Response):
            return admitted
        body = admitted.body
        ticket: QuotaTicket | None = None
        try:
            secret_id = self._authenticate(request, body)
            forced = ps.pop_forced()
            if forced is not None:
                return self._forced(request_id, forced)
            call = parse_body(body)
            if self.processing >= self.concurrency_limit:
                raise VendorError("RequestLimitExceeded.JobNumExceed")
            try:
                ticket = ps.take_quota(secret_id, None)
            except QuotaError:
                raise VendorError("ResourceUnavailable.LowBalance") from None
            self.processing += 1
            try:
                result = await self._process(request, call, admitted.latency_s)
            finally:
                self.processing -= 1
        except VendorError as exc:
            if ticket is not None:
                ticket.refund()
            return self._json_error(request_id, exc.code, exc.detail)
        except Exception:
            if ticket is not None:
                ticket.refund()
            _log.exception("emulator: tencent call failed")
            return self._json_error(request_id, "FailedOperation.InnerError", "emulator failure")
        if result is None:  # the client hung up while "generating": nobody to answer, no charge
            if ticket is not None:
                ticket.refund()
            return Response(status_code=499)
        assert ticket is not None
        ticket.commit()
        ps.record(200)
        if call.rsp_img_type == "url":
            image = common.store_result(self.state, common.base_url(request), result)
        else:
            image = base64.b64encode(result).decode("ascii")
        return JSONResponse({"Response": {"ResultImage": image, "RequestId": request_id}})

    # -- the gateway: common parameters and the TC3 signature --------------------------------

    def _authenticate(self, request: Request, body: bytes) -> str:
        """The caller's SecretId once headers and signature check out."""
        headers = request.headers
        for name, param in (
            ("x-tc-action", "Action"),
            ("x-tc-version", "Version"),
            ("x-tc-timestamp", "Timestamp"),
            ("authorization", "Authorization"),
        ):
            if not headers.get(name, "").strip():
                raise VendorError(
                    "MissingParameter", f"The request is missing a required parameter `{param}`."
                )
        raw_ts = headers["x-tc-timestamp"].strip()
        if not raw_ts.isdecimal():
            raise VendorError("InvalidParameter", "`Timestamp` must be a Unix time in seconds.")
        timestamp = int(raw_ts)
        secret_id, date, service, signed, signature = parse_authorization(headers["authorization"])
        if service != SERVICE:
            raise VendorError(
                "AuthFailure.InvalidAuthorization",
                "The request `Authorization` header does not conform to tencentcloud standards: "
                "`Service` in Credential not valid.",
            )
        if not {"content-type", "host"} <= set(signed):
            raise VendorError(
                "AuthFailure.InvalidAuthorization", "SignedHeaders must include content-type;host."
            )
        missing = [h for h in signed if h not in headers]
        if missing:
            raise VendorError(
                "AuthFailure.InvalidAuthorization", f"Signed header `{missing[0]}` is not sent."
            )
        if abs(time.time() - timestamp) > MAX_SKEW_S:
            raise VendorError("AuthFailure.SignatureExpire")
        if not hmac.compare_digest(secret_id.encode(), self.secret_id.encode()):
            echo = common.echoed(self.state.config.echo_credentials, "SecretId", secret_id)
            if not secret_id.startswith("AKID"):
                raise VendorError("AuthFailure.InvalidSecretId", echo)
            raise VendorError("AuthFailure.SecretIdNotFound", echo)
        if date != datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d"):
            raise VendorError(
                "AuthFailure.SignatureFailure", "Credential date differs from the Timestamp's."
            )
        expected = expected_signature(request, body, signed, timestamp, date, self.secret_key)
        if not hmac.compare_digest(signature, expected):
            raise VendorError("AuthFailure.SignatureFailure")
        token = headers.get("x-tc-token")
        if token is not None and (
            self.token is None or not hmac.compare_digest(token.encode(), self.token.encode())
        ):
            raise VendorError("AuthFailure.TokenFailure")
        action = headers["x-tc-action"].strip()
        if action != ACTION:
            raise VendorError("InvalidAction", f"The requested action `{action}` does not exist.")
        version = headers["x-tc-version"].strip()
        if version != VERSION:
            raise VendorError(
                "NoSuchVersion",
                f"The requested version `{version}` of service `{SERVICE}` does not exist.",
            )
        region = headers.get("x-tc-region", "").strip()
        if not region:
            raise VendorError(
                "MissingParameter", "The request is missing a required parameter `Region`."
            )
        if not REGION.match(region):
            raise VendorError("UnsupportedRegion", f"The region `{region}` is not supported.")
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise VendorError("InvalidParameter", "Content-Type must be application/json.")
        return secret_id

    # -- the service ------------------------------------------------------------------------

    async def _process(self, request: Request, call: TencentCall, latency_s: float) -> bytes | None:
        """The composite's bytes (WEBP), or None when the client hung up meanwhile."""
        config = self.state.config
        # The plan's latency is spent inside the concurrency slot: it stands for generation.
        if await sleep_unless_disconnected(request, latency_s):
            return None
        person = await self._image(call.model_url, "ModelUrl")
        garment = await self._image(call.clothes_url, "ClothesUrl")
        model_size = check_image(person, "ModelUrl")
        check_image(garment, "ClothesUrl")
        logo: bytes | None = None
        if call.logo_add and (call.logo_url or call.logo_image):
            logo = await self._logo(call)
        max_side = config.composite_max_side
        logo_key = hashlib.sha256(logo).hexdigest() if logo else ("text" if call.logo_add else "")
        rect = call.logo_rect
        if config.fast_mode:
            key = cache_key("tencent-fast", call.category, str(max_side), logo_key, repr(rect))
        else:
            key = cache_key(
                "tencent", call.category, str(max_side), logo_key, repr(rect), person, garment
            )
        compute = partial(
            _render,
            person,
            garment,
            call.category,
            max_side=max_side,
            fast=config.fast_mode,
            logo_add=call.logo_add,
            logo=logo,
            logo_rect=rect,
            model_size=model_size,
        )
        try:
            rendered: bytes = await self.state.composites.get_or_compute(key, compute)
            return await common.handed_out(self.state, self.provider, rendered, person)
        except composite.UndecodableImage as exc:
            raise VendorError("FailedOperation.ImageDecodeFailed", str(exc)) from None

    async def _image(self, url: str, field: str) -> bytes:
        try:
            return await fetch_url(self.state.http, url, field, self.state.config.max_image_bytes)
        except InputError as exc:
            raise VendorError("FailedOperation.ImageDownloadError", str(exc)) from None

    async def _logo(self, call: TencentCall) -> bytes:
        if call.logo_url:
            return await self._image(call.logo_url, "LogoParam.LogoUrl")
        assert call.logo_image is not None
        try:
            return base64.b64decode(call.logo_image, validate=True)
        except (binascii.Error, ValueError):
            raise VendorError(
                "InvalidParameterValue.ParameterValueError", "LogoImage is not valid base64."
            ) from None

    # -- answers ----------------------------------------------------------------------------

    def _forced(self, request_id: str, forced: int | str) -> Response:
        if isinstance(forced, int) and forced == 429:
            return self._json_error(request_id, "RequestLimitExceeded")
        if isinstance(forced, int) and forced >= 500:
            self.provider.record(forced)
            return _html_error(forced)
        return self._json_error(request_id, str(forced), "injected by the emulator's fault plan")

    def _json_error(
        self, request_id: str, code: str, detail: str | None = None, *, record: bool = True
    ) -> JSONResponse:
        if record:
            self.provider.record(code)
        message = detail or CODES.get(code) or "Error."
        return JSONResponse(
            {"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id}}
        )


def _html_error(status: int) -> Response:
    """A gateway/load-balancer error: HTML, not Tencent's JSON."""
    body = f"<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>"
    return HTMLResponse(body, status_code=status)


def _render(
    person: bytes,
    garment: bytes,
    category: str,
    *,
    max_side: int,
    fast: bool,
    logo_add: bool,
    logo: bytes | None,
    logo_rect: tuple[int, int, int, int] | None,
    model_size: tuple[int, int],
) -> bytes:
    """The composite (WEBP) with the vendor's logo; CPU-bound, runs in a worker thread."""
    if fast:
        rendered = composite.prerendered(
            "garment", category, max_side, common.vendor_tag("tencent")
        )
    else:
        rendered = composite.render_garment(
            person, garment, category, max_side=max_side, tag=common.vendor_tag("tencent")
        )
    if not logo_add:
        return rendered.result
    image = Image.open(io.BytesIO(rendered.result)).convert("RGB")
    if logo is None:
        _draw_text_logo(image)
    else:
        try:
            mark = composite.decode(logo, max_side)
        except composite.UndecodableImage as exc:
            raise composite.UndecodableImage(f"LogoParam: {exc}") from None
        # LogoRect is in the generated image's pixels, which are the model photo's.
        scale = image.width / model_size[0]
        if logo_rect is None:
            w = max(1, image.width // 5)
            h = max(1, round(mark.height * w / mark.width))
            box = (image.width - w - 8, image.height - h - 8, w, h)
        else:
            x, y, w, h = (max(1, round(v * scale)) for v in logo_rect)
            box = (x, y, w, h)
        image.paste(mark.resize(box[2:], Image.Resampling.LANCZOS), box[:2])
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=composite.WEBP_QUALITY, method=2)
    return buffer.getvalue()


def _draw_text_logo(image: Image.Image) -> None:
    """ "Generated by AI" in the bottom-right corner, white on a dark box."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, image.height // 40))
    left, top, right, bottom = draw.textbbox((0, 0), DEFAULT_LOGO_TEXT, font=font)
    pad = 3
    x = image.width - (right - left) - 3 * pad
    y = image.height - (bottom - top) - 3 * pad
    draw.rectangle(
        (x - pad, y - pad, x + right - left + pad, y + bottom - top + pad), fill=(0, 0, 0)
    )
    draw.text((x - left, y - top), DEFAULT_LOGO_TEXT, fill=(255, 255, 255), font=font)
