"""Wire-level helpers every emulated provider shares: the gateway's injected faults, the course
of one call (``VendorApi``), image inputs, waiting, cache keys, stored results."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Generic, TypeVar

import httpx
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from emulator import composite
from emulator.jobs import EmulatedJob
from emulator.state import EmulatorState, ProviderState, QuotaTicket

# Starlette's default caps a non-file part at 1 MB; a data: URI of a few-MB image is bigger.
FORM_LIMITS: dict[str, int] = {"max_files": 16, "max_fields": 64, "max_part_size": 64 * 1024**2}

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?P<params>(;[^;,]*)*?);base64,", re.I)
_BEARER = re.compile(r"^Bearer (\S+)$", re.IGNORECASE)  # RFC 7235: the scheme is case-blind
# The detail of an error answered because the fault plan forced its code.
INJECTED = "injected by the emulator's fault plan"

_log = logging.getLogger(__name__)


CodeT = TypeVar("CodeT", int, str)


class InputError(ValueError):
    """A request field the vendor would reject as an invalid parameter."""


class VendorError(Exception, Generic[CodeT]):
    """Ends a call with one of the vendor's codes. Each route module subclasses it with its
    code type, so one vendor's handler never catches another's codes."""

    def __init__(self, code: CodeT, detail: str | None = None) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


async def sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep up to ``seconds``; return True early if the client hung up.

    A client that times out closes its connection; noticing that ends the simulated work, so
    in-flight counts fall and the server stops at once instead of waiting out a long hang.
    Call only after the body was read: then ``receive()`` yields nothing but the disconnect.
    """
    if seconds <= 0:
        return False

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
        return bool(done)
    finally:
        watcher.cancel()


def echoed(echo: bool, what: str, value: str) -> str | None:
    """An error detail quoting the credential received (``EmulatorConfig.echo_credentials``),
    as a careless vendor's error text does; None when echoing is off."""
    return f"{what} '{value}' was not accepted" if echo else None


def unavailable_response() -> Response:
    """An injected 5xx as a load balancer sends it: HTML, not the vendor's JSON."""
    body = (
        "<html><head><title>503 Service Temporarily Unavailable</title></head>"
        "<body><center><h1>503 Service Temporarily Unavailable</h1></center></body></html>"
    )
    return Response(body, status_code=503, media_type="text/html")


@dataclass(frozen=True, slots=True)
class GatewayAnswers:
    """How one vendor's gateway answers the faults its ``FaultPlan`` injects.

    Each callable builds that vendor's response; ``timed_out`` and ``rate_limited`` record in
    the stats what the vendor counts (the hang itself is counted as "timeout", a 5xx as 503).
    ``forced``: the answer to a forced code popped after the latency (a forced 429 is the
    gateway's own, ``rate_limited``); None where the vendor takes forced codes itself
    (HiDream holds ``task_status:N`` for a submission, Tencent answers them only after
    authentication).
    """

    timed_out: Callable[[], Response]
    rate_limited: Callable[[], Response]
    unavailable: Callable[[], Response] = unavailable_response
    forced: Callable[[int], Response] | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """A call the gateway lets through to the vendor logic."""

    body: bytes
    latency_s: float  # left to spend by the caller (0 once the gateway spent it)
    # Loop time the answer is due at: the plan's latency is the vendor's response time, its
    # own work included, so a route answers at max(deadline, done) and not latency + work.
    deadline: float = 0.0

    async def answer_at_deadline(self, request: Request) -> None:
        """Wait for ``deadline`` (or the client hanging up); the route then answers."""
        await sleep_unless_disconnected(request, self.deadline - asyncio.get_running_loop().time())


async def pass_gateway(
    request: Request,
    provider: ProviderState,
    answers: GatewayAnswers,
    *,
    spend_latency: bool = True,
) -> Admitted | Response:
    """Read the whole request, then draw the plan's faults for it: a fault's answer, or
    ``Admitted``, whose caller answers at ``Admitted.answer_at_deadline`` (the latency covers
    the vendor work). ``spend_latency=False`` leaves the latency to the caller (Tencent spends
    it inside its concurrency slot, where it stands for generation time)."""
    arrived = asyncio.get_running_loop().time()
    try:
        # The whole body first: answering mid-upload makes clients see a reset, not the
        # status we mean to send.
        body = await request.body()
    except ClientDisconnect:
        return Response(status_code=400)
    decision = provider.draw_faults()
    # For the call log (``EmulatorState.log_call``): which injected fault answered, if any.
    if decision.timeout or decision.rate_limited or decision.unavailable:
        request.state.emulator_fault = (
            "timeout" if decision.timeout else "429" if decision.rate_limited else "5xx"
        )
    if decision.timeout:
        provider.record("timeout")
        await sleep_unless_disconnected(request, provider.plan.timeout_s)
        return answers.timed_out()
    if decision.rate_limited:
        return answers.rate_limited()
    if decision.unavailable:
        provider.record(503)
        return answers.unavailable()
    if not spend_latency:
        return Admitted(body, decision.latency_s)
    if answers.forced is not None:
        forced = provider.pop_forced()
        if forced is not None:
            await sleep_unless_disconnected(request, decision.latency_s)
            return answers.rate_limited() if forced == 429 else answers.forced(forced)
    return Admitted(body, 0.0, deadline=arrived + decision.latency_s)


def rate_limited(provider: ProviderState, body: dict[str, Any]) -> JSONResponse:
    """The gateway's 429 (not a vendor code): ``body``, with the plan's ``Retry-After``."""
    provider.record(429)
    headers = {"Retry-After": str(provider.plan.retry_after_s)}
    return JSONResponse(body, status_code=429, headers=headers)


class Credit:
    """The account credit one call takes (``ProviderState.take_quota``): given back unless the
    call succeeds, so failures cost nothing (no vendor documents a billed error); the credit of
    a call that starts an async job may go with the job (``hold_for_job``)."""

    def __init__(self, provider: ProviderState) -> None:
        self._provider = provider
        self._ticket: QuotaTicket | None = None

    def take(self, token: str, trial_limit: int | None, cost: int = 1) -> None:
        """Reserve the call (``cost`` credits); raises ``QuotaError`` when the account (or trial
        key) has not enough left."""
        self._ticket = self._provider.take_quota(token, trial_limit, cost)

    def refund(self) -> None:
        if self._ticket is not None:
            self._ticket.refund()

    def hold_for_job(self, job: EmulatedJob, *, bills_failure: bool) -> None:
        """The call started the async ``job``. Unless the vendor bills a job that fails
        (``bills_failure``), the credit goes with the job: given back if it fails."""
        if bills_failure or self._ticket is None:
            return  # committed with the call, as any other
        ticket, self._ticket = self._ticket, None
        self._provider.hold_for_job(ticket, job)

    def commit(self) -> None:
        if self._ticket is not None:
            self._ticket.commit()


# A route's own handling of an admitted call: the answer, or a ``VendorError``.
Handler = Callable[[Request, Admitted, Credit], Awaitable[Response]]


class VendorApi(Generic[CodeT]):
    """One emulated account and the course of a call to it, shared by the route modules:
    ``pass_gateway`` draws the plan's faults, then the route's handler runs; a credit it took
    is given back unless the call succeeds, and the answer goes out at the plan's deadline.

    A subclass sets ``gateway`` and names its ``VendorError`` subclass (``error_type``: only
    that vendor's codes are caught), the code an emulator failure answers (``internal_error``)
    and how a code is answered (``_error``, which counts it in the stats).
    """

    error_type: ClassVar[type[VendorError[Any]]]
    internal_error: ClassVar[int | str]
    gateway: GatewayAnswers

    def __init__(self, state: EmulatorState, name: str, api_key: str) -> None:
        self.state = state
        self.provider = state.provider(name)
        self.api_key = api_key

    async def _call(self, request: Request, handle: Handler) -> Response:
        admitted = await pass_gateway(request, self.provider, self.gateway)
        if isinstance(admitted, Response):
            return admitted
        credit = Credit(self.provider)
        try:
            try:
                response = await handle(request, admitted, credit)
            except self.error_type as exc:
                credit.refund()
                return self._error(exc.code, exc.detail)
            except Exception:
                credit.refund()
                _log.exception("emulator: %s call failed", self.provider.name)
                return self._error(self.internal_error, "unexpected emulator failure")
            credit.commit()
            self.provider.record(response.status_code)
            return response
        finally:
            await admitted.answer_at_deadline(request)

    def _error(self, code: Any, detail: str | None = None) -> Response:
        raise NotImplementedError

    def _bearer_token(
        self, request: Request, *, missing: VendorError[Any], malformed: VendorError[Any]
    ) -> str:
        """The token of an ``Authorization: Bearer <token>`` header; raises ``missing`` without
        the header, ``malformed`` with another shape."""
        header = request.headers.get("authorization")
        if header is None:
            raise missing
        match = _BEARER.match(header)
        if match is None:
            raise malformed
        return match[1]

    def _known_key(self, token: str, *, deleted: CodeT) -> bool:
        """Whether ``token`` is the account's key or a trial key (``EmulatorConfig.trial_keys``);
        a deleted user's key raises the code ``deleted``."""
        if hmac.compare_digest(token.encode(), self.api_key.encode()):
            return True
        config = self.state.config
        if token in config.deleted_user_keys:
            raise self.error_type(deleted)
        return token in config.trial_keys

    def _echo(self, what: str, value: str) -> str | None:
        return echoed(self.state.config.echo_credentials, what, value)


def garment_render(
    state: EmulatorState, person: bytes, garment: bytes, category: str, *, label: str, vendor: str
) -> tuple[str, Callable[[], composite.Rendered]]:
    """The composite-cache key and the render of ``garment`` worn on ``person``: in fast mode
    the category's prerendered picture, else the real composite. ``label`` keeps one route's
    entries apart from another's."""
    max_side = state.config.composite_max_side
    if state.config.fast_mode:
        fast = partial(composite.prerendered, "garment", category, max_side, vendor_tag(vendor))
        return f"fast|{label}|{category}|{max_side}", fast
    key = cache_key(label, category, str(max_side), person, garment)
    render = partial(
        composite.render_garment,
        person,
        garment,
        category,
        max_side=max_side,
        tag=vendor_tag(vendor),
    )
    return key, render


def vendor_tag(vendor: str) -> str:
    """The label a vendor's results carry: its own, so two vendors never answer alike."""
    return f"{composite.LABEL} {vendor}"


async def handed_out(
    state: EmulatorState, provider: ProviderState, result: bytes, person: bytes
) -> bytes:
    """The successful ``result`` as the vendor hands it out: itself, or the bad output the
    provider's fault plan swaps in (``FaultPlan.bad_outputs``, ``bad_output_rate``), made in a
    worker thread from ``result`` or ``person`` (the person input). Called after the composite
    cache, so a bad output is never cached."""
    kind = provider.next_bad_output()
    if kind is None:
        return result
    max_side = state.config.composite_max_side
    return await asyncio.to_thread(composite.bad_output, kind, result, person, max_side=max_side)


def store_result(state: EmulatorState, base_url: str, data: bytes) -> str:
    """Keep a rendered result (WEBP) for download; its URL under ``base_url``."""
    token = state.results.put(data, "image/webp")
    return f"{base_url}/files/{token}.webp"


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def cache_key(*parts: str | bytes) -> str:
    """A composite-cache key over the inputs that shape the picture (hashes, so images are
    not kept); each part length-prefixed so no two part lists collide."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def decode_data_uri(value: str, field: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` string (strict base64)."""
    match = _DATA_URI.match(value)
    if match is None:
        raise InputError(f"{field}: data URI must look like data:image/<type>;base64,<data>")
    if not match["mime"].lower().startswith("image/"):
        raise InputError(f"{field}: data URI type {match['mime']!r} is not an image")
    try:
        return base64.b64decode(value[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{field}: data URI is not valid base64") from None


async def fetch_url(http: httpx.AsyncClient, url: str, field: str, max_bytes: int) -> bytes:
    """GET an image URL as the vendor would; any failure is the caller's invalid parameter."""
    try:
        async with http.stream("GET", url) as response:
            if response.status_code != 200:
                raise InputError(f"{field}: URL could not be fetched (HTTP {response.status_code})")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{field}: image at URL exceeds {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise InputError(f"{field}: URL could not be fetched ({type(exc).__name__})") from None


async def read_image_field(
    value: str | UploadFile | None, field: str, *, http: httpx.AsyncClient, max_bytes: int
) -> bytes:
    """An image given as a file part, a data: URI or an http(s) URL, as raw bytes."""
    if value is None or value == "":
        raise InputError(f"{field} is required")
    if isinstance(value, UploadFile):
        data = await value.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InputError(f"{field}: file exceeds {max_bytes} bytes")
    elif value.startswith("data:"):
        data = decode_data_uri(value, field)
    elif value.lower().startswith(("http://", "https://")):
        data = await fetch_url(http, value, field, max_bytes)
    else:
        raise InputError(f"{field} must be an image file, a data: URI or an http(s) URL")
    if not data:
        raise InputError(f"{field} is empty")
    return data


def text_field(value: str | UploadFile | None, field: str, *, required: bool) -> str | None:
    """A plain string form field; a file part where text belongs is an invalid parameter."""
    if isinstance(value, UploadFile):
        raise InputError(f"{field} must be a text field, not a file")
    if value is None or not value.strip():
        if required:
            raise InputError(f"{field} is required")
        return None
    return value


def is_multipart(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"
