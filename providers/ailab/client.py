"""AILabTools clients: Try on Clothes (a provider) and Try on Clothes Refiner, one account.

Both submit over the same wire (``wire.py``: multipart with ``task_type=async``, a task id, one
shared poll, the account's credit balance); each names only its endpoint, its form fields and
its image profile.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import httpx
from pydantic import SecretStr

from providers import settings
from providers.ailab.settings import (
    API_KEY_ENV,
    CAPABILITIES,
    CLOTHES_TYPES,
    DEFAULT_BASE_URL,
    NAME,
    PROFILE,
    REFINER_NAME,
    REFINER_PROFILE,
)
from providers.ailab.wire import QUERY_PATH, Wire
from providers.base import (
    AsyncJobClient,
    Capabilities,
    JobStatus,
    OnSubmitted,
    PollPolicy,
    PreparedImage,
    RefinerClient,
    RefineRequest,
    TryOnRequest,
    TryOnResult,
    wait_for_job,
)
from providers.common import key_from_env, unsupported_category, unsupported_request
from schemas.image_profile import ImageProfile

TRYON_PATH = "/api/portrait/editing/try-on-clothes"
REFINER_PATH = "/api/portrait/enhance/try-on-clothes-refiner"
GENDERS = ("woman", "man")
# The doc recommends querying about every 5 s; ten minutes covers a slow queue.
DEFAULT_POLL_POLICY = PollPolicy(initial_s=5.0, max_interval_s=5.0, factor=1.0, deadline_s=600.0)


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
        self._wire = Wire(
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
            base_url=settings.base_url(NAME, DEFAULT_BASE_URL),
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

    async def credits_balance(self) -> int | None:
        """The account's universal credits left (``GET /api/common/query-credits``, see
        ``wire.parse_credits``): the one balance the try-on (10 a call) and the refiner (25)
        draw on. Never None: the vendor documents it. Raises a classified ``ProviderError``
        (a bad key is FATAL)."""
        return await self._wire.credits_balance()


class AILabTryOnClient(_AILabAccount, AsyncJobClient):
    """AILabTools Try on Clothes: one garment per call, by clothes_type; async jobs."""

    name: ClassVar[str] = NAME
    capabilities: ClassVar[Capabilities] = CAPABILITIES
    default_profile: ClassVar[ImageProfile] = PROFILE
    default_submit_path: ClassVar[str] = TRYON_PATH

    async def submit(self, request: TryOnRequest) -> str:
        """Upload person and garment; returns the task id (the job is paid for from here)."""
        if request.garment is None or request.lower_garment is not None:
            raise unsupported_request(
                NAME, "needs exactly one garment (no separate lower garment, no prompt)"
            )
        clothes_type = CLOTHES_TYPES.get(request.category or "")
        if clothes_type is None:
            raise unsupported_category(NAME, request.category)
        parts = [
            ("person_image", _file(request.person)),
            ("clothes_image", _file(request.garment)),
            ("clothes_type", (None, clothes_type)),
        ]
        return await self._wire.submit(self.submit_path, parts)


class AILabRefinerClient(_AILabAccount, RefinerClient):
    """AILabTools Try on Clothes Refiner (doc 004): refines any provider's coarse result."""

    name: ClassVar[str] = REFINER_NAME
    default_profile: ClassVar[ImageProfile] = REFINER_PROFILE
    default_submit_path: ClassVar[str] = REFINER_PATH

    async def submit(self, request: RefineRequest) -> str:
        """Upload the inputs and the coarse result; returns the task id."""
        if request.gender not in GENDERS:
            raise unsupported_request(
                REFINER_NAME, f"gender must be woman or man: {request.gender!r}"
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
        return await wait_for_job(
            self.poll, job_id, self.poll_policy, provider=self.name, clock=self.poll_clock
        )

    async def refine(
        self, request: RefineRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult:
        job_id = await self.submit(request)
        if on_submitted is not None:
            await on_submitted(job_id)
        return await self.wait(job_id)
