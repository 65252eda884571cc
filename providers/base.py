"""The one interface every try-on provider client implements. Prefect-free, httpx-only.

A client takes prepared inputs (bytes already fitted to its ``ImageProfile``) and returns the
URLs of its results; it raises ``ProviderError`` with an ``ErrorKind`` so the orchestration can
retry, record or stop without knowing any vendor's codes. Each vendor's code table lives beside
its client.
"""

from __future__ import annotations

import abc
import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import ClassVar, Literal, Protocol, Self

import httpx

from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind

Category = Literal["upper_body", "lower_body", "dresses"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedImage:
    """An input image fitted to a provider's profile, ready to send."""

    data: bytes
    mime: str  # "image/jpeg" | "image/png" | "image/webp"
    width: int
    height: int
    sha256: str
    source_uri: str
    # A URL where the provider itself can fetch these bytes (staged copy), when one exists.
    url: str | None = None

    @property
    def extension(self) -> str:
        return {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}[self.mime]


@dataclass(frozen=True, slots=True, kw_only=True)
class TryOnRequest:
    row_id: str
    person: PreparedImage
    garment: PreparedImage | None = None
    lower_garment: PreparedImage | None = None
    category: Category | None = None
    garment_description: str | None = None
    prompt: str | None = None
    gender: Literal["woman", "man"] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TryOnResult:
    """Where the result is: a URL to download before it expires, or the bytes themselves."""

    result_url: str | None = None
    result_data: bytes | None = None  # providers answering base64 (Tencent's default)
    mask_url: str | None = None
    request_id: str | None = None
    cache_hit: bool | None = None
    seed: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


class ProviderError(Exception):
    """A classified failure of a provider call. The message never contains credentials."""

    def __init__(
        self,
        *,
        kind: ErrorKind,
        code: str,
        message: str,
        provider: str,
        http_status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        charged: bool = False,
    ) -> None:
        super().__init__(f"[{provider} {code}] {message}")
        self.kind = kind
        self.code = code
        self.message = message
        self.provider = provider
        self.http_status = http_status
        self.request_id = request_id
        self.retry_after = retry_after
        self.charged = charged  # the vendor bills this answer (its error table says so)

    @property
    def retryable(self) -> bool:
        return self.kind is ErrorKind.TRANSIENT

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only __init__: default pickling would fail when an error crosses processes.
        return (_rebuild_provider_error, (self._fields(),))

    def _fields(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "code": self.code,
            "message": self.message,
            "provider": self.provider,
            "http_status": self.http_status,
            "request_id": self.request_id,
            "retry_after": self.retry_after,
            "charged": self.charged,
        }


def _rebuild_provider_error(fields: dict[str, object]) -> ProviderError:
    return ProviderError(**fields)  # type: ignore[arg-type]


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or HTTP-date); None if absent/bad.

    Every client reads it the same way into ``ProviderError.retry_after``.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


async def download_result(
    http: httpx.AsyncClient, url: str, *, provider: str, max_bytes: int = 64 * 1024 * 1024
) -> bytes:
    """Fetch a result before its URL expires. Expired/missing URLs are permanent errors."""

    def error(kind: ErrorKind, code: str, message: str, status: int | None = None) -> ProviderError:
        return ProviderError(
            kind=kind, code=code, message=message, provider=provider, http_status=status
        )

    try:
        async with http.stream("GET", url) as response:
            status = response.status_code
            if status != 200:
                gone = status in (403, 404, 410)
                transient = status == 429 or status >= 500
                raise error(
                    ErrorKind.TRANSIENT if transient else ErrorKind.PERMANENT,
                    f"HTTP_{status}",
                    f"result URL is gone or expired (HTTP {status})"
                    if gone
                    else f"result download failed with HTTP {status}",
                    status,
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise error(
                        ErrorKind.PERMANENT,
                        "RESULT_TOO_LARGE",
                        f"result exceeds {max_bytes} bytes",
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException as exc:
        failure = error(
            ErrorKind.TRANSIENT, "TIMEOUT", f"result download timed out ({type(exc).__name__})"
        )
    except httpx.TransportError as exc:
        failure = error(
            ErrorKind.TRANSIENT,
            "CONNECTION_ERROR",
            f"result download failed: {type(exc).__name__}",
        )
    # Raised outside the except block: httpx errors carry the request, which must not travel
    # along as __context__.
    raise failure


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What request shapes a provider accepts; checked before any call is made."""

    categories: frozenset[str] = frozenset({"upper_body", "lower_body", "dresses"})
    prompt: bool = False
    lower_garment: bool = False
    garment_optional: bool = False
    # Inputs must be URLs the provider can fetch (Tencent): the flow stages prepared images
    # and sets ``PreparedImage.url`` before calling.
    needs_urls: bool = False
    # Submit-then-poll: the client is an ``AsyncJobClient`` and reports accepted job ids.
    async_jobs: bool = False


OnSubmitted = Callable[[str], Awaitable[None]]
"""Called with a provider's job id as soon as the job is accepted, before any polling, so a
crashed run can resume polling instead of paying for a second submission."""


class TryOnClient(abc.ABC):
    """A provider client. IO goes through the injected ``httpx.AsyncClient`` only."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    base_url: str  # where the provider is (set by each client's constructor)

    def __init__(self, *, http: httpx.AsyncClient, profile: ImageProfile) -> None:
        self.http = http
        self.profile = profile

    @classmethod
    @abc.abstractmethod
    def from_env(cls, *, http: httpx.AsyncClient, profile: ImageProfile) -> Self:
        """A client configured from the environment: base URL and credentials.

        Missing credentials raise ``ProviderError`` (FATAL, ``MISSING_API_KEY``) naming the
        variable, never a value.
        """

    @abc.abstractmethod
    async def try_on(
        self, request: TryOnRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult:
        """Run one try-on to completion (submitting and, for async providers, polling)."""

    async def download(self, url: str, *, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """Fetch a result before its URL expires. Expired/missing URLs are permanent errors."""
        return await download_result(self.http, url, provider=self.name, max_bytes=max_bytes)


# -- asynchronous providers: submit, then poll -----------------------------------------------


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    state: JobState
    result: TryOnResult | None = None  # set when SUCCEEDED
    error: ProviderError | None = None  # set when FAILED (moderation, processing failure...)


class Clock(Protocol):
    """The time a polling loop reads and waits on: ``REAL_TIME``, or a test's fake clock."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Wait ``seconds`` on this clock."""
        ...


class RealTime:
    """``time.monotonic`` and ``asyncio.sleep``: what every client polls with in a run."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> Awaitable[None]:
        return asyncio.sleep(seconds)


REAL_TIME: Clock = RealTime()


@dataclass(frozen=True, slots=True, kw_only=True)
class PollPolicy:
    """Poll with exponential backoff (and a little jitter) until a deadline."""

    initial_s: float = 2.0
    max_interval_s: float = 15.0
    factor: float = 1.5
    deadline_s: float = 900.0

    def intervals(self) -> list[float]:
        """The successive waits; their sum stays within the deadline."""
        waits, total, wait = [], 0.0, self.initial_s
        while total + wait <= self.deadline_s:
            waits.append(wait)
            total += wait
            wait = min(self.max_interval_s, wait * self.factor)
        return waits


class AsyncJobClient(TryOnClient):
    """A provider whose try-on is a job: ``submit`` returns its id, ``poll`` reports on it."""

    poll_policy: PollPolicy = PollPolicy()
    poll_clock: Clock = REAL_TIME  # what ``wait`` sleeps and reads the deadline on

    @abc.abstractmethod
    async def submit(self, request: TryOnRequest) -> str:
        """Submit the job; returns the provider's job id."""

    @abc.abstractmethod
    async def poll(self, job_id: str) -> JobStatus:
        """One status query. Transport problems raise transient ``ProviderError``."""

    async def wait(self, job_id: str) -> TryOnResult:
        """Poll ``job_id`` until it ends or the deadline passes (then a transient TIMEOUT:
        the job may still finish, and a rerun resumes polling it)."""
        return await wait_for_job(
            self.poll, job_id, self.poll_policy, provider=self.name, clock=self.poll_clock
        )

    async def try_on(
        self, request: TryOnRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult:
        job_id = await self.submit(request)
        if on_submitted is not None:
            await on_submitted(job_id)
        return await self.wait(job_id)


async def wait_for_job(
    poll: Callable[[str], Awaitable[JobStatus]],
    job_id: str,
    policy: PollPolicy,
    *,
    provider: str,
    clock: Clock = REAL_TIME,
) -> TryOnResult:
    """The polling loop shared by every async provider (try-on and refiner alike); it waits
    and reads its deadline on ``clock``."""
    started = clock.now()
    for wait in [0.0, *policy.intervals()]:
        if wait:
            await clock.sleep(wait * random.uniform(0.9, 1.1))
        try:
            status = await poll(job_id)
        except ProviderError as exc:
            if exc.kind is not ErrorKind.TRANSIENT:
                raise
            continue  # a failed status query is not a failed job: ask again later
        if status.state is JobState.SUCCEEDED and status.result is not None:
            return status.result
        if status.state is JobState.FAILED:
            raise status.error or ProviderError(
                kind=ErrorKind.PERMANENT,
                code="JOB_FAILED",
                message=f"job {job_id} failed",
                provider=provider,
                request_id=job_id,
            )
    raise ProviderError(
        kind=ErrorKind.TRANSIENT,
        code="POLL_DEADLINE",
        message=f"job {job_id} not finished after {clock.now() - started:.0f} s",
        provider=provider,
        request_id=job_id,
    )


# -- the refiner: improves a coarse try-on result ---------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RefineRequest:
    row_id: str
    person: PreparedImage
    top_garment: PreparedImage
    coarse: PreparedImage  # the coarse try-on output, prepared to the refiner's profile
    gender: Literal["woman", "man"]
    bottom_garment: PreparedImage | None = None


class RefinerClient(abc.ABC):
    """A refiner (AILabTools try-on-clothes-refiner): one refine call to completion."""

    name: ClassVar[str]
    poll_clock: Clock = REAL_TIME  # what a polling refiner sleeps and reads its deadline on

    def __init__(self, *, http: httpx.AsyncClient, profile: ImageProfile) -> None:
        self.http = http
        self.profile = profile

    @classmethod
    @abc.abstractmethod
    def from_env(cls, *, http: httpx.AsyncClient, profile: ImageProfile) -> Self: ...

    @abc.abstractmethod
    async def refine(
        self, request: RefineRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult: ...

    async def download(self, url: str, *, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        return await download_result(self.http, url, provider=self.name, max_bytes=max_bytes)
