"""AILabTools clients: Try on Clothes (coarse) and Try on Clothes Refiner, both asynchronous.

Both submit ``multipart/form-data`` with header ``ailabapi-api-key`` and ``task_type=async``,
receive a ``task_id``, and share one poll: ``GET /api/common/query-async-task-result?task_id=``.

Sources:
- Refiner: doc 004 (shared/seeds), also https://www.ailabtools.com/docs/ai-portrait/enhance/
  try-on-clothes-refiner/api: ``POST /api/portrait/enhance/try-on-clothes-refiner``;
  person_image, top_garment, coarse_image (files), gender woman|man, bottom_garment (optional);
  JPG/JPEG/PNG/BMP, <= 5 MB, >150x150 and <4096x4096 px. The poll answers ``task_status``
  0 queued / 1 running / 2 done and ``output{task_status PENDING|RUNNING|SUCCEEDED|FAILED|UNKNOWN,
  image_url}``, ``usage{image_count}``; results stay 24 h; poll about every 5 s.
- Try-on: https://www.ailabtools.com/docs/ai-portrait/editing/try-on-clothes/api (and repo
  ailabtools-tobias/ailabtools-docs ``doc/ai-portrait/editing/try-on-clothes/api.mdx``; the
  official SDK ailabtools/ailabtools-sdk ``PortraitTryOnClothesParams``):
  ``POST /api/portrait/editing/try-on-clothes``; person_image, clothes_image (files),
  clothes_type upper_body|lower_body|full_body (one garment per call: no top+bottom pair);
  JPG/JPEG/PNG, <= 3 MB, < 4096x4096 px. Its poll answer carries the image as ``data.image``.
- Public fields and error codes: https://www.ailabtools.com/doc/response-description (repo
  ailabtools-tobias/ailabtools-docs ``doc/response-description.mdx``; the SDK's
  ``docs/errors.md`` gives a few codes other HTTP statuses). ``error_code`` is 0 on success,
  else the HTTP status; ``error_detail.code`` is the precise code, ``error_code_str`` the older,
  "gradually deprecated" one. HTTP 429 carries ``ERROR_NOT_ENOUGH_CREDITS`` (run-fatal); any
  other 429 is read as rate limiting (transient).

UNVERIFIED (no public source found; the parser accepts each variant, the paths are constructor
options):
- how the poll reports a failed task: we accept ``output.task_status == "FAILED"`` with any
  HTTP status, and a vendor error answer whose code is per-row (permanent) as the job failing;
- the result field: ``output.image_url`` (refiner doc), ``data.image`` (try-on doc) or
  ``data.images[0]`` (other AILab async APIs) - the first non-empty wins;
- the task id may also come as ``data.task_id`` (as other AILab APIs answer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import httpx
from pydantic import SecretStr

from providers import settings
from providers.base import (
    AsyncJobClient,
    Capabilities,
    JobState,
    JobStatus,
    OnSubmitted,
    PollPolicy,
    PreparedImage,
    ProviderError,
    RefinerClient,
    RefineRequest,
    TryOnRequest,
    TryOnResult,
    parse_retry_after,
    wait_for_job,
)
from providers.common import guard_transport, key_from_env, redact_secrets, require_key
from schemas.limits import AILAB, AILAB_REFINER, ImageProfile
from schemas.results import ErrorKind

NAME = "ailab"
REFINER_NAME = "ailab_refiner"
API_KEY_ENV = "AILAB_API_KEY"
KEY_HEADER = "ailabapi-api-key"
TRYON_PATH = "/api/portrait/editing/try-on-clothes"
REFINER_PATH = "/api/portrait/enhance/try-on-clothes-refiner"
QUERY_PATH = "/api/common/query-async-task-result"
CREDITS_CODE = "ERROR_NOT_ENOUGH_CREDITS"
# Our categories -> the try-on API's clothes_type.
CLOTHES_TYPES: dict[str, str] = {
    "upper_body": "upper_body",
    "lower_body": "lower_body",
    "dresses": "full_body",
}
GENDERS = ("woman", "man")
# The doc recommends querying about every 5 s; ten minutes covers a slow queue.
DEFAULT_POLL_POLICY = PollPolicy(initial_s=5.0, max_interval_s=5.0, factor=1.0, deadline_s=600.0)

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One public error code: the HTTP status the docs give it, its effect on the run."""

    status: int
    kind: ErrorKind
    meaning: str


_P, _T, _F = ErrorKind.PERMANENT, ErrorKind.TRANSIENT, ErrorKind.FATAL

# Every code of the public table (doc/response-description), keyed by ``error_detail.code``
# (the same names appear as ``error_code_str``). Kinds are our reading: account and key
# problems stop the run; "please try again later", resource and transfer failures are
# transient; parameter, file and content problems fail the row.
ERROR_TABLE: dict[str, ErrorSpec] = {
    code: ErrorSpec(status, kind, meaning)
    for code, status, kind, meaning in (
        # -- 400
        # The SDK lists it under 500: a processing failure may pass on a retry.
        ("PROCESSING_FAILURE", 400, _T, "processing failed"),
        ("ERROR_PARAMETERS", 400, _P, "invalid parameters"),
        ("MISSING_PARAMETERS", 400, _P, "missing parameters"),
        ("ERROR_INVALID_PARAMETER", 400, _P, "invalid parameter"),
        ("PARAMETERS_CANNOT_EMPTY", 400, _P, "parameters cannot be empty"),
        ("ERROR_MISSING_LIMIT_PARAMETER", 400, _P, "missing Limit parameter"),
        ("ERROR_MISSING_TASKS_PARAMETER", 400, _P, "missing Tasks parameter"),
        ("ERROR_MISSING_ASSURE_DIRECTION_PARAMETER", 400, _P, "missing AssureDirection"),
        ("ERROR_MISSING_MIN_HEIGHT_PARAMETER", 400, _P, "missing MinHeight parameter"),
        ("ERROR_INVALID_SIDE_PARAMETER", 400, _P, "invalid value for Side"),
        ("ERROR_TOO_MANY_FILES", 400, _P, "number of files exceeds the limit"),
        ("ERROR_FACE_TRACE_LIMIT_EXCEEDED", 400, _P, "face or trace limit exceeded"),
        ("ERROR_INVALID_URL", 400, _P, "invalid URL"),
        ("ERROR_DATABASE_LIMIT_EXCEEDED", 400, _P, "database limit exceeded"),
        ("ERROR_INVALID_RESPONSE_FORMAT", 400, _P, "Accept not supported"),
        ("ERROR_UNSUPPORTED_RESPONSE_FORMAT", 400, _P, "format not supported"),
        ("ERROR_TOO_MANY_GROUPS_IN_GROUP_LIST", 400, _P, "too many groups in group_list"),
        ("ERROR_TOO_MANY_UIDS_IN_UID_LIST", 400, _P, "too many UIDs in uid_list"),
        ("ERROR_TOO_MANY_APPS_IN_APP_LIST", 400, _P, "too many apps in app_list"),
        ("ERROR_BATCH_TASK_LIMIT_EXCEEDED", 400, _T, "batch task processing limit exceeded"),
        ("ERROR_CLEANING_USER_GROUP_DATA", 400, _T, "cleaning user group data"),
        ("ERROR_IMAGE_STORAGE_NOT_SUPPORTED", 400, _P, "image storage not supported"),
        ("ERROR_INSUFFICIENT_RESOURCES", 400, _T, "insufficient resources"),
        ("ERROR_RESOURCE_IN_TRANSIT", 400, _T, "resource in transit"),
        ("ERROR_FILE_DOWNLOAD_FAILED", 400, _T, "file download failed"),
        ("ERROR_FILE_UPLOAD_FAILED", 400, _T, "file upload failed"),
        ("FILE_DECODING_FAILURE", 400, _P, "file decoding failed"),
        # The SDK lists these three under 502: their service failed, not the input.
        ("ERROR_FACE_BLENDING_FAILED", 400, _T, "face blending failed"),
        ("ERROR_FACE_IMAGE_ADDITION_FAILED", 400, _T, "failed to add face image"),
        ("ERROR_GET_FACE_IMAGE_FAILED", 400, _T, "failed to get face image"),
        ("ERROR_DATA_TRANSFER_FAILED", 400, _T, "data transfer failed"),
        ("ERROR_TASK_REVOCATION_FAILED", 400, _P, "task revocation failed"),
        ("ERROR_RESOURCE_UNAVAILABLE", 400, _T, "resource temporarily unavailable"),
        ("ERROR_FILE_DOWNLOAD_TIMEOUT", 400, _T, "file download timeout"),
        # -- 401 / 403: the key or the account; no row can succeed
        ("ERROR_USER_NOT_EXISTS", 401, _F, "the user does not exist"),
        ("ERROR_APPLICATIONS_NOT_EXISTS", 401, _F, "the application (API key) does not exist"),
        ("ERROR_USER_LOCKED", 403, _F, "the user is locked"),
        ("AI_SERVICE_UNAUTHORIZED", 403, _F, "AI service unauthorized"),
        # A 403 that is about one file, not the account: classify by code, never by status.
        ("ERROR_ILLEGAL_FILE", 403, _P, "illegal file"),
        # -- 404
        ("ERROR_AI_NOT_EXISTS", 404, _F, "AI does not exist or has been deactivated"),
        ("AI_SERVICE_NOT_FOUND", 404, _T, "AI service not found, try again later"),
        ("ERROR_FILE_NOT_FOUND", 404, _P, "file not found"),
        ("ERROR_FACE_NOT_FOUND", 404, _P, "face not found"),
        ("ERROR_USER_GROUP_NOT_FOUND", 404, _P, "user group not found"),
        ("ERROR_USER_NOT_FOUND", 404, _P, "user not found"),
        ("ERROR_FACE_TOKEN_NOT_FOUND", 404, _P, "face token not found"),
        ("ERROR_CONTENT_NOT_FOUND", 404, _P, "content not found"),
        ("ERROR_RESOURCE_NOT_FOUND", 404, _P, "resource not found"),
        # -- 405 / 409 / 410
        ("ERROR_ILLEGAL_OPERATION", 405, _P, "illegal operation"),
        ("ERROR_FACE_ALREADY_EXISTS", 409, _P, "face already exists"),
        ("ERROR_DATA_ALREADY_EXISTS", 409, _P, "data already exists"),
        ("ERROR_USER_GROUP_ALREADY_EXISTS", 409, _P, "user group already exists"),
        ("ERROR_USER_ALREADY_EXISTS", 409, _P, "user already exists"),
        ("ERROR_DUPLICATE_GROUP_NAME", 409, _P, "duplicate group name"),
        ("ERROR_RESOURCE_IN_USE", 409, _P, "resource is in use"),
        ("ERROR_TASK_CONFLICT", 409, _P, "task conflict"),
        ("ERROR_TASK_REVOKED", 409, _P, "task has already been revoked"),
        ("ERROR_RESOURCE_RECLAIMED", 410, _P, "resource has been reclaimed"),
        # -- 413 / 415: the input is too big or of the wrong type
        ("FILE_SIZE_EXCEEDS_LIMIT", 413, _P, "file size exceeds limit"),
        ("ERROR_CONTENT_TOO_LONG", 413, _P, "content length exceeds limit"),
        ("ERROR_VIDEO_DURATION_EXCEEDED", 413, _P, "video duration exceeds limit"),
        ("ERROR_REQUEST_BODY_TOO_LARGE", 413, _P, "request body size exceeds limit"),
        ("ERROR_RESPONSE_BODY_TOO_LARGE", 413, _P, "response body size exceeds limit"),
        ("UNSUPPORTED_FILE_TYPES", 415, _P, "unsupported file types"),
        ("ERROR_INVALID_OUTPUT_FORMAT", 415, _P, "invalid output format"),
        ("ERROR_UNSUPPORTED_GRAYSCALE_IMAGE", 415, _P, "grayscale image not supported"),
        # -- 422: values, files and content the service will not process
        ("UNSUPPORTED_PARAMETER_VALUES", 422, _P, "invalid parameter values"),
        ("ERROR_INVALID_FACE_BOX_PARAMETER", 422, _P, "face box parameter invalid"),
        ("ERROR_INVALID_BIG_EYES_PARAMETER", 422, _P, "big eyes parameter invalid"),
        ("ERROR_INVALID_FACE_SLIMMING_PARAMETER", 422, _P, "face slimming parameter invalid"),
        ("ERROR_INVALID_SMOOTHING_PARAMETER", 422, _P, "smoothing parameter invalid"),
        ("ERROR_INVALID_SKIN_WHITENING_PARAMETER", 422, _P, "skin whitening parameter invalid"),
        ("ERROR_INVALID_PARAMETER_FORMAT", 422, _P, "invalid parameter format"),
        ("ERROR_PARAMETER_CONVERSION_FAILED", 422, _P, "parameter conversion failed"),
        ("FILE_RESOLUTION_EXCEEDS_LIMITS", 422, _P, "file resolution exceeds limits"),
        ("ERROR_LOW_RESOLUTION", 422, _P, "file resolution too low"),
        ("ERROR_HIGH_RESOLUTION", 422, _P, "file resolution too high"),
        ("ERROR_INVALID_FILE", 422, _P, "invalid file"),
        ("FILE_CONTENT_NON_COMPLIANCE", 422, _P, "file content does not meet requirements"),
        ("ERROR_INCORRECT_FILE_COUNT", 422, _P, "incorrect number of files"),
        ("ERROR_NO_FACE_IN_FILE", 422, _P, "no face detected in the file"),
        ("ERROR_FACE_SIZE_NOT_MEET_REQUIREMENTS", 422, _P, "face size not as required"),
        ("ERROR_FACE_SIZE_RATIO_NOT_MET", 422, _P, "face size ratio not as required"),
        ("ERROR_SMALL_FACE_SIZE", 422, _P, "face size too small"),
        ("ERROR_FACE_COPY_SCENE_MISMATCH", 422, _P, "face copy scene type mismatch"),
        ("ERROR_FACE_UNRECOGNIZABLE", 422, _P, "unable to recognize face"),
        ("ERROR_POOR_FACE_QUALITY", 422, _P, "poor face quality"),
        ("ERROR_BLURRY_FACE", 422, _P, "blurry face"),
        ("ERROR_OBSTRUCTED_FACE", 422, _P, "obstructed face"),
        ("ERROR_POOR_FACE_LIGHTING", 422, _P, "poor face lighting"),
        ("ERROR_INCOMPLETE_FACE", 422, _P, "incomplete face"),
        ("ERROR_FACE_NOT_FACING_FORWARD", 422, _P, "face not facing forward"),
        ("ERROR_MISSING_OUTPUT_FORMAT", 422, _P, "missing output format"),
        ("ERROR_QUALITY_SCORE_NOT_MEET_REQUIREMENTS", 422, _P, "quality score too low"),
        ("ERROR_QUALITY_CONTROL_ERROR", 422, _P, "quality control error"),
        ("ERROR_LIVENESS_CONTROL_ERROR", 422, _P, "liveness control error"),
        ("ERROR_SCENE_TYPE_MISMATCH", 422, _P, "scene type mismatch"),
        ("ERROR_CARTOON_FACE_NOT_SUPPORTED", 422, _P, "cartoon face not supported"),
        ("ERROR_TEMPLATE_IMAGE_QUALITY_TOO_LOW", 422, _P, "template image quality too low"),
        ("ERROR_ACTION_VERIFICATION_FAILED", 422, _P, "action verification failed"),
        ("ERROR_LEFT_EYE_OCCLUSION_TOO_HIGH", 422, _P, "left eye occlusion too high"),
        ("ERROR_RIGHT_EYE_OCCLUSION_TOO_HIGH", 422, _P, "right eye occlusion too high"),
        ("ERROR_LEFT_FACE_OCCLUSION_TOO_HIGH", 422, _P, "left face occlusion too high"),
        ("ERROR_RIGHT_FACE_OCCLUSION_TOO_HIGH", 422, _P, "right face occlusion too high"),
        ("ERROR_CHIN_OCCLUSION_TOO_HIGH", 422, _P, "chin occlusion too high"),
        ("ERROR_NOSE_OCCLUSION_TOO_HIGH", 422, _P, "nose occlusion too high"),
        ("ERROR_MOUTH_OCCLUSION_TOO_HIGH", 422, _P, "mouth occlusion too high"),
        ("ERROR_SYNTHESIS_DETECTION_FAILED", 422, _P, "synthesis detection failed"),
        ("ERROR_LIVENESS_DETECTION_FAILED", 422, _P, "liveness detection failed"),
        ("ERROR_NO_RECOGNITION_TARGET_DETECTED", 422, _P, "no recognition target detected"),
        ("ERROR_IMAGE_RECOGNITION_FAILED", 422, _P, "image recognition error"),
        ("ERROR_MASK_IMAGE_RESOLUTION_MISMATCH", 422, _P, "mask and image sizes differ"),
        ("ERROR_TASK_STOPPED_PROCESSING", 422, _P, "task has been stopped processing"),
        # The SDK lists it under 429: a usage limit, so worth waiting for.
        ("EXCEEDING_LIMITS", 422, _T, "exceeds limit"),
        ("ERROR_CONTENT_NON_COMPLIANCE", 422, _P, "content does not meet requirements"),
        # -- 429: out of credits (every other 429 is rate limiting, see _classify)
        (CREDITS_CODE, 429, _F, "insufficient credits"),
        # -- 5xx: theirs, and all say "please try again later"
        ("UNKNOWN_ERROR", 500, _T, "unknown error"),
        ("SERVICE_INTERNAL_ERROR", 500, _T, "service internal error"),
        ("FILE_SERVICE_ERROR", 500, _T, "file service error"),
        ("AI_SERVICE_ERROR", 500, _T, "AI service error"),
        ("AI_SERVICE_INTERNAL_ERROR", 500, _T, "AI service internal error"),
        ("ERROR_GATEWAY", 502, _T, "gateway error"),
        ("AI_SERVICE_FLOW_RESTRICTION", 503, _T, "AI service is rate-limited"),
        ("AI_SERVICE_TIMEOUT", 504, _T, "AI service timeout"),
    )
}


# -- pure parsing: any response, also one made by hand, can be checked -------------------------


@dataclass(frozen=True, slots=True)
class _Envelope:
    """The public fields of one answer (or None where the body was not the vendor's JSON)."""

    status: int
    payload: dict[str, Any] | None
    code: str  # error_detail.code, else error_code_str; "" when none
    legacy_code: str  # error_code_str as sent
    message: str
    request_id: str | None
    retry_after: float | None

    @property
    def ok(self) -> bool:
        if self.payload is None or self.status != 200 or self.code or self.legacy_code:
            return False
        return self.payload.get("error_code") in (0, "0", None)


def _envelope(status: int, headers: Mapping[str, str], body: bytes) -> _Envelope:
    lowered = {k.lower(): v for k, v in headers.items()}
    retry_after = parse_retry_after(lowered.get("retry-after"))
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict) or not (
        "error_code" in payload or "error_detail" in payload or "task_id" in payload
    ):
        payload = None
    detail = payload.get("error_detail") if payload else None
    detail = detail if isinstance(detail, dict) else {}
    code = _text(detail.get("code"))
    legacy = _text(payload.get("error_code_str")) if payload else ""
    parts = [_text(detail.get("code_message")), _text(detail.get("message"))]
    if payload:
        parts.append(_text(payload.get("error_msg")))
    message = " - ".join(dict.fromkeys(p for p in parts if p))[:500]
    vendor_id = _text(payload.get("request_id")) if payload else ""
    request_id = vendor_id or lowered.get("x-request-id") or None
    return _Envelope(status, payload, code or legacy, legacy, message, request_id, retry_after)


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _classify(status: int, code: str, legacy_code: str) -> tuple[ErrorKind, str]:
    """(kind, our code) for an error answer: the vendor's code first, the HTTP status last."""
    # The doc's subtlety: HTTP 429 is "out of credits" only when the code says so.
    if CREDITS_CODE in (code, legacy_code):
        return ErrorKind.FATAL, CREDITS_CODE
    spec = ERROR_TABLE.get(code) or ERROR_TABLE.get(legacy_code)
    if spec is not None:
        return spec.kind, code if code in ERROR_TABLE else legacy_code
    if status == 429:
        return ErrorKind.TRANSIENT, "RATE_LIMITED"
    name = code or f"HTTP_{status}"
    if status >= 500:
        return ErrorKind.TRANSIENT, name
    if status in (401, 403):
        return ErrorKind.FATAL, name
    return ErrorKind.PERMANENT, name if status >= 400 or code else "UNKNOWN_CODE"


def _error_from(
    env: _Envelope, body: bytes, provider: str, secrets: list[str], *, request_id: str | None
) -> ProviderError:
    if env.payload is None:
        snippet = " ".join(body[:160].decode("utf-8", "replace").split())
        if env.status == 200:
            kind, code = ErrorKind.PERMANENT, "MALFORMED_RESPONSE"
            message = f"HTTP 200 without the vendor's JSON: {snippet!r}"
        else:
            kind, code = _classify(env.status, "", "")
            message = f"HTTP {env.status} without the vendor's JSON body: {snippet!r}"
    else:
        kind, code = _classify(env.status, env.code, env.legacy_code)
        spec = ERROR_TABLE.get(code)
        meaning = f" ({spec.meaning})" if spec else ""
        vendor = env.code or env.legacy_code or "no code"
        message = f"HTTP {env.status}, {vendor}{meaning}: {env.message or 'no message'}"
    return ProviderError(
        kind=kind,
        code=code,
        message=redact_secrets(message, secrets),
        provider=provider,
        http_status=env.status,
        request_id=request_id or env.request_id,
        retry_after=env.retry_after,
    )


def parse_submit(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    provider: str = NAME,
    redact: Iterable[str] = (),
) -> str:
    """A submit answer -> the task id, or a classified ``ProviderError``."""
    secrets = [s for s in redact if s]
    env = _envelope(status, headers, body)
    if not env.ok:
        raise _error_from(env, body, provider, secrets, request_id=None)
    assert env.payload is not None
    data = env.payload.get("data")
    task_id = _text(env.payload.get("task_id")) or (
        _text(data.get("task_id")) if isinstance(data, dict) else ""
    )
    if not task_id:
        raise ProviderError(
            kind=ErrorKind.PERMANENT,
            code="MALFORMED_RESPONSE",
            message="accepted without a task_id",
            provider=provider,
            http_status=status,
            request_id=env.request_id,
        )
    return task_id


# Either status field of the poll answer -> our job state ("UNKNOWN": keep asking).
_OUTPUT_STATES: dict[str, JobState] = {
    "PENDING": JobState.QUEUED,
    "RUNNING": JobState.RUNNING,
    "UNKNOWN": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
}
_INT_STATES: dict[int, JobState] = {0: JobState.QUEUED, 1: JobState.RUNNING, 2: JobState.SUCCEEDED}


def parse_task_result(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    task_id: str,
    provider: str = NAME,
    redact: Iterable[str] = (),
) -> JobStatus:
    """A query-async-task-result answer -> ``JobStatus``.

    Raises ``ProviderError`` for answers about the call rather than the task (auth, credits,
    rate limits, 5xx): those are not the job's fate. A per-row (permanent) error answer, or
    ``output.task_status == "FAILED"``, is the job failing.
    """
    secrets = [s for s in redact if s]
    env = _envelope(status, headers, body)
    payload = env.payload or {}
    output = payload.get("output")
    output = output if isinstance(output, dict) else {}
    data = payload.get("data")
    data = data if isinstance(data, dict) else {}

    def failed(code: str, message: str) -> JobStatus:
        error = ProviderError(
            kind=ErrorKind.PERMANENT,
            code=code,
            message=redact_secrets(message, secrets),
            provider=provider,
            http_status=status,
            request_id=task_id,
        )
        return JobStatus(state=JobState.FAILED, error=error)

    output_state = _OUTPUT_STATES.get(_text(output.get("task_status")).upper())
    if output_state is JobState.FAILED:
        vendor = env.code if env.code in ERROR_TABLE else "JOB_FAILED"
        detail = env.message or "output.task_status FAILED"
        return failed(vendor, f"task {task_id} failed: {detail}")
    if not env.ok:
        error = _error_from(env, body, provider, secrets, request_id=task_id)
        if env.payload is None and status == 200:
            # A garbled status answer says nothing about a paid job: ask again later.
            error.kind = ErrorKind.TRANSIENT
        elif env.payload is not None and error.kind is ErrorKind.PERMANENT:
            return JobStatus(state=JobState.FAILED, error=error)
        raise error

    raw_state = payload.get("task_status")
    state = output_state or (_INT_STATES.get(raw_state) if isinstance(raw_state, int) else None)
    if state is None:
        # Neither field says anything we know: ask again rather than give up on a paid job.
        state = JobState.RUNNING
    if state is not JobState.SUCCEEDED:
        return JobStatus(state=state)
    images = data.get("images")
    first = images[0] if isinstance(images, list) and images else None
    url = _text(output.get("image_url")) or _text(data.get("image")) or _text(first)
    if not url:
        return failed("MALFORMED_RESPONSE", f"task {task_id} succeeded without an image URL")
    extra = {"log_id": _text(payload.get("log_id"))}
    usage = payload.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("image_count"), int):
        extra["image_count"] = str(usage["image_count"])
    result = TryOnResult(
        result_url=url, request_id=task_id, extra={k: v for k, v in extra.items() if v}
    )
    return JobStatus(state=JobState.SUCCEEDED, result=result)


# -- the wire: one key, one base URL, shared by both clients -----------------------------------


class _Wire:
    """Submits and polls over httpx. Holds the key as ``SecretStr``; never logs or shows it."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        provider: str,
        api_key: SecretStr,
        base_url: str,
        timeout: float,
        query_path: str,
    ) -> None:
        self._api_key = require_key(api_key, provider=provider)
        self.http = http
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.query_path = query_path

    def __repr__(self) -> str:
        return f"_Wire(provider={self.provider!r}, base_url={self.base_url!r})"

    async def submit(self, path: str, parts: list[tuple[str, Any]]) -> str:
        key = self._api_key.get_secret_value()
        # Always multipart (the API requires it): httpx sends (None, str) parts as fields.
        response = await self._send("POST", path, files=[("task_type", (None, "async")), *parts])
        _log.debug("%s POST %s -> HTTP %s", self.provider, path, response.status_code)
        return parse_submit(
            response.status_code,
            response.headers,
            response.content,
            provider=self.provider,
            redact=[key],
        )

    async def poll(self, task_id: str) -> JobStatus:
        key = self._api_key.get_secret_value()
        response = await self._send("GET", self.query_path, params={"task_id": task_id})
        _log.debug("%s poll %s -> HTTP %s", self.provider, task_id, response.status_code)
        return parse_task_result(
            response.status_code,
            response.headers,
            response.content,
            task_id=task_id,
            provider=self.provider,
            redact=[key],
        )

    async def _send(
        self,
        method: Literal["GET", "POST"],
        path: str,
        *,
        files: list[tuple[str, Any]] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        key = self._api_key.get_secret_value()
        url = self.base_url + path
        return await guard_transport(
            self.http.request(
                method,
                url,
                files=files,
                params=params,
                headers={KEY_HEADER: key},
                timeout=self.timeout,
            ),
            provider=self.provider,
            url=url,
            timeout=self.timeout,
            secrets=[key],
        )


def _error(provider: str, kind: ErrorKind, code: str, message: str) -> ProviderError:
    return ProviderError(kind=kind, code=code, message=message, provider=provider)


def _file(image: PreparedImage) -> tuple[str, bytes, str]:
    return (f"{image.sha256[:16] or 'image'}.{image.extension}", image.data, image.mime)


# -- the clients -------------------------------------------------------------------------------


class _AILabAccount:
    """What both AILab clients share: one account (key, base URL), its wire, the common poll.

    A client names only what differs, as class attributes: ``name`` (carried by its errors and
    logs), ``default_profile`` and ``default_submit_path``. Listed before the client's interface
    class (``AsyncJobClient`` or ``RefinerClient``) so its methods fill that interface.
    """

    name: ClassVar[str]
    default_profile: ClassVar[ImageProfile]
    default_submit_path: ClassVar[str]

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile | None = None,
        api_key: SecretStr,
        base_url: str,
        timeout: float = 60.0,
        poll_policy: PollPolicy | None = None,
        submit_path: str | None = None,
        query_path: str = QUERY_PATH,
    ) -> None:
        """``profile`` and ``submit_path`` default to the client's ``default_profile`` and
        ``default_submit_path``."""
        if profile is None:
            profile = self.default_profile
        # The next class in the MRO is the client's interface, which keeps http and profile.
        super().__init__(http=http, profile=profile)  # type: ignore[call-arg]
        self._wire = _Wire(
            http=http,
            provider=self.name,
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            query_path=query_path,
        )
        self.poll_policy = poll_policy or DEFAULT_POLL_POLICY
        self.submit_path = submit_path if submit_path is not None else self.default_submit_path

    @classmethod
    def from_env(
        cls,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile | None = None,
        timeout: float = 60.0,
        poll_policy: PollPolicy | None = None,
    ) -> Self:
        """Key from ``AILAB_API_KEY``, base URL from ``TRYON_AILAB_BASE_URL``: both clients
        use the one account."""
        return cls(
            http=http,
            profile=profile,
            api_key=key_from_env(API_KEY_ENV, provider=cls.name),
            base_url=settings.base_url(NAME),
            timeout=timeout,
            poll_policy=poll_policy,
        )

    @property
    def base_url(self) -> str:
        return self._wire.base_url

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, "
            f"timeout={self._wire.timeout!r}, poll_policy={self.poll_policy!r})"
        )

    async def poll(self, job_id: str) -> JobStatus:
        return await self._wire.poll(job_id)


class AILabTryOnClient(_AILabAccount, AsyncJobClient):
    """AILabTools Try on Clothes: one garment per call, by clothes_type; async jobs."""

    name: ClassVar[str] = NAME
    capabilities: ClassVar[Capabilities] = Capabilities(
        categories=frozenset(CLOTHES_TYPES), lower_garment=False, async_jobs=True
    )
    default_profile: ClassVar[ImageProfile] = AILAB
    default_submit_path: ClassVar[str] = TRYON_PATH

    async def submit(self, request: TryOnRequest) -> str:
        """Upload person and garment; returns the task id (the job is paid for from here)."""
        if request.garment is None or request.lower_garment is not None:
            raise _error(
                NAME,
                ErrorKind.PERMANENT,
                "UNSUPPORTED_REQUEST",
                "needs exactly one garment (no separate lower garment, no prompt)",
            )
        clothes_type = CLOTHES_TYPES.get(request.category or "")
        if clothes_type is None:
            raise _error(
                NAME,
                ErrorKind.PERMANENT,
                "UNSUPPORTED_REQUEST",
                f"category must be upper_body, lower_body or dresses: {request.category!r}",
            )
        parts = [
            ("person_image", _file(request.person)),
            ("clothes_image", _file(request.garment)),
            ("clothes_type", (None, clothes_type)),
        ]
        return await self._wire.submit(self.submit_path, parts)


class AILabRefinerClient(_AILabAccount, RefinerClient):
    """AILabTools Try on Clothes Refiner (doc 004): refines any provider's coarse result."""

    name: ClassVar[str] = REFINER_NAME
    default_profile: ClassVar[ImageProfile] = AILAB_REFINER
    default_submit_path: ClassVar[str] = REFINER_PATH

    async def submit(self, request: RefineRequest) -> str:
        """Upload the inputs and the coarse result; returns the task id."""
        if request.gender not in GENDERS:
            raise _error(
                REFINER_NAME,
                ErrorKind.PERMANENT,
                "UNSUPPORTED_REQUEST",
                f"gender must be woman or man: {request.gender!r}",
            )
        parts: list[tuple[str, Any]] = [
            ("person_image", _file(request.person)),
            ("top_garment", _file(request.top_garment)),
            ("coarse_image", _file(request.coarse)),
            ("gender", (None, request.gender)),
        ]
        if request.bottom_garment is not None:
            parts.append(("bottom_garment", _file(request.bottom_garment)))
        return await self._wire.submit(self.submit_path, parts)

    async def wait(self, job_id: str) -> TryOnResult:
        """Poll until the task ends or the deadline passes (transient POLL_DEADLINE)."""
        return await wait_for_job(self.poll, job_id, self.poll_policy, provider=self.name)

    async def refine(
        self, request: RefineRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult:
        job_id = await self.submit(request)
        if on_submitted is not None:
            await on_submitted(job_id)
        return await self.wait(job_id)
