"""The one interface every try-on provider client implements. Prefect-free, httpx-only.

A client takes prepared inputs (bytes already fitted to its ``ImageProfile``) and returns the
URLs of its results; it raises ``ProviderError`` with an ``ErrorKind`` so the orchestration can
retry, record or stop without knowing any vendor's codes. Each vendor's code table lives beside
its client.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import httpx

from schemas.limits import ImageProfile
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
    result_url: str
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
    ) -> None:
        super().__init__(f"[{provider} {code}] {message}")
        self.kind = kind
        self.code = code
        self.message = message
        self.provider = provider
        self.http_status = http_status
        self.request_id = request_id
        self.retry_after = retry_after

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
        }


def _rebuild_provider_error(fields: dict[str, object]) -> ProviderError:
    return ProviderError(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What request shapes a provider accepts; checked before any call is made."""

    categories: frozenset[str] = frozenset({"upper_body", "lower_body", "dresses"})
    prompt: bool = False
    lower_garment: bool = False
    garment_optional: bool = False


class TryOnClient(abc.ABC):
    """A provider client. IO goes through the injected ``httpx.AsyncClient`` only."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, *, http: httpx.AsyncClient, profile: ImageProfile) -> None:
        self.http = http
        self.profile = profile

    @abc.abstractmethod
    async def try_on(self, request: TryOnRequest) -> TryOnResult:
        """Run one try-on to completion (submitting and, for async providers, polling)."""

    async def download(self, url: str, *, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """Fetch a result before its URL expires. Expired/missing URLs are permanent errors."""

        def error(
            kind: ErrorKind, code: str, message: str, status: int | None = None
        ) -> ProviderError:
            return ProviderError(
                kind=kind, code=code, message=message, provider=self.name, http_status=status
            )

        try:
            async with self.http.stream("GET", url) as response:
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
