"""AILabTools as the emulator speaks it: Try on Clothes, its Refiner, and the shared async poll.

Endpoints (sources in ``providers/ailab/wire.py``): ``POST /api/portrait/editing/try-on-clothes``,
``POST /api/portrait/enhance/try-on-clothes-refiner`` (multipart, header ``ailabapi-api-key``,
``task_type=async``), ``GET /api/common/query-async-task-result?task_id=`` and
``GET /api/common/query-credits``. Both endpoints bill the one "ailab" account (one fault plan,
one credit counter) in the vendor's credits: ``FaultPlan.credits`` is the universal credits
left, 10 taken by a try-on and 25 by a refine, and query-credits answers it. Jobs live in
``state.jobs``: queued for ``job_queued_s``, running for ``job_running_s``, then done (result
rendered on first need, stored with ``result_ttl_s``; the vendor keeps 24 h) or failed
(``async_failure_rate``). A task is forgotten ``result_ttl_s`` after it ended.

Error answers carry the public fields: ``error_code`` (= HTTP status), ``error_code_str`` and
``error_detail.code`` (both set to the same code here), ``error_msg``. The code table is kept
here on purpose, apart from the client's, so a slip in either shows up in the contract tests.

Faults: latency, HTML 503, hangs (then 504 ``AI_SERVICE_TIMEOUT``), 429 rate limits with
``Retry-After``, credits exhausted (429 ``ERROR_NOT_ENOUGH_CREDITS``). ``forced_codes`` apply to
the next calls (submits and polls alike): a string is an ``error_detail.code`` from ``CODES``
(sent with its documented status); an int is a bare HTTP status with an empty code (429 looks
like the injected rate limit). The balance query takes none of these: see ``query_credits``.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulator import common, composite
from emulator.common import (
    FORM_LIMITS,
    INJECTED,
    Admitted,
    Credit,
    GatewayAnswers,
    VendorApi,
    cache_key,
    is_multipart,
)
from emulator.jobs import EmulatedJob, JobPhase
from emulator.keys import accepted_key
from emulator.state import EmulatorState, QuotaError

PROVIDER = "ailab"
API_KEY_ENV = "AILAB_API_KEY"
KEY_HEADER = "ailabapi-api-key"
TRYON_PATH = "/api/portrait/editing/try-on-clothes"
REFINER_PATH = "/api/portrait/enhance/try-on-clothes-refiner"
QUERY_PATH = "/api/common/query-async-task-result"
CREDITS_PATH = "/api/common/query-credits"
_ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE"]
CLOTHES_TYPES: dict[str, str] = {  # clothes_type -> composite region
    "upper_body": "upper_body",
    "lower_body": "lower_body",
    "full_body": "dresses",
}
GENDERS = ("woman", "man")
MB = 1024 * 1024
# The vendor's billing notes (each API's page): "Each successful API request consumes N credits
# [...]. Failed requests are not billed." A task that ends failed gives its credits back.
FAILED_JOBS_BILLED = False
# N: 10 on the try-on's page, 25 on the refiner's ("Billing Instructions"). Kept apart from the
# client's settings on purpose, as the code table is.
TRYON_CREDITS = 10
REFINER_CREDITS = 25
# query-credits' universal credits ("all APIs supported"), the ones a call here takes.
UNIVERSAL_SIGN = "common"
# The balance answered when the plan sets no credits (unlimited): a billion credits, a thousand
# times the vendor's biggest pack (1,000,000), so any plan a test or a bench makes fits.
UNLIMITED_BALANCE = 1_000_000_000

# Every public error_detail.code by its documented HTTP status (doc/response-description):
# one "<status> <code> <code>..." line each.
_TABLE = """
400 PROCESSING_FAILURE ERROR_PARAMETERS MISSING_PARAMETERS ERROR_INVALID_PARAMETER
400 PARAMETERS_CANNOT_EMPTY ERROR_MISSING_LIMIT_PARAMETER ERROR_MISSING_TASKS_PARAMETER
400 ERROR_MISSING_ASSURE_DIRECTION_PARAMETER ERROR_MISSING_MIN_HEIGHT_PARAMETER
400 ERROR_INVALID_SIDE_PARAMETER ERROR_TOO_MANY_FILES ERROR_FACE_TRACE_LIMIT_EXCEEDED
400 ERROR_INVALID_URL ERROR_DATABASE_LIMIT_EXCEEDED ERROR_INVALID_RESPONSE_FORMAT
400 ERROR_UNSUPPORTED_RESPONSE_FORMAT ERROR_TOO_MANY_GROUPS_IN_GROUP_LIST
400 ERROR_TOO_MANY_UIDS_IN_UID_LIST ERROR_TOO_MANY_APPS_IN_APP_LIST
400 ERROR_BATCH_TASK_LIMIT_EXCEEDED ERROR_CLEANING_USER_GROUP_DATA
400 ERROR_IMAGE_STORAGE_NOT_SUPPORTED ERROR_INSUFFICIENT_RESOURCES ERROR_RESOURCE_IN_TRANSIT
400 ERROR_FILE_DOWNLOAD_FAILED ERROR_FILE_UPLOAD_FAILED FILE_DECODING_FAILURE
400 ERROR_FACE_BLENDING_FAILED ERROR_FACE_IMAGE_ADDITION_FAILED ERROR_GET_FACE_IMAGE_FAILED
400 ERROR_DATA_TRANSFER_FAILED ERROR_TASK_REVOCATION_FAILED ERROR_RESOURCE_UNAVAILABLE
400 ERROR_FILE_DOWNLOAD_TIMEOUT
401 ERROR_USER_NOT_EXISTS ERROR_APPLICATIONS_NOT_EXISTS
403 ERROR_USER_LOCKED AI_SERVICE_UNAUTHORIZED ERROR_ILLEGAL_FILE
404 ERROR_AI_NOT_EXISTS AI_SERVICE_NOT_FOUND ERROR_FILE_NOT_FOUND ERROR_FACE_NOT_FOUND
404 ERROR_USER_GROUP_NOT_FOUND ERROR_USER_NOT_FOUND ERROR_FACE_TOKEN_NOT_FOUND
404 ERROR_CONTENT_NOT_FOUND ERROR_RESOURCE_NOT_FOUND
405 ERROR_ILLEGAL_OPERATION
409 ERROR_FACE_ALREADY_EXISTS ERROR_DATA_ALREADY_EXISTS ERROR_USER_GROUP_ALREADY_EXISTS
409 ERROR_USER_ALREADY_EXISTS ERROR_DUPLICATE_GROUP_NAME ERROR_RESOURCE_IN_USE
409 ERROR_TASK_CONFLICT ERROR_TASK_REVOKED
410 ERROR_RESOURCE_RECLAIMED
413 FILE_SIZE_EXCEEDS_LIMIT ERROR_CONTENT_TOO_LONG ERROR_VIDEO_DURATION_EXCEEDED
413 ERROR_REQUEST_BODY_TOO_LARGE ERROR_RESPONSE_BODY_TOO_LARGE
415 UNSUPPORTED_FILE_TYPES ERROR_INVALID_OUTPUT_FORMAT ERROR_UNSUPPORTED_GRAYSCALE_IMAGE
422 UNSUPPORTED_PARAMETER_VALUES ERROR_INVALID_FACE_BOX_PARAMETER
422 ERROR_INVALID_BIG_EYES_PARAMETER ERROR_INVALID_FACE_SLIMMING_PARAMETER
422 ERROR_INVALID_SMOOTHING_PARAMETER ERROR_INVALID_SKIN_WHITENING_PARAMETER
422 ERROR_INVALID_PARAMETER_FORMAT ERROR_PARAMETER_CONVERSION_FAILED
422 FILE_RESOLUTION_EXCEEDS_LIMITS ERROR_LOW_RESOLUTION ERROR_HIGH_RESOLUTION
422 ERROR_INVALID_FILE FILE_CONTENT_NON_COMPLIANCE ERROR_INCORRECT_FILE_COUNT
422 ERROR_NO_FACE_IN_FILE ERROR_FACE_SIZE_NOT_MEET_REQUIREMENTS ERROR_FACE_SIZE_RATIO_NOT_MET
422 ERROR_SMALL_FACE_SIZE ERROR_FACE_COPY_SCENE_MISMATCH ERROR_FACE_UNRECOGNIZABLE
422 ERROR_POOR_FACE_QUALITY ERROR_BLURRY_FACE ERROR_OBSTRUCTED_FACE ERROR_POOR_FACE_LIGHTING
422 ERROR_INCOMPLETE_FACE ERROR_FACE_NOT_FACING_FORWARD ERROR_MISSING_OUTPUT_FORMAT
422 ERROR_QUALITY_SCORE_NOT_MEET_REQUIREMENTS ERROR_QUALITY_CONTROL_ERROR
422 ERROR_LIVENESS_CONTROL_ERROR ERROR_SCENE_TYPE_MISMATCH ERROR_CARTOON_FACE_NOT_SUPPORTED
422 ERROR_TEMPLATE_IMAGE_QUALITY_TOO_LOW ERROR_ACTION_VERIFICATION_FAILED
422 ERROR_LEFT_EYE_OCCLUSION_TOO_HIGH ERROR_RIGHT_EYE_OCCLUSION_TOO_HIGH
422 ERROR_LEFT_FACE_OCCLUSION_TOO_HIGH ERROR_RIGHT_FACE_OCCLUSION_TOO_HIGH
422 ERROR_CHIN_OCCLUSION_TOO_HIGH ERROR_NOSE_OCCLUSION_TOO_HIGH ERROR_MOUTH_OCCLUSION_TOO_HIGH
422 ERROR_SYNTHESIS_DETECTION_FAILED ERROR_LIVENESS_DETECTION_FAILED
422 ERROR_NO_RECOGNITION_TARGET_DETECTED ERROR_IMAGE_RECOGNITION_FAILED
422 ERROR_MASK_IMAGE_RESOLUTION_MISMATCH ERROR_TASK_STOPPED_PROCESSING EXCEEDING_LIMITS
422 ERROR_CONTENT_NON_COMPLIANCE
429 ERROR_NOT_ENOUGH_CREDITS
500 UNKNOWN_ERROR SERVICE_INTERNAL_ERROR FILE_SERVICE_ERROR AI_SERVICE_ERROR
500 AI_SERVICE_INTERNAL_ERROR
502 ERROR_GATEWAY
503 AI_SERVICE_FLOW_RESTRICTION
504 AI_SERVICE_TIMEOUT
"""
CODES: dict[str, int] = {
    code: int(status)
    for status, *codes in (line.split() for line in _TABLE.strip().splitlines())
    for code in codes
}
# code_message for the codes this emulator raises itself; others get their name in words.
_MESSAGES: dict[str, str] = {
    "ERROR_APPLICATIONS_NOT_EXISTS": "The application does not exist.",
    "ERROR_USER_NOT_EXISTS": "The user does not exist.",
    "ERROR_NOT_ENOUGH_CREDITS": "Insufficient credits.",
    "MISSING_PARAMETERS": "Missing parameters.",
    "UNSUPPORTED_PARAMETER_VALUES": "Invalid parameter values.",
    "UNSUPPORTED_FILE_TYPES": "Unsupported file types.",
    "FILE_SIZE_EXCEEDS_LIMIT": "File size exceeds limit.",
    "ERROR_LOW_RESOLUTION": "File resolution too low.",
    "ERROR_HIGH_RESOLUTION": "File resolution too high.",
    "FILE_DECODING_FAILURE": "File decoding failed.",
    "ERROR_TASK_STOPPED_PROCESSING": "Task has been stopped processing.",
    "AI_SERVICE_TIMEOUT": "AI service timeout.",
}

# -- UNVERIFIED: no public source shows these; change them here ---------------------------------
# A missing key header is answered like an unknown key.
MISSING_KEY_CODE = "ERROR_APPLICATIONS_NOT_EXISTS"
# A failed task: the poll answers HTTP 422 with this code plus output.task_status "FAILED".
FAILED_TASK_CODE = "ERROR_TASK_STOPPED_PROCESSING"
# An unknown or expired task id.
UNKNOWN_TASK_CODE = "ERROR_RESOURCE_NOT_FOUND"
# query-credits called with another method than GET: "Illegal operation", the code the table
# puts under HTTP 405 (Method Not Allowed).
WRONG_METHOD_CODE = "ERROR_ILLEGAL_OPERATION"
# query-credits' entries besides ``common`` (sign, name), listed first and empty: an account
# may hold one API's own credits, and a client must pick the universal entry by its sign, not
# by its place.
OTHER_CREDIT_ENTRIES = (("portrait_try_on_clothes", "Try on Clothes"),)
# A gateway rate limit: HTTP 429, empty code, this error_msg, Retry-After.
RATE_LIMIT_MESSAGE = "Too Many Requests"
# "MB" in the docs read as MiB.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRule:
    """One endpoint's documented input limits (sides are exclusive bounds)."""

    formats: frozenset[str]
    max_bytes: int
    min_side_above: int | None  # "larger than 150x150px"; None where not documented
    max_side_below: int  # "smaller than 4096x4096px"


# Try on Clothes: JPG/JPEG/PNG, <= 3 MB, < 4096x4096 (no minimum documented).
TRYON_RULE = ImageRule(frozenset({"JPEG", "PNG"}), 3 * MB, None, 4096)
# Refiner (doc 004): JPG/JPEG/PNG/BMP, <= 5 MB, > 150x150 and < 4096x4096.
REFINER_RULE = ImageRule(frozenset({"JPEG", "PNG", "BMP"}), 5 * MB, 150, 4096)
_SNIFFED = {"image/jpeg": "JPEG", "image/png": "PNG", "image/bmp": "BMP", "image/gif": "GIF"}


class VendorError(common.VendorError[str]):
    """Ends a call with one of the vendor's codes (an ``error_detail.code`` of ``CODES``)."""


def routes(state: EmulatorState) -> list[Route]:
    """The vendor's endpoints, bound to the shared state."""
    api = _AILabApi(state)
    return [
        Route(TRYON_PATH, api.try_on, methods=["POST"], name="ailab_try_on"),
        Route(REFINER_PATH, api.refine, methods=["POST"], name="ailab_refiner"),
        Route(QUERY_PATH, api.query, methods=["GET"], name="ailab_query_task"),
        # Every method, so a wrong one gets the vendor's code rather than Starlette's 405.
        Route(CREDITS_PATH, api.query_credits, methods=_ANY_METHOD, name="ailab_query_credits"),
    ]


def envelope(status: int, code: str = "", detail: str = "") -> dict[str, Any]:
    """The public response fields; ``error_code`` is 0 on success, else the HTTP status."""
    message = _MESSAGES.get(code) or (code.replace("_", " ").capitalize() + "." if code else "")
    return {
        "request_id": uuid.uuid4().hex,
        "log_id": uuid.uuid4().hex[:16],
        "error_code": 0 if status == 200 else status,
        "error_code_str": code,
        "error_msg": f"{message} - {detail}" if detail else message,
        "error_detail": {
            "status_code": status,
            "code": code,
            "code_message": message,
            "message": detail,
        },
    }


class _AILabApi(VendorApi[str]):
    error_type = VendorError
    internal_error = "SERVICE_INTERNAL_ERROR"

    def __init__(self, state: EmulatorState) -> None:
        super().__init__(state, PROVIDER, accepted_key(API_KEY_ENV))
        self.gateway = GatewayAnswers(
            # A hang ends in the vendor's AI_SERVICE_TIMEOUT (504), counted as that code too.
            timed_out=partial(self._error, "AI_SERVICE_TIMEOUT", "upstream timed out"),
            rate_limited=self._rate_limited,
            forced=self._forced,
        )

    async def try_on(self, request: Request) -> Response:
        call = partial(self._account_call, self._try_on, cost=TRYON_CREDITS)
        return await self._call(request, call)

    async def refine(self, request: Request) -> Response:
        call = partial(self._account_call, self._refine, cost=REFINER_CREDITS)
        return await self._call(request, call)

    async def query(self, request: Request) -> Response:
        return await self._call(request, partial(self._account_call, self._query, cost=0))

    async def query_credits(self, request: Request) -> Response:
        """The account's credits left, as query-credits answers them.

        Outside the fault plan (no injected faults, latency or forced codes, no fault draws):
        a run asks it once before starting, and a code queued for the next submit, or the
        seeded draws of a fault rate, must not be spent on that question."""
        try:
            if request.method != "GET":
                raise VendorError(WRONG_METHOD_CODE, f"{request.method} {CREDITS_PATH}: use GET")
            token = self._authenticate(request)
        except VendorError as exc:
            return self._error(exc.code, exc.detail)
        balance = float(self._balance(token))
        configured = self.provider.plan.credits  # the last credits set: "total purchased"
        total = float(UNLIMITED_BALANCE if configured is None else configured)
        now = int(time.time())
        data = [_credit_entry(sign, name, 0.0, 0.0, now) for sign, name in OTHER_CREDIT_ENTRIES]
        data.append(
            _credit_entry(UNIVERSAL_SIGN, "Universal credits", balance, max(total, balance), now)
        )
        self.provider.record(200)
        return JSONResponse({**envelope(200), "data": data})

    def _balance(self, token: str) -> int:
        """The credits ``token`` may still spend: a trial key's calls left at the try-on's
        price (trial keys count calls), else the account's, ``UNLIMITED_BALANCE`` for none."""
        trial_limit = self.state.config.trial_keys.get(token)
        if trial_limit is not None:
            return max(0, trial_limit - self.provider.trial_used[token]) * TRYON_CREDITS
        self.provider.settle_jobs()  # a failed job's credits are back
        left = self.provider.credits_remaining
        return UNLIMITED_BALANCE if left is None else left

    # -- one call, in the order a real gateway + service would answer --------------------------

    async def _account_call(
        self,
        process: Callable[[Request, Credit], Awaitable[Response]],
        request: Request,
        admitted: Admitted,
        credit: Credit,
        *,
        cost: int,
    ) -> Response:
        """``cost``: the credits a successful call takes (0: free, as a poll)."""
        token = self._authenticate(request)
        if cost:
            try:
                credit.take(token, self.state.config.trial_keys.get(token), cost)
            except QuotaError:
                raise VendorError("ERROR_NOT_ENOUGH_CREDITS") from None
        return await process(request, credit)

    def _authenticate(self, request: Request) -> str:
        token = request.headers.get(KEY_HEADER)
        if not token:
            raise VendorError(MISSING_KEY_CODE, f"header {KEY_HEADER} is missing")
        if not self._known_key(token, deleted="ERROR_USER_NOT_EXISTS"):
            raise VendorError("ERROR_APPLICATIONS_NOT_EXISTS", self._echo(KEY_HEADER, token))
        return token

    # -- the endpoints ------------------------------------------------------------------------

    async def _try_on(self, request: Request, credit: Credit) -> Response:
        async with _form(request) as form:
            _task_type(form)
            clothes_type = _choice(form, "clothes_type", tuple(CLOTHES_TYPES))
            person = await self._image(form, "person_image", TRYON_RULE)
            garment = await self._image(form, "clothes_image", TRYON_RULE)
        region = CLOTHES_TYPES[clothes_type]
        key, compute = common.garment_render(
            self.state, person, garment, region, label="ailab", vendor="ailab"
        )

        async def render() -> bytes:
            rendered = await self.state.composites.get_or_compute(key, compute)
            return await common.handed_out(self.state, self.provider, rendered.result, person)

        return self._submit(request, credit, render, kind="tryon")

    async def _refine(self, request: Request, credit: Credit) -> Response:
        async with _form(request) as form:
            _task_type(form)
            _choice(form, "gender", GENDERS)
            person = await self._image(form, "person_image", REFINER_RULE)
            await self._image(form, "top_garment", REFINER_RULE)
            coarse = await self._image(form, "coarse_image", REFINER_RULE)
            if form.get("bottom_garment") not in (None, ""):
                await self._image(form, "bottom_garment", REFINER_RULE)
        max_side = self.state.config.composite_max_side
        if self.state.config.fast_mode:
            key = f"fast|ailab-refine|{max_side}"
            compute = partial(prerendered_refined, max_side)
        else:
            key = cache_key("ailab-refine", str(max_side), coarse)
            compute = partial(render_refined, coarse, max_side=max_side)

        async def render() -> bytes:
            refined = bytes(await self.state.composites.get_or_compute(key, compute))
            return await common.handed_out(self.state, self.provider, refined, person)

        return self._submit(request, credit, render, kind="refiner")

    def _submit(
        self,
        request: Request,
        credit: Credit,
        render: Callable[[], Awaitable[bytes]],
        kind: str,
    ) -> Response:
        plan = self.provider.plan
        # Always draw, so the failure rate's setting never shifts later draws.
        will_fail = self.provider.seed_rng.random() < plan.async_failure_rate
        base = common.base_url(request)

        async def stored() -> str:
            return common.store_result(self.state, base, await render())

        job = self.state.jobs.submit(
            provider=PROVIDER,
            queued_s=plan.job_queued_s,
            running_s=plan.job_running_s,
            will_fail=will_fail,
            render=stored,
            meta={"kind": kind},
        )
        credit.hold_for_job(job, bills_failure=FAILED_JOBS_BILLED)
        return JSONResponse({**envelope(200), "task_type": "async", "task_id": job.job_id})

    async def _query(self, request: Request, credit: Credit) -> Response:
        task_id = request.query_params.get("task_id", "").strip()
        if not task_id:
            raise VendorError("MISSING_PARAMETERS", "task_id is required")
        job = self.state.jobs.get(PROVIDER, task_id)
        if job is None or self._expired(job):
            raise VendorError(UNKNOWN_TASK_CODE, "no such task, or its results expired")
        kind = job.meta.get("kind")
        phase = job.phase()
        if phase is JobPhase.FAILED:
            return self._task_failed(kind, job.meta.get("failure", "the task failed"))
        url = ""
        if phase is JobPhase.DONE:
            try:
                url = await job.outcome()
            except composite.UndecodableImage as exc:
                job.meta["failure"] = f"an input does not decode: {exc}"
                job.fail()
                return self._task_failed(kind, job.meta["failure"])
        task_status = {JobPhase.QUEUED: 0, JobPhase.RUNNING: 1, JobPhase.DONE: 2}[phase]
        body: dict[str, Any] = {**envelope(200), "task_status": task_status}
        if kind == "tryon":  # the try-on doc's answer shape
            body["data"] = {"image": url}
        else:  # the refiner doc's (doc 004)
            word = {JobPhase.QUEUED: "PENDING", JobPhase.RUNNING: "RUNNING"}.get(phase)
            body["output"] = {"task_status": word or "SUCCEEDED", "image_url": url}
            body["usage"] = {"image_count": 1 if url else 0}
        return JSONResponse(body)

    def _expired(self, job: EmulatedJob) -> bool:
        ended = job.submitted + job.queued_s + job.running_s
        return self.state.clock() > ended + self.state.config.result_ttl_s

    def _task_failed(self, kind: object, detail: str) -> Response:
        body = envelope(CODES[FAILED_TASK_CODE], FAILED_TASK_CODE, detail)
        body["output"] = {"task_status": "FAILED", "image_url": ""}
        if kind == "tryon":
            body["data"] = {"image": ""}
        return JSONResponse(body, status_code=CODES[FAILED_TASK_CODE])

    # -- helpers ------------------------------------------------------------------------------

    async def _image(self, form: FormData, field: str, rule: ImageRule) -> bytes:
        value = form.get(field)
        if value is None or value == "":
            raise VendorError("MISSING_PARAMETERS", f"{field} is required")
        if not isinstance(value, UploadFile):
            raise VendorError("ERROR_INVALID_PARAMETER", f"{field} must be a file")
        data = await value.read(rule.max_bytes + 1)
        if not data:
            raise VendorError("PARAMETERS_CANNOT_EMPTY", f"{field} is empty")
        if len(data) > rule.max_bytes:
            raise VendorError("FILE_SIZE_EXCEEDS_LIMIT", f"{field} exceeds {rule.max_bytes} bytes")
        if self.state.config.fast_mode:  # signature only: no decoding in benchmarks
            sniffed = composite.sniff_image(data)
            fmt = _SNIFFED.get(sniffed or "")
            if fmt not in rule.formats:
                raise VendorError("UNSUPPORTED_FILE_TYPES", f"{field}: {sniffed or 'unknown'}")
            return data
        try:
            with Image.open(io.BytesIO(data)) as image:  # header only: format and size
                fmt, size = image.format, image.size
        except Exception:  # Pillow raises many types on non-images
            raise VendorError("FILE_DECODING_FAILURE", f"{field} is not an image") from None
        fmt = "JPEG" if fmt == "MPO" else fmt  # camera JPEGs with extra frames
        if fmt not in rule.formats:
            allowed = ", ".join(sorted(rule.formats))
            raise VendorError("UNSUPPORTED_FILE_TYPES", f"{field}: {fmt} (allowed: {allowed})")
        if rule.min_side_above is not None and min(size) <= rule.min_side_above:
            raise VendorError(
                "ERROR_LOW_RESOLUTION",
                f"{field}: {size[0]}x{size[1]}, must be larger than "
                f"{rule.min_side_above}x{rule.min_side_above}",
            )
        if max(size) >= rule.max_side_below:
            raise VendorError(
                "ERROR_HIGH_RESOLUTION",
                f"{field}: {size[0]}x{size[1]}, must be smaller than "
                f"{rule.max_side_below}x{rule.max_side_below}",
            )
        return data

    def _forced(self, forced: int | str) -> Response:
        if isinstance(forced, int):  # a bare status (a 429 is the gateway's, see pass_gateway)
            self.provider.record(forced)
            return JSONResponse(envelope(forced, "", "injected status"), status_code=forced)
        return self._error(forced, INJECTED)

    def _rate_limited(self) -> Response:
        body = envelope(429)
        body["error_msg"] = body["error_detail"]["code_message"] = RATE_LIMIT_MESSAGE
        return common.rate_limited(self.provider, body)

    def _error(self, code: str, detail: str | None = None) -> Response:
        self.provider.record(code)
        status = CODES.get(code, 400)  # an unknown forced code: a plain client error
        return JSONResponse(envelope(status, code, detail or ""), status_code=status)


def _credit_entry(sign: str, name: str, balance: float, total: float, now: int) -> dict[str, Any]:
    """One entry of query-credits' ``data``, every documented field set."""
    return {
        "unique_sign": sign,
        "name": name,
        "balance": balance,
        "total": total,
        "last_recharge_balance": total,
        "balance_warning": 0.0,
        "first_buy_time": now,
        "last_update_time": now,
    }


@asynccontextmanager
async def _form(request: Request) -> AsyncIterator[FormData]:
    """The multipart form, with parse failures turned into the vendor's parameter errors."""
    if not is_multipart(request):
        raise VendorError("ERROR_PARAMETERS", "content-type must be multipart/form-data")
    try:
        form = await request.form(**FORM_LIMITS)
    except MultiPartException as exc:
        raise VendorError("ERROR_PARAMETERS", f"malformed multipart: {exc.message}") from None
    try:
        yield form
    finally:
        await form.close()


def _text(form: FormData, field: str) -> str:
    value = form.get(field)
    if isinstance(value, UploadFile):
        raise VendorError("ERROR_INVALID_PARAMETER", f"{field} must be a text field")
    if value is None or not value.strip():
        raise VendorError("MISSING_PARAMETERS", f"{field} is required")
    return value.strip()


def _task_type(form: FormData) -> None:
    if _text(form, "task_type") != "async":
        raise VendorError("UNSUPPORTED_PARAMETER_VALUES", "task_type must be async")


def _choice(form: FormData, field: str, allowed: tuple[str, ...]) -> str:
    value = _text(form, field)
    if value not in allowed:
        raise VendorError("UNSUPPORTED_PARAMETER_VALUES", f"{field} must be one of {allowed}")
    return value


def render_refined(coarse: bytes, *, max_side: int = 768) -> bytes:
    """The coarse result visibly "refined": contrast up, sharpened, tagged REFINED (WEBP)."""
    try:
        image = composite.decode(coarse, max_side)
    except composite.UndecodableImage as exc:
        raise composite.UndecodableImage(f"coarse_image: {exc}") from None
    image = ImageEnhance.Contrast(image).enhance(1.5)
    image = ImageEnhance.Color(image).enhance(1.3)
    image = image.filter(ImageFilter.UnsharpMask(radius=2, percent=180, threshold=2))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, image.height // 40))
    left, top, right, bottom = draw.textbbox((0, 0), "REFINED", font=font)
    # Top-right: clear of the try-on's own EMULATOR tag in the bottom-left corner.
    x, y = image.width - (right - left) - 6, 6
    draw.rectangle((x - 3, y - 3, x + right - left + 3, y + bottom - top + 3), fill=(0, 110, 60))
    draw.text((x - left, y - top), "REFINED", fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=composite.WEBP_QUALITY, method=2)
    return buffer.getvalue()


@lru_cache(maxsize=4)
def prerendered_refined(max_side: int = 768) -> bytes:
    """Fast mode's fixed refiner answer, rendered once per process."""
    coarse = composite.prerendered("garment", "upper_body", max_side).result
    return render_refined(coarse, max_side=max_side)
