"""Wire-level helpers every emulated provider shares: the gateway's injected faults, image
inputs, waiting, cache keys."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import httpx
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from emulator.state import ProviderState

# Starlette's default caps a non-file part at 1 MB; a data: URI of a few-MB image is bigger.
FORM_LIMITS: dict[str, int] = {"max_files": 16, "max_fields": 64, "max_part_size": 64 * 1024**2}

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?P<params>(;[^;,]*)*?);base64,", re.I)


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
    ``forced``: the answer to a forced code popped after the latency; None where the vendor
    takes forced codes itself (HiDream holds ``task_status:N`` for a submission, Tencent
    answers them only after authentication).
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
            return answers.forced(forced)
    return Admitted(body, 0.0, deadline=arrived + decision.latency_s)


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
