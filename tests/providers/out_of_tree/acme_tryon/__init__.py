"""ACME try-on: one synchronous JSON endpoint, images in and out as base64, a Bearer key.

POST {base}/v1/try-on  {"person": b64, "garment": b64, "category": "upper_body"}
200 {"id": "...", "image": b64}    401 {"error": "..."}    422 {"error": "..."}
"""

from __future__ import annotations

import base64
from typing import Any, Self

import httpx

from providers.base import (
    Capabilities,
    OnSubmitted,
    ProviderError,
    TryOnClient,
    TryOnRequest,
    TryOnResult,
)
from providers.registry import ProviderSpec
from providers.settings import base_url, credential
from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind

NAME = "acme"
API_KEY_ENV = "ACME_API_KEY"
DEFAULT_BASE_URL = "https://api.acme.example"
TRY_ON_PATH = "/v1/try-on"
PROFILE = ImageProfile(name=NAME, min_side=128, max_side=1024, max_bytes=2 * 1024 * 1024)
# One object for the client and the spec: planning reads the spec, calls use the client.
CAPABILITIES = Capabilities()


class AcmeClient(TryOnClient):
    name = NAME
    capabilities = CAPABILITIES

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile,
        base_url: str,
        api_key: str,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(http=http, profile=profile)
        self.base_url = base_url
        self._api_key = api_key
        self._timeout = timeout

    @classmethod
    def from_env(
        cls, *, http: httpx.AsyncClient, profile: ImageProfile, timeout: float = 60.0
    ) -> Self:
        key = credential(API_KEY_ENV)
        if key is None:
            raise ProviderError(
                kind=ErrorKind.FATAL,
                code="MISSING_API_KEY",
                message=f"{API_KEY_ENV} is not set",
                provider=NAME,
            )
        return cls(
            http=http,
            profile=profile,
            base_url=base_url(NAME, DEFAULT_BASE_URL),
            api_key=key.get_secret_value(),
            timeout=timeout,
        )

    async def try_on(
        self, request: TryOnRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult:
        if request.garment is None:
            raise ProviderError(
                kind=ErrorKind.PERMANENT,
                code="NO_GARMENT",
                message="acme needs a garment image",
                provider=NAME,
            )
        body: dict[str, Any] = {
            "person": base64.b64encode(request.person.data).decode(),
            "garment": base64.b64encode(request.garment.data).decode(),
            "category": request.category,
        }
        try:
            response = await self.http.post(
                f"{self.base_url}{TRY_ON_PATH}",
                json=body,
                headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=self._timeout,
            )
        except httpx.TransportError as exc:
            raise ProviderError(
                kind=ErrorKind.TRANSIENT,
                code="CONNECTION",
                message=type(exc).__name__,
                provider=NAME,
            ) from None
        if response.status_code == 401:
            raise ProviderError(
                kind=ErrorKind.FATAL, code="UNAUTHORIZED", message="key refused", provider=NAME
            )
        if response.status_code != 200:
            kind = ErrorKind.TRANSIENT if response.status_code >= 500 else ErrorKind.PERMANENT
            raise ProviderError(
                kind=kind,
                code=f"HTTP_{response.status_code}",
                message=f"HTTP {response.status_code}",
                provider=NAME,
                http_status=response.status_code,
            )
        answer = response.json()
        return TryOnResult(result_data=base64.b64decode(answer["image"]), request_id=answer["id"])


SPEC = ProviderSpec(
    name=NAME,
    client_path="acme_tryon:AcmeClient",
    profile=PROFILE,
    max_in_flight=2,
    capabilities=CAPABILITIES,
    default_base_url=DEFAULT_BASE_URL,
    credential_env=(API_KEY_ENV,),
)
