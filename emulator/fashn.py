"""FASHN's API as the emulator speaks it: ``POST /v1/run``, ``GET /v1/status/{id}``,
``GET /v1/credits``. Registered only through the entry-point group ``tryon_flows.emulator``
(``EMULATED``), as a third party's emulator module would be.

What the vendor documents (docs.fashn.ai, see ``providers/fashn/client.py``) and the emulator
enforces:

- Bearer auth: a missing, malformed or unknown key is 401 ``UnauthorizedAccess``
  (``{"error": "UnauthorizedAccess", "message": "Unauthorized: Invalid token"}``).
- ``/v1/run``: JSON ``{"model_name", "inputs": {"model_image", "garment_image", ...}}``;
  ``category`` in auto | tops | bottoms | one-pieces; the try-on's optional fields by type and
  value; images as http(s) URL or a base64 data URI (the docs: "must include the proper
  prefix"). Anything else is 400 ``BadRequest``. Answers ``{"id", "error": null}``.
- Rate limits per key, sliding windows on the emulator's clock: 50 ``/run`` per 60 s, 50
  ``/status`` per 10 s, 30 ``/credits`` per 10 s; past them 429 ``RateLimitExceeded``.
- Credits (``FaultPlan.credits``, FASHN's credits: one an output image): none left is 429
  ``OutOfCredits``; ``/v1/credits`` answers ``{"credits": {"total", "subscription",
  "on_demand"}}``.
- Jobs (``emulator/jobs.py``): ``starting``/``in_queue`` for ``job_queued_s``, ``processing``
  for ``job_running_s``, then ``completed`` with ``output: [url]`` or ``failed`` with
  ``error: {name, message}``. An input that does not load is a runtime ``ImageLoadError``
  (the docs list it among runtime errors: the request was accepted). Result URLs expire after
  ``result_ttl_s`` (the vendor keeps 72 h), and the prediction is forgotten then too (404
  ``NotFound``, "no longer tracked").

UNVERIFIED (our assumptions, kept apart from the client's on purpose): the concurrency limit's
number (6, a third party's transcription; 429 ``ConcurrencyLimitExceeded`` is documented);
``Retry-After`` on 429 (sent here: the client honours it where it comes); unknown ``inputs``
fields rejected (400) rather than ignored; a side over 2000 px failing the prediction with
``InputValidationError`` rather than being scaled down; the JSON bodies of 404 and 500 (the
documented ``{"error", "message"}`` shape); a failed prediction gives its credit back.

Fault plan extras: ``forced_codes`` entries ``"failed:<Name>"`` wait for the next ``/run``,
which is accepted and whose prediction ends failed with runtime error ``<Name>``
(``failed:PoseError``); an API error name answers the next call with it (``OutOfCredits``,
``ConcurrencyLimitExceeded`` and ``BadRequest`` the next ``/run``: only a submission meets
them; ``UnauthorizedAccess``, ``InternalServerError``... any call); the int
429 is the gateway's rate limit, another int a proxy's HTML page with that status.
``async_failure_rate`` draws failures among ``PoseError`` and ``ContentModerationError``.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import math
import re
from collections import deque
from functools import partial
from typing import Any, Final

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
    fetch_url,
)
from emulator.jobs import EmulatedJob, JobPhase
from emulator.keys import accepted_key
from emulator.plugins import EmulatedProvider
from emulator.state import EmulatorState, QuotaError

PROVIDER: Final = "fashn"
API_KEY_ENV: Final = "FASHN_API_KEY"
DEFAULT_KEY: Final = "emulator-fashn-key"
RUN_PATH: Final = "/v1/run"
STATUS_PATH: Final = "/v1/status/{prediction_id}"
CREDITS_PATH: Final = "/v1/credits"

MODELS: Final = ("tryon-v1.6", "tryon-v1.5")
CATEGORIES: Final[dict[str, str]] = {
    "tops": "upper_body",
    "bottoms": "lower_body",
    "one-pieces": "dresses",
    "auto": "upper_body",  # what our stand-in model detects: a top
}
# The try-on's optional inputs (api-reference/tryon-v1-6 and, for v1.5, fashn-api/endpoints):
# allowed values, or the type.
CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "category": tuple(CATEGORIES),
    "mode": ("performance", "balanced", "quality"),
    "garment_photo_type": ("auto", "model", "flat-lay"),
    "moderation_level": ("conservative", "permissive", "none"),
    "output_format": ("png", "jpeg"),
}
BOOLEANS: Final = (
    "segmentation_free",
    "return_base64",
    "nsfw_filter",
    "cover_feet",
    "adjust_hands",
    "restore_background",
    "restore_clothes",
    "long_top",
)
INTEGERS: Final = ("seed", "num_samples")
IMAGE_FIELDS: Final = ("model_image", "garment_image")
MAX_SAMPLES: Final = 4  # UNVERIFIED: num_samples 1..4
MAX_SIDE: Final = 2000  # "1K endpoints (e.g., Try-On v1.6): max 2000px on the longest edge"
MAX_IMAGE_BYTES: Final = 16 * 1024 * 1024  # UNVERIFIED: a bound on one decoded input

# Rate limits (count, window in seconds) per key and endpoint (fashn-api/endpoints; the
# credits endpoint's page).
LIMITS: Final[dict[str, tuple[int, float]]] = {
    "run": (50, 60.0),
    "status": (50, 10.0),
    "credits": (30, 10.0),
}
MAX_CONCURRENT: Final = 6  # UNVERIFIED: predictions of one account not yet ended
UNLIMITED_CREDITS: Final = 1_000_000_000  # what /v1/credits answers when the plan sets none
FAILED_JOBS_BILLED: Final = False  # UNVERIFIED, as the client assumes

# API-level errors: HTTP status and the default message.
API_ERRORS: Final[dict[str, tuple[int, str]]] = {
    "BadRequest": (400, "Bad request"),
    "UnauthorizedAccess": (401, "Unauthorized: Invalid token"),
    "NotFound": (404, "Prediction not found or no longer tracked"),
    "RateLimitExceeded": (429, "Rate limit exceeded"),
    "ConcurrencyLimitExceeded": (429, "Too many concurrent predictions"),
    "OutOfCredits": (429, "You have run out of API credits"),
    "InternalServerError": (500, "Internal server error"),
}
RUNTIME_MESSAGES: Final[dict[str, str]] = {
    "ImageLoadError": "Error loading model or garment image",
    "PoseError": "Could not detect a pose in the model image (emulated)",
    "ContentModerationError": "Prohibited content detected (emulated)",
    "InputValidationError": "An input failed validation",
    "PipelineError": "Unexpected pipeline error (emulated)",
}
MODERATED_SHARE: Final = 0.5  # of async failures: ContentModerationError, else PoseError
FORCED_FAILURE = re.compile(r"^failed:(\w+)$")
# Forced API errors only a /run can meet: they wait in the queue for one.
SUBMISSION_ONLY: Final = frozenset({"OutOfCredits", "ConcurrencyLimitExceeded", "BadRequest"})


class VendorError(common.VendorError[str]):
    """Ends a call with one of FASHN's API-level errors (``API_ERRORS``)."""


class _RetryDetail(str):
    """An error detail that also says when to come back (a rate-limit window's opening)."""

    retry_after: int = 1


def routes(state: EmulatorState) -> list[Route]:
    """FASHN's endpoints, bound to the shared state."""
    api = _FashnApi(state)
    return [
        Route(RUN_PATH, api.run, methods=["POST"], name="fashn_run"),
        Route(STATUS_PATH, api.status, methods=["GET"], name="fashn_status"),
        Route(CREDITS_PATH, api.credits, methods=["GET"], name="fashn_credits"),
    ]


class _FashnApi(VendorApi[str]):
    error_type = VendorError
    internal_error = "InternalServerError"

    def __init__(self, state: EmulatorState) -> None:
        super().__init__(state, PROVIDER, accepted_key(API_KEY_ENV))
        # Forced codes are taken in _checked: a failed:<Name> entry waits for a /run.
        self.gateway = GatewayAnswers(timed_out=_gateway_timeout, rate_limited=self._rate_limited)
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._active: list[EmulatedJob] = []  # predictions that may not have ended yet

    # -- the endpoints --------------------------------------------------------------------------

    async def run(self, request: Request) -> Response:
        return await self._call(request, self._run)

    async def status(self, request: Request) -> Response:
        return await self._call(request, self._status)

    async def credits(self, request: Request) -> Response:
        """The account's credits. Outside the fault plan (as AILab's query-credits): a run
        asks it once before starting, and must not spend a code queued for a /run on it."""
        try:
            token = self._authenticate(request)
            self._count("credits", token)
        except VendorError as exc:
            return self._error(exc.code, exc.detail)
        self.provider.settle_jobs()  # a failed prediction's credit is back
        left = self.provider.credits_remaining
        total = UNLIMITED_CREDITS if left is None else left
        self.provider.record(200)
        return JSONResponse({"credits": {"total": total, "subscription": 0, "on_demand": total}})

    # -- one call, in the order a gateway and the service would answer -------------------------

    def _checked(self, request: Request, *, submission: bool, route: str) -> tuple[str, str | None]:
        """Forced codes, auth and the rate window: the key, and a runtime error name a forced
        ``failed:<Name>`` gives the next /run."""
        forced = self._pop_forced(submission)
        failure: str | None = None
        if isinstance(forced, str) and (match := FORCED_FAILURE.match(forced)):
            failure = match[1]
        elif forced is not None:
            raise VendorError(str(forced), INJECTED)
        token = self._authenticate(request)
        self._count(route, token)
        return token, failure

    def _pop_forced(self, submission: bool) -> int | str | None:
        forced = self.provider.forced
        if not forced:
            return None
        head = forced[0]
        name = head.strip() if isinstance(head, str) else head
        if isinstance(name, str) and (FORCED_FAILURE.match(name) or name in SUBMISSION_ONLY):
            if not submission:
                return None  # it waits for a /run
            forced.popleft()
            return name
        forced.popleft()
        return head

    def _authenticate(self, request: Request) -> str:
        invalid = VendorError("UnauthorizedAccess")
        token = self._bearer_token(request, missing=invalid, malformed=invalid)
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            detail = self._echo("token", token)
            raise VendorError("UnauthorizedAccess", detail)
        return token

    def _count(self, route: str, token: str) -> None:
        """One call in ``route``'s window for ``token``; past the limit, 429 with the seconds
        until the window has room (``Retry-After``)."""
        limit, window_s = LIMITS[route]
        now = self.state.clock()
        calls = self._windows.setdefault((route, token), deque())
        while calls and calls[0] <= now - window_s:
            calls.popleft()
        if len(calls) >= limit:
            detail = _RetryDetail(f"{limit} requests per {window_s:g} s on {route}")
            detail.retry_after = max(1, math.ceil(calls[0] + window_s - now))
            raise VendorError("RateLimitExceeded", detail)
        calls.append(now)

    # -- /v1/run --------------------------------------------------------------------------------

    async def _run(self, request: Request, admitted: Admitted, credit: Credit) -> Response:
        _, failure = self._checked(request, submission=True, route="run")
        inputs, model = self._body(request, admitted.body)
        samples = int(inputs.get("num_samples", 1))
        self._limit_concurrency()
        try:
            credit.take(self.api_key, None, samples)
        except QuotaError:
            raise VendorError("OutOfCredits") from None

        loaded: dict[str, bytes] = {}
        error: tuple[str, str] | None = None
        for field in IMAGE_FIELDS:
            try:
                loaded[field] = await self._image(inputs[field], field)
            except _RuntimeFailure as exc:
                error = error or (exc.name, exc.message)
        if failure is not None:
            error = (failure, RUNTIME_MESSAGES.get(failure, "failed (emulated)"))
        elif error is None:
            error = self._draw_failure()
        category = CATEGORIES[inputs.get("category", "auto")]
        person = loaded.get("model_image", b"")
        key, render = common.garment_render(
            self.state,
            person,
            loaded.get("garment_image", b""),
            category,
            label=f"fashn|{model}",
            vendor=PROVIDER,
        )
        job = self.state.jobs.submit(
            provider=PROVIDER,
            queued_s=self.provider.plan.job_queued_s,
            running_s=self.provider.plan.job_running_s,
            will_fail=error is not None,
            render=partial(self._render, key, render, person),
            meta={
                "error": error,
                "samples": samples,
                "base64": bool(inputs.get("return_base64")),
                "base_url": common.base_url(request),
            },
            content=cache_key(model, category, person, loaded.get("garment_image", b"")),
        )
        credit.hold_for_job(job, bills_failure=FAILED_JOBS_BILLED)
        self._active.append(job)
        return JSONResponse({"id": job.job_id, "error": None})

    def _body(self, request: Request, raw: bytes) -> tuple[dict[str, Any], str]:
        """The checked ``inputs`` and ``model_name`` of a /v1/run body."""
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise VendorError("BadRequest", "Content-Type must be application/json")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise VendorError("BadRequest", "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise VendorError("BadRequest", "body must be a JSON object")
        model = body.get("model_name")
        if not isinstance(model, str) or not model:
            raise VendorError("BadRequest", "model_name is required")
        if model not in MODELS:
            raise VendorError("BadRequest", f"unknown model_name {model!r}")
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            raise VendorError("BadRequest", "inputs is required and must be an object")
        extra = sorted(set(body) - {"model_name", "inputs"})
        if extra:
            raise VendorError("BadRequest", f"unknown top-level fields: {extra}")
        for field in IMAGE_FIELDS:
            value = inputs.get(field)
            if not isinstance(value, str) or not value.strip():
                raise VendorError("BadRequest", f"inputs.{field} is required (image URL or base64)")
        known = {*IMAGE_FIELDS, *CHOICES, *BOOLEANS, *INTEGERS}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise VendorError("BadRequest", f"unknown inputs: {unknown}")
        for field, allowed in CHOICES.items():
            if field in inputs and inputs[field] not in allowed:
                raise VendorError("BadRequest", f"inputs.{field} must be one of {list(allowed)}")
        for field in BOOLEANS:
            if field in inputs and not isinstance(inputs[field], bool):
                raise VendorError("BadRequest", f"inputs.{field} must be a boolean")
        for field in INTEGERS:
            value = inputs.get(field)
            if field in inputs and (isinstance(value, bool) or not isinstance(value, int)):
                raise VendorError("BadRequest", f"inputs.{field} must be an integer")
        samples = inputs.get("num_samples", 1)
        if not 1 <= samples <= MAX_SAMPLES:
            raise VendorError("BadRequest", f"inputs.num_samples must be 1..{MAX_SAMPLES}")
        return inputs, model

    def _limit_concurrency(self) -> None:
        now = self.state.clock()
        self._active = [job for job in self._active if _unfinished(job, now)]
        if len(self._active) >= MAX_CONCURRENT:
            raise VendorError(
                "ConcurrencyLimitExceeded", f"{MAX_CONCURRENT} predictions are already running"
            )

    async def _image(self, value: str, field: str) -> bytes:
        """An input as the pipeline loads it; a failure is the prediction's (runtime) error."""
        try:
            if value.lower().startswith(("http://", "https://")):
                data = await fetch_url(self.state.http, value, field, MAX_IMAGE_BYTES)
            elif value.startswith("data:"):
                data = common.decode_data_uri(value, field)
            else:
                raise InputError(
                    f"{field}: base64 must have the data:image/<format>;base64, prefix"
                )
        except InputError as exc:
            raise _RuntimeFailure("ImageLoadError", str(exc)) from None
        if not data or len(data) > MAX_IMAGE_BYTES:
            raise _RuntimeFailure("ImageLoadError", f"{field}: empty or over {MAX_IMAGE_BYTES} B")
        if self.state.config.fast_mode:  # signature only: no decoding in benchmarks
            if composite.sniff_image(data) is None:
                raise _RuntimeFailure("ImageLoadError", f"{field}: not an image")
            return data
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only: cheap
                width, height = image.size
        except Exception:  # Pillow raises many types on non-images
            raise _RuntimeFailure("ImageLoadError", f"{field}: not a readable image") from None
        if max(width, height) > MAX_SIDE:
            raise _RuntimeFailure(
                "InputValidationError",
                f"{field}: {width}x{height} px, the longest side must be at most {MAX_SIDE}",
            )
        return data

    def _draw_failure(self) -> tuple[str, str] | None:
        """A prediction's runtime failure, if any, from the provider's seeded RNG (two draws,
        always, so the sequence does not depend on the rate)."""
        rng = self.provider.seed_rng
        u_fail, u_kind = rng.random(), rng.random()
        if u_fail >= self.provider.plan.async_failure_rate:
            return None
        name = "ContentModerationError" if u_kind < MODERATED_SHARE else "PoseError"
        return name, RUNTIME_MESSAGES[name]

    async def _render(self, key: str, render: Any, person: bytes) -> bytes:
        rendered = await self.state.composites.get_or_compute(key, lambda: render().result)
        return await common.handed_out(self.state, self.provider, rendered, person)

    # -- /v1/status/{id} ------------------------------------------------------------------------

    async def _status(self, request: Request, admitted: Admitted, credit: Credit) -> Response:
        self._checked(request, submission=False, route="status")
        prediction_id = request.path_params["prediction_id"]
        job = self.state.jobs.get(PROVIDER, prediction_id)
        if job is None or self._forgotten(job):
            raise VendorError("NotFound", f"prediction {prediction_id} is not tracked")
        answer: dict[str, Any] = {"id": job.job_id, "status": "", "output": None, "error": None}
        phase = job.phase()
        if phase is JobPhase.QUEUED:
            elapsed = self.state.clock() - job.submitted
            answer["status"] = "starting" if elapsed < job.queued_s / 2 else "in_queue"
        elif phase is JobPhase.RUNNING:
            answer["status"] = "processing"
        elif phase is JobPhase.DONE:
            try:
                output = await self._output(job)
            except composite.UndecodableImage as exc:
                job.fail()  # the header looked fine but the image does not decode
                job.meta["error"] = (
                    "ImageLoadError",
                    f"{RUNTIME_MESSAGES['ImageLoadError']}: {exc}",
                )
            else:
                answer.update(status="completed", output=[output] * job.meta["samples"])
        if job.phase() is JobPhase.FAILED:
            name, message = job.meta["error"] or (
                "PipelineError",
                RUNTIME_MESSAGES["PipelineError"],
            )
            answer.update(status="failed", error={"name": name, "message": message})
        return JSONResponse(answer)

    async def _output(self, job: EmulatedJob) -> str:
        """The result as FASHN hands it out: a CDN URL, or a data URI with return_base64."""
        if "output" not in job.meta:
            data: bytes = await job.outcome()
            if job.meta["base64"]:
                job.meta["output"] = "data:image/webp;base64," + base64.b64encode(data).decode()
            else:
                job.meta["output"] = common.store_result(self.state, job.meta["base_url"], data)
        return str(job.meta["output"])

    def _forgotten(self, job: EmulatedJob) -> bool:
        """Ended more than ``result_ttl_s`` ago: no longer tracked (the vendor keeps 72 h)."""
        ended = job.submitted + job.queued_s + job.running_s
        return self.state.clock() > ended + self.state.config.result_ttl_s

    # -- answers --------------------------------------------------------------------------------

    def _rate_limited(self, retry_after: int | None = None) -> Response:
        body = {"error": "RateLimitExceeded", "message": API_ERRORS["RateLimitExceeded"][1]}
        if retry_after is None:
            return common.rate_limited(self.provider, body)  # the plan's Retry-After
        self.provider.record(429)
        return JSONResponse(body, 429, headers={"Retry-After": str(retry_after)})

    def _error(self, code: Any, detail: str | None = None) -> Response:
        if code == "RateLimitExceeded" or code == 429 or code == "429":
            return self._rate_limited(getattr(detail, "retry_after", None))
        name = str(code)
        if name not in API_ERRORS:
            status = int(name) if name.isdecimal() and 500 <= int(name) < 600 else 500
            self.provider.record(status)
            return Response(f"<html><body>{status}</body></html>", status, media_type="text/html")
        status, message = API_ERRORS[name]
        self.provider.record(name)
        text = f"{message}: {detail}" if detail else message
        return JSONResponse({"error": name, "message": text}, status)


class _RuntimeFailure(Exception):
    """An input the pipeline cannot use: the prediction is accepted and ends failed."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(name, message)
        self.name = name
        self.message = message


def _unfinished(job: EmulatedJob, now: float) -> bool:
    return job.phase(now) in (JobPhase.QUEUED, JobPhase.RUNNING)


def _gateway_timeout() -> Response:
    """What a hung call finally gets: the gateway's HTML 504."""
    return Response("<html><body>504 Gateway Time-out</body></html>", 504)


EMULATED = EmulatedProvider(name=PROVIDER, routes=routes, default_keys={API_KEY_ENV: DEFAULT_KEY})
