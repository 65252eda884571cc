"""fal.ai queue client: one class for every try-on model fal resells, each spec a subclass
naming its model (``model``, ``settings.FalModel``: queue path, input names, categories).

``submit`` POSTs ``{base}/{model_id}`` (JSON, ``Authorization: Key <FAL_KEY>``) and keeps the
``request_id``; ``poll`` GETs ``{base}/{app_id}/requests/{id}/status`` and, once ``COMPLETED``,
``{base}/{app_id}/requests/{id}`` for the output (``images[0].url`` or ``image.url``) or the
error. Images go as data URIs. Polling is the only mode: a batch worker has no public address
for fal's webhooks (``fal_webhook``), so none is sent. Sources and what is not verified:
``settings.py`` and ``errors.py``.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Self

import httpx
from pydantic import SecretStr

from providers import settings
from providers.base import (
    AsyncJobClient,
    Capabilities,
    JobState,
    JobStatus,
    PollPolicy,
    PreparedImage,
    ProviderError,
    TryOnRequest,
    TryOnResult,
)
from providers.common import (
    ErrorSpec,
    ResponseContext,
    body_snippet,
    classify_status,
    key_from_env,
    require_key,
    send,
    unsupported_category,
    unsupported_request,
)
from providers.fal.errors import (
    ACCOUNT_ERRORS,
    EXHAUSTED_BALANCE,
    MODEL_ERRORS,
    REQUEST_ERRORS,
)
from providers.fal.settings import ACCOUNT, API_KEY_ENV, DEFAULT_BASE_URL, FASHN, KOLORS, FalModel
from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind

# FASHN takes 5-17 s a try-on (docs.fashn.ai); start at 1 s and never poll one request more
# than about once a second, well inside any per-user rate; 10 minutes before giving up (a
# rerun resumes polling the request id).
DEFAULT_POLL_POLICY = PollPolicy(initial_s=1.0, max_interval_s=5.0, factor=1.5, deadline_s=600.0)
REQUEST_ID_HEADERS = ("x-fal-request-id", "x-request-id")
ERROR_TYPE_HEADER = "x-fal-error-type"
_STATES = {"IN_QUEUE": JobState.QUEUED, "IN_PROGRESS": JobState.RUNNING}

_log = logging.getLogger(__name__)


# -- pure parsing: a response (status, headers, body) -> value or classified ProviderError -----


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def error_from(ctx: ResponseContext, body: bytes, headers: Mapping[str, str]) -> ProviderError:
    """The ``ProviderError`` for a non-2xx answer: a model error (``detail`` list, by its
    ``type``), a request error (``error_type``, body or header), an account answer (401, 403;
    an exhausted balance is ``INSUFFICIENT_CREDITS``), else the status alone."""
    status = ctx.status
    payload = _json(body)
    detail = payload.get("detail") if isinstance(payload, dict) else None
    lowered = {k.lower(): v for k, v in headers.items()}
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        kind_name = str(first.get("type") or "")
        loc = ".".join(str(p) for p in first.get("loc") or [] if p != "body")
        message = (
            f"HTTP {status} {kind_name} at {loc or 'body'}: {str(first.get('msg') or '')[:300]}"
        )
        spec = MODEL_ERRORS.get(kind_name)
        if spec is not None:
            return ctx.error(spec.kind, kind_name.upper(), message, charged=spec.charged)
        kind, _ = classify_status(status, fatal=())
        return ctx.error(kind, "INVALID_INPUT" if status == 422 else f"HTTP_{status}", message)
    text = str(detail)[:300] if isinstance(detail, str) else body_snippet(body)
    error_type = (payload.get("error_type") if isinstance(payload, dict) else None) or lowered.get(
        ERROR_TYPE_HEADER
    )
    if isinstance(error_type, str) and error_type in REQUEST_ERRORS:
        spec = REQUEST_ERRORS[error_type]
        return ctx.error(spec.kind, error_type.upper(), f"HTTP {status} {error_type}: {text}")
    if status == 403 and EXHAUSTED_BALANCE in text.lower():
        return ctx.error(ErrorKind.FATAL, "INSUFFICIENT_CREDITS", f"HTTP 403: {text}")
    account: ErrorSpec | None = ACCOUNT_ERRORS.get(status)
    if account is not None:
        return ctx.error(account.kind, account.name or f"HTTP_{status}", f"HTTP {status}: {text}")
    kind, code = classify_status(status, fatal=())
    return ctx.error(kind, code, f"HTTP {status}: {text}")


def parse_submit_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    redact: Iterable[str] = (),
    provider: str = ACCOUNT,
) -> str:
    """A submit answer -> the request id, or a classified ``ProviderError``. A 404 means the
    model path is wrong: no row can succeed (FATAL ``UNKNOWN_MODEL``)."""
    ctx = ResponseContext(
        provider, status, headers, redact=redact, request_id_headers=REQUEST_ID_HEADERS
    )
    if not 200 <= status < 300:
        if status == 404:
            ctx.fail(ErrorKind.FATAL, "UNKNOWN_MODEL", f"HTTP 404: {body_snippet(body)!r}")
        raise error_from(ctx, body, headers)
    payload = _json(body)
    request_id = payload.get("request_id") if isinstance(payload, dict) else None
    if not isinstance(request_id, str) or not request_id:
        ctx.fail(
            ErrorKind.PERMANENT, "MALFORMED_RESPONSE", f"no request_id: {body_snippet(body)!r}"
        )
    return request_id


def parse_status_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    request_id: str,
    redact: Iterable[str] = (),
    provider: str = ACCOUNT,
) -> tuple[JobState | None, str | None]:
    """A status answer -> ``(QUEUED | RUNNING, None)``, ``(None, error or None)`` once
    ``COMPLETED`` (``error``: the request failed, the result tells how), or raises: an unknown
    request is a FAILED job (``REQUEST_NOT_FOUND``) reported by raising PERMANENT."""
    ctx = ResponseContext(provider, status, headers, redact=redact, request_id=request_id)
    if status == 404:
        ctx.fail(ErrorKind.PERMANENT, "REQUEST_NOT_FOUND", f"request {request_id} is not known")
    if not 200 <= status < 300:
        raise error_from(ctx, body, headers)
    payload = _json(body)
    value = payload.get("status") if isinstance(payload, dict) else None
    if value in _STATES:
        return _STATES[value], None
    if value == "COMPLETED":
        assert isinstance(payload, dict)
        error = payload.get("error") or payload.get("error_type")
        return None, str(error) if error else None
    ctx.fail(
        ErrorKind.PERMANENT,
        "UNKNOWN_STATUS",
        f"status {value!r} is not IN_QUEUE, IN_PROGRESS or COMPLETED",
    )


def parse_result_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    request_id: str,
    failed: bool = False,
    redact: Iterable[str] = (),
    provider: str = ACCOUNT,
) -> JobStatus:
    """A result answer -> SUCCEEDED with the first image's URL, or FAILED with the classified
    error. ``failed``: the status said the request ended with an error, so a transient answer
    (5xx) is the request's own failure (resubmit), not a blip of the result endpoint (raised,
    to be asked again)."""
    ctx = ResponseContext(provider, status, headers, redact=redact, request_id=request_id)
    if not 200 <= status < 300:
        error = error_from(ctx, body, headers)
        if error.kind is ErrorKind.FATAL or (error.kind is ErrorKind.TRANSIENT and not failed):
            raise error
        return JobStatus(state=JobState.FAILED, error=error)
    payload = _json(body)
    if not isinstance(payload, dict):
        ctx.fail(
            ErrorKind.PERMANENT, "MALFORMED_RESPONSE", f"result is not JSON: {body_snippet(body)!r}"
        )
    images = payload.get("images")
    first = images[0] if isinstance(images, list) and images else payload.get("image")
    url = first.get("url") if isinstance(first, dict) else None
    if not isinstance(url, str) or not url:
        ctx.fail(
            ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "result without images[0].url or image.url"
        )
    extra = {"request_id": request_id}
    if isinstance(first.get("content_type"), str):
        extra["content_type"] = first["content_type"]
    seed = payload.get("seed")
    return JobStatus(
        state=JobState.SUCCEEDED,
        result=TryOnResult(
            result_url=url,
            request_id=request_id,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            extra=extra,
        ),
    )


# -- the client ---------------------------------------------------------------------------------


class FalClient(AsyncJobClient):
    """The fal queue over httpx, for ``model`` (a class setting: each spec's client is a
    subclass naming its model). The key is held as ``SecretStr`` and never echoed."""

    model: ClassVar[FalModel] = FASHN
    name: ClassVar[str] = FASHN.name
    capabilities: ClassVar[Capabilities] = FASHN.capabilities

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile | None = None,
        api_key: SecretStr,
        base_url: str,
        poll_policy: PollPolicy | None = None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(http=http, profile=profile or self.model.profile)
        self._api_key = require_key(api_key, provider=self.name)
        self.base_url = base_url.rstrip("/")
        self.poll_policy = poll_policy or DEFAULT_POLL_POLICY
        self.timeout = timeout

    @classmethod
    def from_env(
        cls, *, http: httpx.AsyncClient, profile: ImageProfile | None = None, **options: Any
    ) -> Self:
        """Key from ``FAL_KEY``, base URL from ``TRYON_FAL_BASE_URL``: every model of the
        account uses the one queue (``options``: the constructor's)."""
        return cls(
            http=http,
            profile=profile,
            api_key=key_from_env(API_KEY_ENV, provider=cls.name),
            base_url=settings.base_url(ACCOUNT, DEFAULT_BASE_URL),
            **options,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model.model_id!r}, base_url={self.base_url!r})"

    # -- submit ---------------------------------------------------------------------------------

    def build_input(self, request: TryOnRequest) -> dict[str, Any]:
        """The model's JSON input for ``request``; shapes it cannot take raise before sending."""
        model = self.model
        if request.garment is None or request.lower_garment is not None or request.prompt:
            raise unsupported_request(
                self.name, "needs exactly one garment image (no prompt, no separate lower garment)"
            )
        value = model.categories.get(request.category or "")
        if value is None:
            raise unsupported_category(self.name, request.category)
        body: dict[str, Any] = {
            model.person_field: _data_uri(request.person),
            model.garment_field: _data_uri(request.garment),
            **model.extra_inputs,
        }
        if model.category_field is not None:
            body[model.category_field] = value
        return body

    async def submit(self, request: TryOnRequest) -> str:
        """Queue one try-on; returns fal's request id (billed only if it succeeds)."""
        body = self.build_input(request)
        response = await self._send("POST", f"/{self.model.model_id}", json=body)
        _log.debug("fal submit %s -> HTTP %s", self.model.model_id, response.status_code)
        return parse_submit_response(
            response.status_code,
            response.headers,
            response.content,
            redact=self._secrets(),
            provider=self.name,
        )

    # -- poll -----------------------------------------------------------------------------------

    async def poll(self, job_id: str) -> JobStatus:
        """One status query; once COMPLETED, the result (or the error) too."""
        base = f"/{self.model.app_id}/requests/{job_id}"
        response = await self._send("GET", f"{base}/status", request_id=job_id)
        try:
            state, error = parse_status_response(
                response.status_code,
                response.headers,
                response.content,
                request_id=job_id,
                redact=self._secrets(),
                provider=self.name,
            )
        except ProviderError as exc:
            if exc.code == "REQUEST_NOT_FOUND":
                return JobStatus(state=JobState.FAILED, error=exc)
            raise
        if state is not None:
            return JobStatus(state=state)
        result = await self._send("GET", base, request_id=job_id)
        return parse_result_response(
            result.status_code,
            result.headers,
            result.content,
            request_id=job_id,
            failed=error is not None,
            redact=self._secrets(),
            provider=self.name,
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
            provider=self.name,
            timeout=self.timeout,
            secrets=[key],
            request_id=request_id,
            headers={"Authorization": f"Key {key}"},
            **kwargs,
        )


class FalKolorsClient(FalClient):
    """Kling Kolors virtual try-on v1.5 on the fal queue."""

    model: ClassVar[FalModel] = KOLORS
    name: ClassVar[str] = KOLORS.name
    capabilities: ClassVar[Capabilities] = KOLORS.capabilities


def _data_uri(image: PreparedImage) -> str:
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
