"""AILabTools' wire, shared by the try-on and refiner clients: submit, poll, parse.

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

Balance: ``GET /api/common/query-credits``, header ``ailabapi-api-key``, no parameters.
Read in the docs (not tried on a live account): www.ailabtools.com/docs/ai-common/
querying-credits/api, from repo ailabtools-tobias/ailabtools-docs at 6ddd5d1 (2026-06-25),
``docs/ai-common/querying-credits/api.mdx`` and the schema in ``openapi.json``; the official
SDK ailabtools/ailabtools-sdk ``packages/go/common.go`` reads ``data`` as a list too. The answer
is the public fields plus a required ``data`` array, "credit entries grouped by API", each
``{unique_sign, name, balance, total, last_recharge_balance, balance_warning, first_buy_time,
last_update_time}``: ``balance`` a float, the "current credit balance"; ``total`` the credits
ever bought; the two times Unix timestamps. ``unique_sign`` ``common`` is "Universal credits (all
APIs supported)"; each other sign is one API's own credits (``portrait_try_on_clothes``,
``portrait_try_on_clothes_refiner``, ...). Success is HTTP 200 and errors are the public table's,
as for every call (a bad key: 401 ``ERROR_APPLICATIONS_NOT_EXISTS`` or
``ERROR_USER_NOT_EXISTS``, fatal). ``credits_balance`` answers the ``common`` entry's balance,
rounded down: the credits both APIs can spend.

UNVERIFIED: that the billing notes' "10 credits" / "25 credits" are counted in the same unit as
``balance`` (the docs use one word, "credits", for both); what an account with no universal
credits answers (we read no ``common`` entry as 0); whether one API's own credits are spent
before the universal ones (they are not counted, so the balance can only be understated and a
check errs on refusing). The docs' first example (2025) showed ``data`` as one object, against
their own field table; the schema and examples since show an array, the only shape accepted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import SecretStr

from providers.ailab.errors import ERROR_TABLE, classify
from providers.ailab.settings import NAME
from providers.base import JobState, JobStatus, ProviderError, TryOnResult, parse_retry_after
from providers.common import body_snippet, redact_secrets, require_key, send
from schemas.results import ErrorKind

KEY_HEADER = "ailabapi-api-key"
QUERY_PATH = "/api/common/query-async-task-result"
CREDITS_PATH = "/api/common/query-credits"
# query-credits' ``unique_sign`` of the universal credits, the ones both APIs bill.
UNIVERSAL_CREDITS = "common"

_log = logging.getLogger(__name__)


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


def _error_from(
    env: _Envelope, body: bytes, provider: str, secrets: list[str], *, request_id: str | None
) -> ProviderError:
    charged = False
    if env.payload is None:
        snippet = body_snippet(body)
        if env.status == 200:
            kind, code = ErrorKind.PERMANENT, "MALFORMED_RESPONSE"
            message = f"HTTP 200 without the vendor's JSON: {snippet!r}"
        else:
            kind, code = classify(env.status, "", "")
            message = f"HTTP {env.status} without the vendor's JSON body: {snippet!r}"
    else:
        kind, code = classify(env.status, env.code, env.legacy_code)
        spec = ERROR_TABLE.get(code)
        charged = spec.charged if spec else False
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
        charged=charged,
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


def parse_credits(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    provider: str = NAME,
    redact: Iterable[str] = (),
) -> int:
    """A query-credits answer -> the universal credits left (``common``), rounded down.

    Vendor errors are classified by the error table (a bad key is fatal); a 200 that is not the
    documented shape is a PERMANENT ``MALFORMED_RESPONSE`` naming what is wrong.
    """
    secrets = [s for s in redact if s]
    env = _envelope(status, headers, body)
    if not env.ok:
        raise _error_from(env, body, provider, secrets, request_id=None)
    assert env.payload is not None

    def malformed(what: str) -> ProviderError:
        return ProviderError(
            kind=ErrorKind.PERMANENT,
            code="MALFORMED_RESPONSE",
            message=f"query-credits answered {what}",
            provider=provider,
            http_status=status,
            request_id=env.request_id,
        )

    entries = env.payload.get("data")
    if not isinstance(entries, list):
        raise malformed(f"without a data array (data: {type(entries).__name__})")
    balances: list[float] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("unique_sign"), str):
            raise malformed(f"data[{index}] without a unique_sign")
        balance = entry.get("balance")
        # bool is an int to Python, and json.loads takes NaN and Infinity: none is a balance.
        if isinstance(balance, bool) or not isinstance(balance, int | float):
            raise malformed(f"data[{index}] without a numeric balance")
        if not math.isfinite(balance):
            raise malformed(f"data[{index}] with balance {balance}")
        if entry["unique_sign"] == UNIVERSAL_CREDITS:
            balances.append(balance)
    if len(balances) > 1:
        raise malformed(f"{len(balances)} {UNIVERSAL_CREDITS!r} entries")
    # No universal credits listed: none to spend (see the module docstring).
    return math.floor(balances[0]) if balances else 0


# -- the wire: one key, one base URL, shared by both clients -----------------------------------


class Wire:
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
        return f"Wire(provider={self.provider!r}, base_url={self.base_url!r})"

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

    async def credits_balance(self) -> int:
        """The account's universal credits left (``parse_credits``); raises ``ProviderError``."""
        key = self._api_key.get_secret_value()
        response = await self._send("GET", CREDITS_PATH)
        _log.debug("%s query-credits -> HTTP %s", self.provider, response.status_code)
        return parse_credits(
            response.status_code,
            response.headers,
            response.content,
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
        return await send(
            self.http,
            method,
            self.base_url + path,
            provider=self.provider,
            timeout=self.timeout,
            secrets=[key],
            files=files,
            params=params,
            headers={KEY_HEADER: key},
        )
