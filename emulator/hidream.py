"""HiDream AI virtual try-on (doc 003) as the emulator speaks it: submit a JSON job, poll it.

``POST /api-pub/ec/v3/image/vton/async`` (Bearer auth, JSON: ``person``; ``upper_clothes`` and/or
``lower_clothes``, or ``dress``; images as http(s) URL or base64; ``request_id``; ``notify_url``)
answers ``{code: 0, message, request_id, result: {task_id, sub_task_ids}}`` and starts a job in
the shared ``JobStore`` (queued, then running, then done or failed, per the provider's fault
plan). The result endpoint reports it; a ``notify_url`` gets the same JSON once the job ends.

Everything the document does not say is in the UNVERIFIED block below, with the same defaults as
the client (``providers/hidream/client.py``); the two are kept apart on purpose so a contract test
compares two readings instead of one mirrored table.

Fault plan extras: ``forced_codes`` may hold ``"task_status:N"``: the next submission is accepted
and its job ends with task_status N (e.g. 4, moderated). Other forced ints answer that code
(429 as the gateway's rate limit, an unknown 5xx as the load balancer's HTML page).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
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
from emulator.keys import accepted_key
from emulator.state import EmulatorState, QuotaError

PROVIDER = "hidream"
API_KEY_ENV = "HIDREAM_API_KEY"
SUBMIT_PATH = "/api-pub/ec/v3/image/vton/async"  # (doc)
ACCEPTED_MESSAGE = "请求成功"  # (doc: the example answer's message)
IMAGE_FIELDS = ("person", "upper_clothes", "lower_clothes", "dress")

# ---- UNVERIFIED: our assumptions where doc 003 is silent (client defaults match) ----------------
# Result endpoint and shape: GET <SUBMIT_PATH>/results?task_id=<id>[&request_id=] answering
# {code: 0, message, request_id, result: {task_id, sub_task_results: [{sub_task_id, task_status,
# image, description}]}}, as third parties call HiDream's sibling txt2img/img2img APIs.
RESULT_PATH = SUBMIT_PATH + "/results"
STATUS_WAITING = 0
STATUS_DONE = 1
STATUS_RUNNING = 2
STATUS_FAILED = 3
STATUS_MODERATED = 4
MODERATED_SHARE = 0.25  # of async failures drawn from async_failure_rate
# Base64 images: raw (HiDream's sibling examples) and data: URIs are both accepted.
ACCEPT_DATA_URI = True
# Image limits: the document names none; modest bounds a real service plausibly has.
MIN_SIDE = 256
MAX_SIDE = 4096
MAX_IMAGE_BYTES = 10 * 1024 * 1024
# Codes and HTTP statuses. The doc's example reads `message` only on HTTP 200 with code != 0,
# so business errors (parameters, images, unknown task) come with HTTP 200; auth 401, credits
# 402, internal errors 500; the gateway's 429 carries Retry-After.
CODES: dict[int, tuple[str, int]] = {
    0: ("OK", 200),
    40001: ("INVALID_PARAMETER", 200),
    40002: ("INVALID_IMAGE", 200),
    40003: ("IMAGE_SIZE_OUT_OF_RANGE", 200),
    40101: ("UNAUTHORIZED", 401),
    40102: ("INVALID_TOKEN", 401),
    40201: ("INSUFFICIENT_CREDITS", 402),
    40401: ("TASK_NOT_FOUND", 200),
    50000: ("INTERNAL_ERROR", 500),
}
# Billing: the doc says nothing of it. As the client assumes (``bills_failed_jobs``), a job that
# ends failed or moderated gives back the credit its submission took.
FAILED_JOBS_BILLED = False
# ---- end of UNVERIFIED ------------------------------------------------------------------------

FORCED_STATUS = re.compile(r"^task_status:(-?\d+)$")
_FAILURE_TEXT = {
    STATUS_FAILED: "generation failed (emulated)",
    STATUS_MODERATED: "the result did not pass moderation (emulated)",
}
_log = logging.getLogger(__name__)


class VendorError(common.VendorError[int]):
    """Ends a call with one of the vendor's codes (see ``CODES``)."""


def routes(state: EmulatorState) -> list[Route]:
    """The vendor's endpoints, bound to the shared state."""
    api = _HiDreamApi(state)
    return [
        Route(SUBMIT_PATH, api.submit, methods=["POST"], name="hidream_submit"),
        Route(RESULT_PATH, api.results, methods=["GET"], name="hidream_results"),
    ]


class _JobRender:
    """Renders one job's composite once, however many polls and notifications ask for it."""

    def __init__(
        self,
        state: EmulatorState,
        key: str,
        compute: Callable[[], bytes],
        base_url: str,
        person: bytes,
    ) -> None:
        self.state = state
        self.key = key
        self._compute: Callable[[], bytes] | None = compute  # dropped after use: frees inputs
        self._person: bytes | None = person  # for a bad output made of it; dropped likewise
        self.base_url = base_url
        self._task: asyncio.Future[str] | None = None

    def __call__(self) -> Awaitable[str]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return asyncio.shield(self._task)

    async def _run(self) -> str:
        compute, self._compute = self._compute, None
        person, self._person = self._person, None
        assert compute is not None and person is not None
        data = await self.state.composites.get_or_compute(self.key, compute)
        data = await common.handed_out(self.state, self.state.provider(PROVIDER), data, person)
        return common.store_result(self.state, self.base_url, data)


_Process = Callable[[Request, bytes, int | None, Credit], Awaitable[dict[str, Any]]]


class _HiDreamApi(VendorApi[int]):
    error_type = VendorError
    internal_error = 50000

    def __init__(self, state: EmulatorState) -> None:
        super().__init__(state, PROVIDER, accepted_key(API_KEY_ENV))
        self._background: set[asyncio.Task[None]] = set()
        # Forced codes are taken in _job_call: a task_status:N entry waits for a submission.
        self.gateway = GatewayAnswers(timed_out=_gateway_timeout, rate_limited=self._rate_limited)

    # -- one call, in the order a real gateway + service would answer --------------------------

    async def submit(self, request: Request) -> Response:
        return await self._call(request, partial(self._job_call, self._submit, submission=True))

    async def results(self, request: Request) -> Response:
        return await self._call(request, partial(self._job_call, self._results, submission=False))

    async def _job_call(
        self,
        process: _Process,
        request: Request,
        admitted: Admitted,
        credit: Credit,
        *,
        submission: bool,
    ) -> Response:
        final_status: int | None = None
        forced = self._pop_forced(submission)
        if isinstance(forced, int):
            raise VendorError(forced, INJECTED)
        if isinstance(forced, str):
            final_status = int(FORCED_STATUS.match(forced)[1])  # type: ignore[index]
        self._authenticate(request)
        if submission:
            try:
                credit.take(self.api_key, None)
            except QuotaError:
                raise VendorError(40201) from None
        return JSONResponse(await process(request, admitted.body, final_status, credit))

    def _pop_forced(self, submission: bool) -> int | str | None:
        """The next forced code; a ``task_status:N`` waits in the queue for a submission."""
        forced = self.provider.forced
        if not forced:
            return None
        head = forced[0]
        if isinstance(head, str) and FORCED_STATUS.match(head.strip()):
            if not submission:
                return None
            forced.popleft()
            return head.strip()
        forced.popleft()
        if isinstance(head, str) and head.strip().lstrip("-").isdecimal():
            return int(head)
        if isinstance(head, str):
            return 50000  # not a code we know how to answer: the emulator's own misuse
        return head

    def _authenticate(self, request: Request) -> None:
        token = self._bearer_token(
            request,
            missing=VendorError(40101, "no Authorization header"),
            malformed=VendorError(40102, "authorization must be 'Bearer <token>'"),
        )
        # No trial or deleted users here: the one account's key.
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise VendorError(40102, self._echo("token", token))

    # -- submit ---------------------------------------------------------------------------------

    async def _submit(
        self, request: Request, raw: bytes, forced: int | None, credit: Credit
    ) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise VendorError(40001, "content-type must be application/json")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise VendorError(40001, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise VendorError(40001, "body must be a JSON object")
        for field in (*IMAGE_FIELDS, "request_id", "notify_url"):
            if body.get(field) is not None and not isinstance(body[field], str):
                raise VendorError(40001, f"{field} must be a string")
        request_id: str = body.get("request_id") or ""
        notify_url: str = body.get("notify_url") or ""
        if notify_url and not notify_url.lower().startswith(("http://", "https://")):
            raise VendorError(40001, "notify_url must be an http(s) URL")
        given = {f for f in IMAGE_FIELDS if body.get(f)}
        if "person" not in given:
            raise VendorError(40001, "person is required")
        garments = given - {"person"}
        if not garments:
            raise VendorError(40001, "one of upper_clothes, lower_clothes or dress is required")
        if "dress" in garments and len(garments) > 1:  # (doc) dress is exclusive
            raise VendorError(40001, "dress cannot be combined with upper_clothes/lower_clothes")
        images = {f: await self._image(body[f], f) for f in sorted(given)}

        # Layers in drawing order: the upper garment first, so lower clothes overlap its hem.
        layers = [
            (images[field], category)
            for field, category in (
                ("upper_clothes", "upper_body"),
                ("lower_clothes", "lower_body"),
                ("dress", "dresses"),
            )
            if field in images
        ]
        ps = self.provider
        if forced is None:
            forced = self._draw_outcome()
        max_side = self.state.config.composite_max_side
        if self.state.config.fast_mode:
            key = f"fast|hidream|{layers[0][1]}|{max_side}"
            compute = partial(_prerendered, layers[0][1], max_side)
        else:
            parts: list[str | bytes] = ["hidream", str(max_side), images["person"]]
            for data, category in layers:
                parts += [category, data]
            key = cache_key(*parts)
            compute = partial(_compose, images["person"], tuple(layers), max_side)
        base_url = str(request.base_url).rstrip("/")
        job = self.state.jobs.submit(
            provider=PROVIDER,
            queued_s=ps.plan.job_queued_s,
            running_s=ps.plan.job_running_s,
            will_fail=forced != STATUS_DONE,
            render=_JobRender(self.state, key, compute, base_url, images["person"]),
            meta={"sub_task_id": str(uuid.uuid4()), "final_status": forced, "description": ""},
            # What was asked, ids excluded: the same images again is a resubmission.
            content=cache_key(*(f"{f}={body.get(f) or ''}" for f in IMAGE_FIELDS)),
        )
        credit.hold_for_job(job, bills_failure=FAILED_JOBS_BILLED)
        if notify_url:
            task = asyncio.create_task(self._notify(job, notify_url))
            self._background.add(task)  # kept referenced until done (the loop holds weak refs)
            task.add_done_callback(self._background.discard)
        return {
            "code": 0,
            "message": ACCEPTED_MESSAGE,
            "request_id": request_id,
            "result": {"task_id": job.job_id, "sub_task_ids": [job.meta["sub_task_id"]]},
        }

    def _draw_outcome(self) -> int:
        """A job's final task_status from the provider's seeded RNG (two draws, always, so the
        sequence does not depend on the rates)."""
        rng = self.provider.seed_rng
        u_fail, u_moderated = rng.random(), rng.random()
        if u_fail >= self.provider.plan.async_failure_rate:
            return STATUS_DONE
        return STATUS_MODERATED if u_moderated < MODERATED_SHARE else STATUS_FAILED

    async def _image(self, value: str, field: str) -> bytes:
        """An http(s) URL, a data: URI or raw base64 -> checked image bytes."""
        try:
            if value.lower().startswith(("http://", "https://")):
                data = await fetch_url(
                    self.state.http, value, field, self.state.config.max_image_bytes
                )
            elif value.startswith("data:"):
                if not ACCEPT_DATA_URI:
                    raise InputError(f"{field}: data URIs are not accepted, send raw base64")
                data = decode_data_uri(value, field)
            else:
                try:
                    data = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise InputError(f"{field}: neither an http(s) URL nor base64") from None
        except InputError as exc:
            raise VendorError(40002, str(exc)) from None
        if not data:
            raise VendorError(40002, f"{field} is empty")
        if len(data) > MAX_IMAGE_BYTES:
            raise VendorError(40003, f"{field}: {len(data)} bytes exceeds {MAX_IMAGE_BYTES}")
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only: cheap
                width, height = image.size
        except Image.DecompressionBombError:
            raise VendorError(40003, f"{field}: too many pixels") from None
        except (OSError, ValueError, SyntaxError):
            raise VendorError(40002, f"{field}: not a readable image") from None
        if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
            raise VendorError(
                40003, f"{field}: {width}x{height} px, sides must be {MIN_SIDE}..{MAX_SIDE}"
            )
        return data

    # -- results --------------------------------------------------------------------------------

    async def _results(
        self, request: Request, raw: bytes, forced: int | None, credit: Credit
    ) -> dict[str, Any]:
        task_id = request.query_params.get("task_id", "").strip()
        if not task_id:
            raise VendorError(40001, "task_id is required")
        job = self.state.jobs.get(PROVIDER, task_id)
        if job is None:
            raise VendorError(40401, f"task {task_id} not found")
        return await self._task_result(job, request.query_params.get("request_id", ""))

    async def _task_result(self, job: EmulatedJob, request_id: str) -> dict[str, Any]:
        """The task result JSON (also what a notify_url receives)."""
        phase = job.phase()
        image = ""
        if phase is JobPhase.QUEUED:
            status = STATUS_WAITING
        elif phase is JobPhase.RUNNING:
            status = STATUS_RUNNING
        elif phase is JobPhase.DONE:
            try:
                image = await job.outcome()
                status = STATUS_DONE
            except composite.UndecodableImage as exc:
                # The header looked fine but the image does not decode: the job fails.
                job.fail()
                job.meta.update(final_status=STATUS_FAILED, description=f"bad input: {exc}")
                status = STATUS_FAILED
        else:
            status = int(job.meta["final_status"])
        description = ""
        if status not in (STATUS_WAITING, STATUS_RUNNING, STATUS_DONE):
            description = job.meta["description"] or _FAILURE_TEXT.get(status, "failed")
        return {
            "code": 0,
            "message": "success",
            "request_id": request_id,
            "result": {
                "task_id": job.job_id,
                "sub_task_results": [
                    {
                        "sub_task_id": job.meta["sub_task_id"],
                        "task_status": status,
                        "image": image,
                        "description": description,
                    }
                ],
            },
        }

    async def _notify(self, job: EmulatedJob, url: str) -> None:
        """POST the task result to ``url`` once the job has ended (best effort, like a vendor)."""
        await self.state.sleep(job.queued_s + job.running_s)
        try:
            body = await self._task_result(job, "")
            await self.state.http.post(url, json=body)
        except Exception as exc:  # a callback failure never affects the job
            _log.info("emulator: hidream notify to %s failed: %s", url, type(exc).__name__)

    # -- answers --------------------------------------------------------------------------------

    def _rate_limited(self) -> Response:
        return common.rate_limited(self.provider, {"code": 429, "message": "Too Many Requests"})

    def _error(self, code: int, detail: str | None = None) -> Response:
        if code == 429:  # a forced 429 looks like the gateway's
            return self._rate_limited()
        self.provider.record(code)
        if code not in CODES and 500 <= code < 600:  # a forced unknown 5xx: the proxy's page
            return Response(f"<html><body>{code}</body></html>", code, media_type="text/html")
        name, status = CODES.get(code, ("UNKNOWN", 200))
        message = f"{name}: {detail}" if detail else name
        return JSONResponse({"code": code, "message": message, "request_id": ""}, status)


def _gateway_timeout() -> Response:
    """What a hung call finally gets: the gateway's HTML 504."""
    return Response("<html><body>504 Gateway Time-out</body></html>", 504)


def _compose(person: bytes, layers: tuple[tuple[bytes, str], ...], max_side: int) -> bytes:
    """Each garment drawn in turn onto the person (upper, then lower), as WEBP bytes."""
    image = person
    for garment, category in layers:
        image = composite.render_garment(
            image, garment, category, max_side=max_side, tag=common.vendor_tag("hidream")
        ).result
    return image


def _prerendered(category: str, max_side: int) -> bytes:
    return composite.prerendered("garment", category, max_side, common.vendor_tag("hidream")).result
