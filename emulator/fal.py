"""The fal.ai queue as the emulator speaks it, for the try-on models it resells.

``POST /{model_id}`` (JSON, ``Authorization: Key <FAL_KEY>``) queues a request and answers
``{request_id, status: IN_QUEUE, queue_position, status_url, response_url, cancel_url}``;
``GET /{app_id}/requests/{id}/status`` answers ``IN_QUEUE`` (with ``queue_position``),
``IN_PROGRESS`` or ``COMPLETED`` (all HTTP 200; with ``error`` and ``error_type`` when it failed);
``GET /{app_id}/requests/{id}`` the model's output (``images: [File]`` or ``image: File``) or
its error: a model error as ``{detail: [{loc, msg, type, url}]}`` (422), a request error as
``{detail, error_type}`` with ``X-Fal-Error-Type``. The ``app_id`` is the model id's first two
segments, as fal's queue documents. Sources: ``providers/fal/settings.py`` and ``errors.py``;
this module keeps its own tables on purpose, so a slip on either side shows in the contract
tests.

What the emulator checks, strictly: the ``Key`` scheme and the key (401 otherwise, ``Bearer``
included), JSON object bodies (422), the account's balance (``FaultPlan.credits``: one per
successful request, given back if it fails; none left: 403 ``User is locked. Reason: Exhausted
balance...``), 10 submissions a second per key (429 beyond; polls and results are not
counted, as fal's own client polls every 0.1 s), the request id under the model's own app
(404 elsewhere). Then, as fal's runner would (the request is accepted and COMPLETES with the
error): each model's required fields and their types, categories, images (data URI or http(s)
URL; decoded header; sides and bytes within the model's limits). Jobs go IN_QUEUE ->
IN_PROGRESS -> COMPLETED over ``job_queued_s`` / ``job_running_s``; results are stored for
``result_ttl_s`` (fal: at least 7 days), bad outputs swapped in by the fault plan.

UNVERIFIED (our reading; the client accepts any 2xx for a status): 404
for an unknown request, 400 for a result asked before COMPLETED; the texts of auth errors.

Fault plan: latency, HTML 503, hangs (then 504 ``request_timeout``), 429 (gateway, with
``Retry-After``), ``async_failure_rate`` (a quarter ``content_policy_violation``, the rest
``runner_server_error``), ``forced_codes`` for submissions: an int answers that HTTP status
(401, 403 balance, 422, 429, 5xx), ``"job:<type>"`` makes the next request fail with that
model or request error type.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulator import common, composite
from emulator.common import (
    INJECTED,
    Admitted,
    Credit,
    GatewayAnswers,
    InputError,
    VendorApi,
    cache_key,
    decode_data_uri,
    fetch_url,
)
from emulator.jobs import EmulatedJob, JobPhase
from emulator.plugins import EmulatedProvider
from emulator.state import EmulatorState, QuotaError

PROVIDER = "fal"
API_KEY_ENV = "FAL_KEY"
DEFAULT_KEY = "emulator-fal-key"
_KEY = re.compile(r"^Key (\S+)$", re.IGNORECASE)
RATE_LIMIT_PER_S = 10  # submissions per key per second
MB = 1024 * 1024
MODERATED_SHARE = 0.25  # of async failures: content_policy_violation, else runner_server_error
FAILED_JOBS_BILLED = False
ERRORS_URL = "https://docs.fal.ai/errors"
EXHAUSTED = (
    "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
)
# Request (infrastructure) error types and their statuses (docs "Request Error Types").
REQUEST_ERRORS: dict[str, int] = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_disconnected": 503,
    "runner_incomplete_response": 502,
    "runner_server_error": 500,
    "internal_error": 500,
}


@dataclass(frozen=True, slots=True)
class Model:
    """One model's input schema as the runner validates it."""

    model_id: str
    person: str
    garment: str
    category: str | None  # field name; None: none taken
    categories: dict[str, str]  # value -> composite region
    default_category: str
    min_side: int
    max_side: int
    max_bytes: int
    output: str  # "images" | "image"

    @property
    def app_id(self) -> str:
        return "/".join(self.model_id.split("/")[:2])


FASHN = Model(
    model_id="fal-ai/fashn/tryon/v1.6",
    person="model_image",
    garment="garment_image",
    category="category",
    categories={
        "tops": "upper_body",
        "bottoms": "lower_body",
        "one-pieces": "dresses",
        "auto": "upper_body",
    },
    default_category="auto",
    min_side=256,  # FASHN states none: ours, as the client's profile
    max_side=4096,
    max_bytes=10 * MB,
    output="images",
)
KOLORS = Model(
    model_id="fal-ai/kling/v1-5/kolors-virtual-try-on",
    person="human_image_url",
    garment="garment_image_url",
    category=None,
    categories={},
    default_category="",
    min_side=300,  # Kling's own limits: >= 300 px, <= 10 MB
    max_side=4096,
    max_bytes=10 * MB,
    output="image",
)
MODELS: dict[str, Model] = {m.model_id: m for m in (FASHN, KOLORS)}


def accepted_key() -> str:
    """The key the emulator accepts: ``FAL_KEY`` from its environment, else the default."""
    return os.environ.get(API_KEY_ENV) or DEFAULT_KEY


class VendorError(common.VendorError[int]):
    """Ends a call with an HTTP status and fal's ``{"detail": ...}``."""


class _Failure(Exception):
    """How a request ends failed: a model error type (422) or a request error type."""

    def __init__(self, kind: str, message: str, loc: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.loc = loc or ["body"]


def routes(state: EmulatorState) -> list[Route]:
    """Each model's submit path, and each app's status and result paths."""
    api = _FalApi(state)
    found: list[Route] = []
    for model in MODELS.values():
        found.append(Route(f"/{model.model_id}", _bound(api.submit, model), methods=["POST"]))
    for app_id in sorted({m.app_id for m in MODELS.values()}):
        base = f"/{app_id}/requests/{{request_id}}"
        found.append(Route(f"{base}/status", _bound(api.status, app_id), methods=["GET"]))
        found.append(Route(base, _bound(api.result, app_id), methods=["GET"]))
    return found


def _bound(
    handler: Callable[[Any, Request], Awaitable[Response]], arg: Any
) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` with its first argument bound, as a plain function (Starlette takes only
    functions as request handlers)."""

    async def endpoint(request: Request) -> Response:
        return await handler(arg, request)

    return endpoint


class _FalApi(VendorApi[int]):
    error_type = VendorError
    internal_error = 500

    def __init__(self, state: EmulatorState) -> None:
        super().__init__(state, PROVIDER, accepted_key())
        self.gateway = GatewayAnswers(timed_out=_gateway_timeout, rate_limited=self._rate_limited)
        self._submitted: dict[str, deque[float]] = {}  # per key: submission times, last second
        self._queue: list[EmulatedJob] = []  # for queue_position

    # -- calls ----------------------------------------------------------------------------------

    async def submit(self, model: Model, request: Request) -> Response:
        return await self._call(request, partial(self._submit, model))

    async def status(self, app_id: str, request: Request) -> Response:
        return await self._call(request, partial(self._status, app_id))

    async def result(self, app_id: str, request: Request) -> Response:
        return await self._call(request, partial(self._result, app_id))

    def _authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization")
        if header is None:
            raise VendorError(401, "Missing authorization header")
        match = _KEY.match(header)
        if match is None:
            raise VendorError(401, "Authorization must be 'Key <FAL_KEY>'")
        token = match[1]
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise VendorError(401, self._echo("key", token) or "Invalid key")
        return token

    # -- submit ---------------------------------------------------------------------------------

    async def _submit(
        self, model: Model, request: Request, admitted: Admitted, credit: Credit
    ) -> Response:
        forced = self.provider.pop_forced()
        if isinstance(forced, str) and forced.strip().lstrip("-").isdecimal():
            forced = int(forced)
        if isinstance(forced, int):
            if forced == 403:
                raise VendorError(403, EXHAUSTED)
            if forced == 422:
                raise VendorError(422, INJECTED)
            raise VendorError(forced, INJECTED)
        token = self._authenticate(request)
        self._count_submission(token)
        try:
            credit.take(token, None)
        except QuotaError:
            raise VendorError(403, EXHAUSTED) from None
        if (
            request.headers.get("content-type", "").split(";")[0].strip().lower()
            != "application/json"
        ):
            raise VendorError(422, "Content-Type must be application/json")
        try:
            body = json.loads(admitted.body)
        except (ValueError, UnicodeDecodeError):
            raise VendorError(422, "Body is not valid JSON") from None
        if not isinstance(body, dict):
            raise VendorError(422, "Body must be a JSON object")

        failure: _Failure | None = None
        images: dict[str, bytes] = {}
        region = "upper_body"
        try:
            region = self._region(model, body)
            for field in (model.person, model.garment):
                images[field] = await self._image(model, body, field)
        except _Failure as exc:
            failure = exc
        if failure is None:
            failure = self._drawn_failure(forced)

        ps = self.provider
        person, garment = images.get(model.person, b""), images.get(model.garment, b"")
        job = self.state.jobs.submit(
            provider=PROVIDER,
            queued_s=ps.plan.job_queued_s,
            running_s=ps.plan.job_running_s,
            will_fail=failure is not None,
            render=partial(self._render, person, garment, region, common.base_url(request)),
            meta={"app": model.app_id, "model": model, "failure": failure},
            content=cache_key(model.model_id, person, garment, region),
        )
        credit.hold_for_job(job, bills_failure=FAILED_JOBS_BILLED)
        self._queue.append(job)
        base = f"{common.base_url(request)}/{model.app_id}/requests/{job.job_id}"
        return JSONResponse(
            {
                "request_id": job.job_id,
                "status": "IN_QUEUE",
                "queue_position": self._position(job),
                "status_url": f"{base}/status",
                "response_url": base,
                "cancel_url": f"{base}/cancel",
            }
        )

    def _count_submission(self, token: str) -> None:
        """At most ``RATE_LIMIT_PER_S`` submissions per key in any second of the emulator's
        clock; beyond: 429 (no Retry-After: fal documents none)."""
        now = self.state.clock()
        times = self._submitted.setdefault(token, deque())
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) >= RATE_LIMIT_PER_S:
            raise VendorError(429, f"Rate limit exceeded: {RATE_LIMIT_PER_S} requests per second")
        times.append(now)

    def _region(self, model: Model, body: dict[str, Any]) -> str:
        if model.category is None:
            return "upper_body"
        value = body.get(model.category, model.default_category)
        if value not in model.categories:
            options = ", ".join(repr(v) for v in model.categories)
            raise _Failure("enum", f"Input should be {options}", ["body", model.category])
        return model.categories[value]

    async def _image(self, model: Model, body: dict[str, Any], field: str) -> bytes:
        value = body.get(field)
        loc = ["body", field]
        if value is None:
            raise _Failure("missing", "Field required", loc)
        if not isinstance(value, str) or not value:
            raise _Failure("string_type", "Input should be a valid string", loc)
        try:
            if value.startswith("data:"):
                data = decode_data_uri(value, field)
            elif value.lower().startswith(("http://", "https://")):
                data = await fetch_url(self.state.http, value, field, model.max_bytes)
            else:
                raise InputError(f"{field}: neither a URL nor a data URI")
        except InputError as exc:
            kind = "file_download_error" if value.lower().startswith("http") else "image_load_error"
            raise _Failure(kind, str(exc), loc) from None
        if len(data) > model.max_bytes:
            raise _Failure("file_too_large", f"{len(data)} bytes, at most {model.max_bytes}", loc)
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only: cheap
                width, height = image.size
        except Image.DecompressionBombError:
            raise _Failure("image_too_large", "too many pixels", loc) from None
        except (OSError, ValueError, SyntaxError):
            raise _Failure("image_load_error", "Failed to load the image", loc) from None
        if min(width, height) < model.min_side:
            raise _Failure("image_too_small", f"{width}x{height}: sides >= {model.min_side}", loc)
        if max(width, height) > model.max_side:
            raise _Failure("image_too_large", f"{width}x{height}: sides <= {model.max_side}", loc)
        return data

    def _drawn_failure(self, forced: int | str | None) -> _Failure | None:
        """A forced ``job:<type>``, else the plan's ``async_failure_rate`` (two draws, always)."""
        if isinstance(forced, str) and forced.startswith("job:"):
            kind = forced[4:]
            return _Failure(kind, f"{kind} ({INJECTED})")
        rng = self.provider.seed_rng
        u_fail, u_moderated = rng.random(), rng.random()
        if u_fail >= self.provider.plan.async_failure_rate:
            return None
        if u_moderated < MODERATED_SHARE:
            return _Failure(
                "content_policy_violation",
                "The content was flagged by a content checker.",
                ["body", "garment_image"],
            )
        return _Failure("runner_server_error", "The runner encountered an internal server error.")

    async def _render(self, person: bytes, garment: bytes, region: str, base_url: str) -> str:
        key, render = common.garment_render(
            self.state, person, garment, region, label="fal", vendor="fal"
        )
        rendered = await self.state.composites.get_or_compute(key, render)
        data = await common.handed_out(self.state, self.provider, rendered.result, person)
        return common.store_result(self.state, base_url, data)

    # -- status and result ----------------------------------------------------------------------

    def _job(self, app_id: str, request: Request) -> EmulatedJob:
        self._authenticate(request)
        job = self.state.jobs.get(PROVIDER, request.path_params["request_id"])
        if job is None or job.meta["app"] != app_id:
            raise VendorError(404, "Request not found")
        return job

    def _position(self, job: EmulatedJob) -> int:
        now = self.state.clock()
        self._queue = [j for j in self._queue if j.phase(now) is JobPhase.QUEUED]
        return next((i for i, j in enumerate(self._queue) if j is job), 0)  # submission order

    async def _finish(self, job: EmulatedJob) -> None:
        """Render a job found done, once; an input that does not decode fails it."""
        if job.phase() is JobPhase.DONE and job.result is None:
            try:
                await job.outcome()
            except composite.UndecodableImage as exc:
                job.fail()
                job.meta["failure"] = _Failure(
                    "image_load_error", f"Failed to load the image: {exc}"
                )

    async def _status(
        self, app_id: str, request: Request, admitted: Admitted, credit: Credit
    ) -> Response:
        job = self._job(app_id, request)
        await self._finish(job)
        phase = job.phase()
        base = f"{common.base_url(request)}/{app_id}/requests/{job.job_id}"
        urls = {
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
        }
        logs = [] if request.query_params.get("logs") in ("1", "true", "True") else None
        if phase is JobPhase.QUEUED:
            answer = {"status": "IN_QUEUE", "queue_position": self._position(job), **urls}
            return JSONResponse(answer)
        if phase is JobPhase.RUNNING:
            return JSONResponse({"status": "IN_PROGRESS", "logs": logs, **urls})
        answer: dict[str, Any] = {
            "status": "COMPLETED",
            "logs": logs,
            "metrics": {"inference_time": job.running_s},
            **urls,
        }
        failure: _Failure | None = job.meta["failure"]
        if phase is JobPhase.FAILED and failure is not None:
            answer["error"] = failure.message
            answer["error_type"] = failure.kind
        return JSONResponse(answer)

    async def _result(
        self, app_id: str, request: Request, admitted: Admitted, credit: Credit
    ) -> Response:
        job = self._job(app_id, request)
        await self._finish(job)
        phase = job.phase()
        if phase in (JobPhase.QUEUED, JobPhase.RUNNING):
            raise VendorError(400, "Request is still in progress")
        if phase is JobPhase.FAILED:
            return self._failure(job.meta["failure"])
        model: Model = job.meta["model"]
        url = await job.outcome()
        file = {"url": url, "content_type": "image/webp", "file_name": url.rsplit("/", 1)[-1]}
        output = {"images": [file]} if model.output == "images" else {"image": file}
        return JSONResponse({**output, "seed": 0})

    def _failure(self, failure: _Failure) -> Response:
        status = REQUEST_ERRORS.get(failure.kind)
        if status is not None:
            self.provider.record(status)
            body = {"detail": failure.message, "error_type": failure.kind}
            return JSONResponse(
                body, status_code=status, headers={"X-Fal-Error-Type": failure.kind}
            )
        self.provider.record(422)
        detail = [
            {
                "loc": failure.loc,
                "msg": failure.message,
                "type": failure.kind,
                "url": f"{ERRORS_URL}#{failure.kind}",
            }
        ]
        return JSONResponse(
            {"detail": detail}, status_code=422, headers={"X-Fal-Retryable": "false"}
        )

    # -- answers --------------------------------------------------------------------------------

    def _rate_limited(self) -> Response:
        return common.rate_limited(self.provider, {"detail": "Too many requests"})

    def _error(self, code: int, detail: str | None = None) -> Response:
        if code == 429 and detail == INJECTED:
            return self._rate_limited()
        self.provider.record(code)
        if code >= 500 and code not in (500, 502, 503, 504):
            return Response(f"<html><body>{code}</body></html>", code, media_type="text/html")
        if code >= 500:
            kind = {500: "internal_error", 502: "runner_incomplete_response"}.get(
                code, "runner_scheduling_failure" if code == 503 else "request_timeout"
            )
            body = {"detail": detail or kind, "error_type": kind}
            return JSONResponse(body, code, headers={"X-Fal-Error-Type": kind})
        if code == 422:
            item = {
                "loc": ["body"],
                "msg": detail or "invalid",
                "type": "value_error",
                "url": ERRORS_URL,
            }
            return JSONResponse({"detail": [item]}, 422)
        return JSONResponse({"detail": detail or "error"}, code)


def _gateway_timeout() -> Response:
    body = {"detail": "Request timed out", "error_type": "request_timeout"}
    return JSONResponse(body, 504, headers={"X-Fal-Error-Type": "request_timeout"})


EMULATED = EmulatedProvider(name=PROVIDER, routes=routes, default_keys={API_KEY_ENV: DEFAULT_KEY})
