"""HiDream AI virtual try-on client (doc 003): submit a JSON job, then poll for its result.

``POST /api-pub/ec/v3/image/vton/async`` with Bearer auth takes ``person`` plus
``upper_clothes`` and/or ``lower_clothes``, or ``dress`` (exclusive with both), each an image URL
or base64, and answers ``{code, message, request_id, result: {task_id, sub_task_ids}}``; code 0
means accepted. Everything after that is UNVERIFIED (the document stops at submission), so the
result endpoint, its status values and its shape are constructor options; the defaults follow
DESIGN.md and HiDream's sibling APIs as third parties call them (``<submit path>/results``,
``result.sub_task_results[].task_status``/``image``). The document lists no error codes either:
``errors.ERROR_TABLE`` is a placeholder to fill from live calls. Nor does it document an
endpoint for the account's balance or credits.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

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
    TryOnRequest,
    TryOnResult,
)
from providers.common import (
    ErrorSpec,
    ResponseContext,
    as_int,
    classify_status,
    json_with_code,
    key_from_env,
    require_key,
    send,
    staged_url,
    unsupported_category,
    unsupported_request,
)
from providers.hidream.errors import ERROR_TABLE
from providers.hidream.settings import API_KEY_ENV, CAPABILITIES, DEFAULT_BASE_URL, NAME, PROFILE
from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind

SUBMIT_PATH = "/api-pub/ec/v3/image/vton/async"  # (doc)
REQUEST_ID_HEADERS = ("x-request-id", "request-id")
# HTTP statuses that stop the run: bad key (401/403) and, here, no credits (402).
FATAL_STATUSES = (401, 402, 403)

ImageTransport = Literal["base64", "url"]
_log = logging.getLogger(__name__)

# -- UNVERIFIED: the polling half of the protocol; every value here is a constructor option ----
# Result endpoint: GET <base><result_path>?task_id=<id> with the same Bearer header.
DEFAULT_RESULT_PATH = SUBMIT_PATH + "/results"
# task_status -> state (DESIGN.md: 0 wait, 2 running, 1 done, 3 failed, 4 moderated). Third-party
# notes on HiDream's txt2img API add 1004-1006 "the algorithm produced no result".
DEFAULT_STATUS_MAP: Mapping[int, JobState] = {
    0: JobState.QUEUED,
    2: JobState.RUNNING,
    1: JobState.SUCCEEDED,
    3: JobState.FAILED,
    4: JobState.FAILED,
    1004: JobState.FAILED,
    1005: JobState.FAILED,
    1006: JobState.FAILED,
}
# The ProviderError code for a FAILED task_status (all permanent); others are "JOB_FAILED".
DEFAULT_FAILURE_CODES: Mapping[int, str] = {
    4: "MODERATED",
    1004: "NO_RESULT",
    1005: "NO_RESULT",
    1006: "NO_RESULT",
}
# Jobs take tens of seconds; 10 min before giving up (a rerun resumes polling the task id).
DEFAULT_POLL_POLICY = PollPolicy(initial_s=2.0, max_interval_s=10.0, factor=1.5, deadline_s=600.0)


# -- pure parsing: a response (status, headers, body) -> value or classified ProviderError -----


def _context(
    status: int, headers: Mapping[str, str], redact: Iterable[str], request_id: str | None
) -> ResponseContext:
    return ResponseContext(
        NAME,
        status,
        headers,
        redact=redact,
        request_id_headers=REQUEST_ID_HEADERS,
        request_id=request_id,
    )


def _checked_payload(
    ctx: ResponseContext, body: bytes, error_table: Mapping[int, ErrorSpec]
) -> dict[str, Any]:
    """The vendor JSON of a successful (code 0, 2xx) answer; anything else raises."""
    payload = json_with_code(body)
    if payload is None:
        ctx.fail_without_json(body, fatal=FATAL_STATUSES)
    status = ctx.status
    code: int = payload["code"]
    message = str(payload.get("message") or "")[:500]
    spec = error_table.get(code)
    if not 200 <= status < 300:
        kind, name = classify_status(status, fatal=FATAL_STATUSES)
        if spec is not None and status != 429:
            name = spec.name or name
        ctx.fail(kind, name, f"HTTP {status}, code {code}: {message}")
    if code == 0:
        return payload
    if spec is not None:
        ctx.fail_code(code, spec, message)
    ctx.fail(ErrorKind.PERMANENT, "UNKNOWN_CODE", f"unknown code {code} (HTTP {status}): {message}")


def parse_submit_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    request_id: str | None = None,
    error_table: Mapping[int, ErrorSpec] = ERROR_TABLE,
    redact: Iterable[str] = (),
) -> str:
    """A submit answer -> the task id, or a classified ``ProviderError``.

    ``request_id``: the id we sent; a different non-empty echo means the answer is not ours.
    """
    ctx = _context(status, headers, redact, request_id)
    payload = _checked_payload(ctx, body, error_table)
    echoed = payload.get("request_id")
    if request_id and isinstance(echoed, str) and echoed and echoed != request_id:
        ctx.fail(
            ErrorKind.PERMANENT,
            "REQUEST_ID_MISMATCH",
            f"sent request_id {request_id!r}, the answer is for {echoed!r}",
        )
    result = payload.get("result")
    task_id = result.get("task_id") if isinstance(result, dict) else None
    if not isinstance(task_id, str) or not task_id:
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "code 0 without result.task_id")
    return task_id


def parse_result_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    task_id: str,
    status_map: Mapping[int, JobState] = DEFAULT_STATUS_MAP,
    failure_codes: Mapping[int, str] = DEFAULT_FAILURE_CODES,
    error_table: Mapping[int, ErrorSpec] = ERROR_TABLE,
    redact: Iterable[str] = (),
) -> JobStatus:
    """A result answer -> ``JobStatus`` (failed jobs carry a permanent error), or raises.

    Shape (UNVERIFIED): ``{code: 0, result: {task_id?, sub_task_results: [{sub_task_id,
    task_status, image, description?}]}}``. The job is unfinished while any sub-task is; once
    all are finished it succeeded if one did (its ``image`` is the result URL).
    """
    ctx = _context(status, headers, redact, task_id)
    payload = _checked_payload(ctx, body, error_table)
    result = payload.get("result")
    if not isinstance(result, dict):
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "code 0 without a result object")
    answered_id = result.get("task_id")
    if isinstance(answered_id, str) and answered_id and answered_id != task_id:
        ctx.fail(ErrorKind.PERMANENT, "TASK_ID_MISMATCH", f"asked for {task_id}, got {answered_id}")
    subs = result.get("sub_task_results")
    if isinstance(subs, dict):  # some callers of sibling APIs read it as one object
        subs = [subs]
    if not isinstance(subs, list) or not subs or not all(isinstance(s, dict) for s in subs):
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "no result.sub_task_results list")

    states: list[tuple[JobState, int, dict[str, Any]]] = []
    for sub in subs:
        value = as_int(sub.get("task_status"))
        if value is None:
            ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "sub-task without task_status")
        state = status_map.get(value)
        if state is None:
            # Loud on purpose: a status we cannot read means status_map is wrong for this API.
            ctx.fail(
                ErrorKind.PERMANENT,
                "UNKNOWN_STATUS",
                f"task_status {value} is not in status_map {sorted(status_map)}",
            )
        states.append((state, value, sub))

    unfinished = [s for s, _, _ in states if s in (JobState.QUEUED, JobState.RUNNING)]
    if unfinished:
        running = JobState.RUNNING in unfinished
        return JobStatus(state=JobState.RUNNING if running else JobState.QUEUED)
    for state, _, sub in states:
        if state is JobState.SUCCEEDED:
            image = sub.get("image")
            if not isinstance(image, str) or not image:
                ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "finished sub-task, no image")
            extra = {"task_id": task_id, "sub_task_count": str(len(states))}
            if isinstance(sub.get("sub_task_id"), str):
                extra["sub_task_id"] = sub["sub_task_id"]
            return JobStatus(
                state=JobState.SUCCEEDED,
                result=TryOnResult(result_url=image, request_id=task_id, extra=extra),
            )
    _, value, sub = states[0]
    code = failure_codes.get(value, "JOB_FAILED")
    description = str(sub.get("description") or "")[:300]
    message = f"task {task_id} ended with task_status {value}" + (
        f": {description}" if description else ""
    )
    return JobStatus(state=JobState.FAILED, error=ctx.error(ErrorKind.PERMANENT, code, message))


# -- the client ---------------------------------------------------------------------------------


class HiDreamClient(AsyncJobClient):
    """HiDream vton over httpx. The API key is held as ``SecretStr`` and never echoed."""

    name: ClassVar[str] = NAME
    capabilities: ClassVar[Capabilities] = CAPABILITIES
    poll_policy: PollPolicy = DEFAULT_POLL_POLICY

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile = PROFILE,
        api_key: SecretStr,
        base_url: str,
        image_transport: ImageTransport = "base64",
        base64_prefix: bool = False,
        notify_url: str | None = None,
        result_path: str = DEFAULT_RESULT_PATH,
        status_map: Mapping[int, JobState] = DEFAULT_STATUS_MAP,
        failure_codes: Mapping[int, str] = DEFAULT_FAILURE_CODES,
        error_table: Mapping[int, ErrorSpec] = ERROR_TABLE,
        poll_policy: PollPolicy | None = None,
        timeout: float = 60.0,
    ) -> None:
        """``base64_prefix``: send ``data:<mime>;base64,...`` instead of raw base64. The doc
        says only "base64"; raw is what HiDream's own sibling examples send (UNVERIFIED)."""
        super().__init__(http=http, profile=profile)
        api_key = require_key(api_key, provider=NAME)
        if image_transport not in ("base64", "url"):
            raise ValueError(f"image_transport must be base64 or url: {image_transport!r}")
        if not result_path.startswith("/"):
            raise ValueError(f"result_path must start with '/': {result_path!r}")
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.image_transport: ImageTransport = image_transport
        self.base64_prefix = base64_prefix
        self.notify_url = notify_url
        self.result_path = result_path
        self.status_map: Mapping[int, JobState] = dict(status_map)
        self.failure_codes: Mapping[int, str] = dict(failure_codes)
        self.error_table: Mapping[int, ErrorSpec] = dict(error_table)
        if poll_policy is not None:
            self.poll_policy = poll_policy
        self.timeout = timeout

    @classmethod
    def from_env(
        cls,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile = PROFILE,
        **options: Any,
    ) -> HiDreamClient:
        """Key from ``HIDREAM_API_KEY``, base URL from ``TRYON_HIDREAM_BASE_URL``; ``options``
        are the constructor's (transport, result_path, status_map, poll_policy...)."""
        return cls(
            http=http,
            profile=profile,
            api_key=key_from_env(API_KEY_ENV, provider=NAME),
            base_url=settings.base_url(NAME, DEFAULT_BASE_URL),
            **options,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, "
            f"image_transport={self.image_transport!r}, result_path={self.result_path!r})"
        )

    # -- submit ---------------------------------------------------------------------------------

    def build_body(self, request: TryOnRequest, request_id: str) -> dict[str, str]:
        """The JSON body for ``request``; unsupported shapes raise before anything is sent."""
        garment, lower = request.garment, request.lower_garment
        if garment is None:
            raise unsupported_request(NAME, "needs a garment image")
        body = {"person": self._image(request.person)}
        if request.category == "upper_body":
            body["upper_clothes"] = self._image(garment)
            if lower is not None:
                body["lower_clothes"] = self._image(lower)
        elif request.category == "lower_body":
            if lower is not None:
                raise unsupported_request(NAME, "category lower_body with a second lower garment")
            body["lower_clothes"] = self._image(garment)
        elif request.category == "dresses":
            if lower is not None:  # the doc: dress is exclusive with upper/lower clothes
                raise unsupported_request(NAME, "a dress cannot be combined with a lower garment")
            body["dress"] = self._image(garment)
        else:
            raise unsupported_category(NAME, request.category)
        body["request_id"] = request_id
        if self.notify_url:
            body["notify_url"] = self.notify_url
        return body

    async def submit(self, request: TryOnRequest) -> str:
        """Submit one try-on; returns HiDream's task id."""
        # A fresh UUID per call, as the doc's example does: row ids may be long or odd-charactered
        # and a retry must not look like a duplicate of the first attempt.
        request_id = str(uuid.uuid4())
        body = self.build_body(request, request_id)
        response = await self._send("POST", SUBMIT_PATH, json=body, request_id=request_id)
        _log.debug("hidream submit -> HTTP %s", response.status_code)
        return parse_submit_response(
            response.status_code,
            response.headers,
            response.content,
            request_id=request_id,
            error_table=self.error_table,
            redact=[self._api_key.get_secret_value()],
        )

    # -- poll -----------------------------------------------------------------------------------

    async def poll(self, job_id: str) -> JobStatus:
        """One query of the (configurable) result endpoint."""
        response = await self._send(
            "GET", self.result_path, params={"task_id": job_id}, request_id=job_id
        )
        _log.debug("hidream poll -> HTTP %s", response.status_code)
        return parse_result_response(
            response.status_code,
            response.headers,
            response.content,
            task_id=job_id,
            status_map=self.status_map,
            failure_codes=self.failure_codes,
            error_table=self.error_table,
            redact=[self._api_key.get_secret_value()],
        )

    # -- transport ------------------------------------------------------------------------------

    def _image(self, image: PreparedImage) -> str:
        if self.image_transport == "url":
            return staged_url(image, provider=NAME)
        encoded = base64.b64encode(image.data).decode("ascii")
        return f"data:{image.mime};base64,{encoded}" if self.base64_prefix else encoded

    async def _send(
        self, method: str, path: str, *, request_id: str, **kwargs: Any
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
