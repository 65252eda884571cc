"""FASHN virtual try-on client: ``POST /v1/run``, then ``GET /v1/status/{id}`` until done.

Protocol (docs.fashn.ai: api-overview/api-fundamentals, api-reference/tryon-v1-6,
api-overview/error-handling, utility-endpoints/credits; the official SDKs' reference,
fashn-ai/fashn-skill ``reference.md``, "verified against the TypeScript SDK fashn@0.15.0"):

- ``POST /v1/run``, ``Authorization: Bearer <key>``, JSON ``{"model_name": "tryon-v1.6",
  "inputs": {"model_image", "garment_image", "category", ...}}``; images as URL or base64 with
  the ``data:image/<format>;base64,`` prefix. Answer: ``{"id": "...", "error": null}``.
- ``GET /v1/status/{id}``: ``{"id", "status": starting | in_queue | processing | completed |
  failed, "output": [url, ...], "error": null | {"name", "message"}}``. Output URLs last 72 h.
- ``GET /v1/credits``: ``{"credits": {"total", "subscription", "on_demand"}}``.
- Errors: see ``errors.py``.

UNVERIFIED (nothing we could read says): whether a 429 carries ``Retry-After`` (honoured when
it does, else backoff); how /v1/status answers an id it has forgotten (404 ``NotFound`` per the
errors table, "no longer tracked": read as the job gone, permanent); the failed-status
``error`` sometimes being a bare string (accepted, as the name). Webhooks (``webhook_url``)
exist in the API but are not used: polling is what a batch worker without a public address
can do.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from providers import settings as provider_settings
from providers.base import (
    AsyncJobClient,
    Capabilities,
    JobState,
    JobStatus,
    PollPolicy,
    PreparedImage,
    TryOnRequest,
    TryOnResult,
)
from providers.common import (
    ErrorSpec,
    ResponseContext,
    body_snippet,
    key_from_env,
    require_key,
    send,
    unsupported_category,
    unsupported_request,
)
from providers.fashn.errors import (
    API_ERRORS,
    NOT_FOUND,
    RUNTIME_ERRORS,
    classify_api_error,
)
from providers.fashn.settings import (
    API_KEY_ENV,
    CAPABILITIES,
    CATEGORIES,
    CREDITS_PATH,
    DEFAULT_BASE_URL,
    NAME,
    PROFILE,
    RUN_PATH,
    STATUS_PATH,
    model_name,
)
from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind

REQUEST_ID_HEADERS = ("x-request-id",)
STATES: Mapping[str, JobState] = {
    "starting": JobState.QUEUED,
    "in_queue": JobState.QUEUED,
    "processing": JobState.RUNNING,
    "completed": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
    # The SDKs' subscribe() may resolve to these (client-side ends); read as failed if sent.
    "canceled": JobState.FAILED,
    "time_out": JobState.FAILED,
}
# v1.6 takes 5-17 s by mode (api-reference/tryon-v1-6), more when queued. From 2 s up to 5 s
# between polls: with the default 6 in flight at most 3 /status calls a second, within the
# documented 50 per 10 s; ten minutes before giving up (a rerun resumes polling the id).
DEFAULT_POLL_POLICY = PollPolicy(initial_s=2.0, max_interval_s=5.0, factor=1.5, deadline_s=600.0)

_log = logging.getLogger(__name__)


# -- pure parsing: a response (status, headers, body) -> value or classified ProviderError -----


def _context(
    status: int, headers: Mapping[str, str], redact: Iterable[str], request_id: str | None = None
) -> ResponseContext:
    return ResponseContext(
        NAME,
        status,
        headers,
        redact=redact,
        request_id_headers=REQUEST_ID_HEADERS,
        request_id=request_id,
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _ok_payload(ctx: ResponseContext, body: bytes) -> dict[str, Any]:
    """The JSON object of a 200 answer; any other answer raises its classified error."""
    payload = _json_object(body)
    # A failed prediction's status answer carries ``error`` too: a 200 is an error answer only
    # without any of the endpoints' own fields.
    if (
        ctx.status == 200
        and payload is not None
        and (not _text(payload.get("error")) or {"id", "status", "credits"} & set(payload))
    ):
        return payload
    if payload is None or not (_text(payload.get("error")) or _text(payload.get("message"))):
        if ctx.status == 200:
            ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "HTTP 200 without a JSON object")
        kind, code = classify_api_error(ctx.status, "")
        ctx.fail(kind, code, f"HTTP {ctx.status} without FASHN's JSON: {body_snippet(body)!r}")
    name = _text(payload.get("error"))
    message = _text(payload.get("message"))[:500] or "no message"
    kind, code = classify_api_error(ctx.status, name)
    spec = API_ERRORS.get(name)
    meaning = f" ({spec.meaning})" if spec else ""
    ctx.fail(kind, code, f"HTTP {ctx.status}, {name or 'no error name'}{meaning}: {message}")


def parse_run_response(
    status: int, headers: Mapping[str, str], body: bytes, *, redact: Iterable[str] = ()
) -> str:
    """A /v1/run answer -> the prediction id, or a classified ``ProviderError``."""
    ctx = _context(status, headers, redact)
    payload = _ok_payload(ctx, body)
    prediction_id = _text(payload.get("id"))
    if not prediction_id:
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "/v1/run answered 200 without an id")
    return prediction_id


def runtime_error(
    ctx: ResponseContext,
    prediction_id: str,
    error: object,
    table: Mapping[str, ErrorSpec] = RUNTIME_ERRORS,
) -> JobStatus:
    """A failed prediction's ``error`` ({name, message}, or a bare name) -> a FAILED status
    carrying the classified error."""
    if isinstance(error, dict):
        name, message = _text(error.get("name")), _text(error.get("message"))
    else:
        name, message = _text(error), ""
    spec = table.get(name)
    kind = spec.kind if spec else ErrorKind.PERMANENT
    code = name or "JOB_FAILED"
    meaning = f" ({spec.meaning})" if spec else ""
    text = f"prediction {prediction_id} failed: {name or 'no error name'}{meaning}"
    failure = ctx.error(kind, code, text + (f": {message[:300]}" if message else ""))
    return JobStatus(state=JobState.FAILED, error=failure)


def parse_status_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    prediction_id: str,
    redact: Iterable[str] = (),
    runtime_errors: Mapping[str, ErrorSpec] = RUNTIME_ERRORS,
) -> JobStatus:
    """A /v1/status/{id} answer -> ``JobStatus``; a failed prediction carries its classified
    error. Raises for answers about the call, not the prediction (auth, rate limits, 5xx); a
    404 is the prediction no longer tracked: the job is gone (failed, permanent)."""
    ctx = _context(status, headers, redact, request_id=prediction_id)
    if status == 404:
        payload = _json_object(body) or {}
        if _text(payload.get("error")) in ("", NOT_FOUND):
            message = _text(payload.get("message")) or "prediction not found"
            gone = ctx.error(ErrorKind.PERMANENT, NOT_FOUND, f"{prediction_id}: {message[:300]}")
            return JobStatus(state=JobState.FAILED, error=gone)
    payload = _ok_payload(ctx, body)
    answered = _text(payload.get("id"))
    if answered and answered != prediction_id:
        ctx.fail(ErrorKind.PERMANENT, "ID_MISMATCH", f"asked for {prediction_id}, got {answered}")
    value = _text(payload.get("status"))
    state = STATES.get(value)
    if state is None:
        # Loud on purpose: a status we cannot read means this client is out of date.
        ctx.fail(ErrorKind.PERMANENT, "UNKNOWN_STATUS", f"status {value!r} is not one we know")
    if state is JobState.FAILED:
        error = payload.get("error") or value
        return runtime_error(ctx, prediction_id, error, runtime_errors)
    if state is not JobState.SUCCEEDED:
        return JobStatus(state=state)
    output = payload.get("output")
    first = output[0] if isinstance(output, list) and output else None
    url = _text(first)
    if not url:
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "completed without an output URL")
    extra = {"prediction_id": prediction_id, "outputs": str(len(output))}  # type: ignore[arg-type]
    if url.startswith("data:"):  # return_base64: the image itself (kept 60 minutes)
        data = _data_uri_bytes(url)
        if data is None:
            ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "output is not a base64 image")
        return JobStatus(
            state=JobState.SUCCEEDED,
            result=TryOnResult(result_data=data, request_id=prediction_id, extra=extra),
        )
    return JobStatus(
        state=JobState.SUCCEEDED,
        result=TryOnResult(result_url=url, request_id=prediction_id, extra=extra),
    )


def parse_credits_response(
    status: int, headers: Mapping[str, str], body: bytes, *, redact: Iterable[str] = ()
) -> int:
    """A /v1/credits answer -> the credits left (``credits.total``, subscription plus
    on-demand), or a classified ``ProviderError`` (a bad key is fatal)."""
    ctx = _context(status, headers, redact)
    payload = _ok_payload(ctx, body)
    credits = payload.get("credits")
    total = credits.get("total") if isinstance(credits, dict) else None
    # bool is an int to Python, and json.loads takes NaN and Infinity: none is a balance.
    if isinstance(total, bool) or not isinstance(total, int | float) or not math.isfinite(total):
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "/v1/credits without credits.total")
    return max(0, math.floor(total))


def _data_uri_bytes(value: str) -> bytes | None:
    head, sep, data = value.partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        return None


# -- the client ---------------------------------------------------------------------------------


class FashnClient(AsyncJobClient):
    """FASHN try-on over httpx. The API key is held as ``SecretStr`` and never echoed."""

    name: ClassVar[str] = NAME
    capabilities: ClassVar[Capabilities] = CAPABILITIES
    poll_policy: PollPolicy = DEFAULT_POLL_POLICY

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile = PROFILE,
        api_key: SecretStr | str,
        base_url: str,
        model: str | None = None,
        inputs: Mapping[str, Any] | None = None,
        poll_policy: PollPolicy | None = None,
        timeout: float = 60.0,
    ) -> None:
        """``model``: the ``model_name`` (default ``TRYON_FASHN_MODEL``, else tryon-v1.6);
        ``inputs``: more ``inputs`` fields sent with every prediction (``mode``,
        ``garment_photo_type``, ``moderation_level``, ``seed``...; the vendor's defaults
        otherwise)."""
        super().__init__(http=http, profile=profile)
        self._api_key = require_key(api_key, provider=NAME)
        self.base_url = base_url.rstrip("/")
        self.model = (model or model_name()).strip()
        reserved = {"model_image", "garment_image", "category"} & set(inputs or {})
        if reserved:
            raise ValueError(f"inputs may not set {sorted(reserved)}: each request does")
        self.inputs: dict[str, Any] = dict(inputs or {})
        if poll_policy is not None:
            self.poll_policy = poll_policy
        self.timeout = timeout

    @classmethod
    def from_env(
        cls, *, http: httpx.AsyncClient, profile: ImageProfile = PROFILE, **options: Any
    ) -> FashnClient:
        """Key from ``FASHN_API_KEY``, base URL from ``TRYON_FASHN_BASE_URL``, model from
        ``TRYON_FASHN_MODEL``; ``options`` are the constructor's."""
        return cls(
            http=http,
            profile=profile,
            api_key=key_from_env(API_KEY_ENV, provider=NAME),
            base_url=provider_settings.base_url(NAME, DEFAULT_BASE_URL),
            **options,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    # -- submit ---------------------------------------------------------------------------------

    def build_body(self, request: TryOnRequest) -> dict[str, Any]:
        """The /v1/run JSON for ``request``; shapes FASHN cannot take raise before sending."""
        if request.garment is None or request.lower_garment is not None:
            raise unsupported_request(
                NAME, "needs exactly one garment (no separate lower garment, no prompt)"
            )
        category = CATEGORIES.get(request.category or "")
        if category is None:
            raise unsupported_category(NAME, request.category)
        inputs = {
            **self.inputs,
            "model_image": _data_uri(request.person),
            "garment_image": _data_uri(request.garment),
            "category": category,
        }
        return {"model_name": self.model, "inputs": inputs}

    async def submit(self, request: TryOnRequest) -> str:
        """Start one prediction; returns its id (a credit is spent from here)."""
        body = self.build_body(request)
        response = await self._send("POST", RUN_PATH, json=body)
        _log.debug("fashn run -> HTTP %s", response.status_code)
        return parse_run_response(
            response.status_code, response.headers, response.content, redact=self._secrets()
        )

    # -- poll -----------------------------------------------------------------------------------

    async def poll(self, job_id: str) -> JobStatus:
        path = STATUS_PATH.format(id=quote(job_id, safe=""))  # an id is ours to send as sent
        response = await self._send("GET", path, request_id=job_id)
        _log.debug("fashn status -> HTTP %s", response.status_code)
        return parse_status_response(
            response.status_code,
            response.headers,
            response.content,
            prediction_id=job_id,
            redact=self._secrets(),
        )

    # -- balance --------------------------------------------------------------------------------

    async def credits_balance(self) -> int | None:
        """The account's credits left (``GET /v1/credits``, ``credits.total``); a try-on takes
        one (``settings.CREDITS_PER_IMAGE``). Raises a classified ``ProviderError``."""
        response = await self._send("GET", CREDITS_PATH)
        _log.debug("fashn credits -> HTTP %s", response.status_code)
        return parse_credits_response(
            response.status_code, response.headers, response.content, redact=self._secrets()
        )

    # -- transport ------------------------------------------------------------------------------

    def _secrets(self) -> list[str]:
        return [self._api_key.get_secret_value()]

    async def _send(
        self, method: str, path: str, *, request_id: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        key = self._api_key.get_secret_value()
        return await send(
            self.http,
            method,
            self.base_url + path,
            provider=NAME,
            timeout=self.timeout,
            secrets=[key],
            request_id=request_id,
            headers={"Authorization": f"Bearer {key}"},
            **kwargs,
        )


def _data_uri(image: PreparedImage) -> str:
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
