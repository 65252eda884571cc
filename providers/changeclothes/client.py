"""ChangeClothesAI client (doc 000): two synchronous multipart endpoints with Bearer auth.

``POST /api/openapi/change-clothes-ai`` puts a garment image on a model image;
``POST /api/openapi/change-clothes-by-prompt`` dresses the model from a text prompt. Both answer
JSON ``{code, msg, data}``; ``code`` 200 is success. The document does not say which HTTP
status comes with an error, so ``parse_response`` reads the JSON ``code`` whatever the status
and falls back to the HTTP status only when the body is not the vendor's JSON.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, NoReturn

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from providers import settings
from providers.base import (
    Capabilities,
    OnSubmitted,
    PreparedImage,
    ProviderError,
    TryOnClient,
    TryOnRequest,
    TryOnResult,
    parse_retry_after,
)
from providers.changeclothes.errors import ERROR_TABLE
from providers.changeclothes.settings import (
    API_KEY_ENV,
    CAPABILITIES,
    DEFAULT_BASE_URL,
    NAME,
    PROFILE,
)
from providers.common import (
    classify_status,
    guard_transport,
    key_from_env,
    redact_secrets,
    require_key,
)
from schemas.image_profile import ImageProfile
from schemas.results import ErrorKind

GARMENT_PATH = "/api/openapi/change-clothes-ai"
PROMPT_PATH = "/api/openapi/change-clothes-by-prompt"
# The doc names no request-id header; these are the usual ones (cf-ray: Cloudflare's).
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "cf-ray")
SEED_MAX = 2_147_483_647

ImageTransport = Literal["file", "data_uri", "url"]
_log = logging.getLogger(__name__)


class PromptOptions(BaseModel):
    """Optional tuning of the prompt endpoint, in the doc's ranges; unset fields are not sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    randomize_seed: bool | None = None
    guidance_scale: float | None = Field(default=None, ge=1, le=100, allow_inf_nan=False)
    num_inference_steps: int | None = Field(default=None, ge=1, le=50)

    def form_fields(self) -> list[tuple[str, str]]:
        fields: list[tuple[str, str]] = []
        if self.seed is not None:
            fields.append(("seed", str(self.seed)))
        if self.randomize_seed is not None:
            fields.append(("randomize_seed", "true" if self.randomize_seed else "false"))
        if self.guidance_scale is not None:
            g = self.guidance_scale
            fields.append(("guidance_scale", str(int(g)) if g.is_integer() else repr(g)))
        if self.num_inference_steps is not None:
            fields.append(("num_inference_steps", str(self.num_inference_steps)))
        return fields


def parse_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    redact: Iterable[str] = (),
) -> TryOnResult:
    """A response of either endpoint -> ``TryOnResult``, or a classified ``ProviderError``.

    Pure (no IO), so any response, also one made by hand, can be checked. ``redact``: secrets
    to blank out of any text taken from the response.
    """
    secrets = [s for s in redact if s]
    lowered = {k.lower(): v for k, v in headers.items()}
    request_id = next((lowered[h] for h in REQUEST_ID_HEADERS if lowered.get(h)), None)
    retry_after = parse_retry_after(lowered.get("retry-after"))

    def fail(kind: ErrorKind, code: str, message: str) -> NoReturn:
        raise ProviderError(
            kind=kind,
            code=code,
            message=redact_secrets(message, secrets),
            provider=NAME,
            http_status=status,
            request_id=request_id,
            retry_after=retry_after,
        )

    payload = _vendor_json(body)
    if payload is None:
        snippet = " ".join(body[:160].decode("utf-8", "replace").split())
        if 200 <= status < 300:
            fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", f"HTTP {status} without JSON code")
        kind, name = classify_status(status)
        fail(kind, name, f"HTTP {status} without the vendor's JSON body: {snippet!r}")

    code: int = payload["code"]
    msg = str(payload.get("msg") or "")[:500]
    if code == 200:
        return _success(payload, request_id, fail)
    spec = ERROR_TABLE.get(code)
    if spec is not None:
        name = spec.name or f"CODE_{code}"
        fail(spec.kind, name, f"code {code} {name} ({spec.meaning}): {msg}")
    # Not a vendor code; a gateway in front may still be saying "slow down" or "try later".
    kind, name = classify_status(status)
    if status == 429 or status >= 500 or status in (401, 403):
        fail(kind, name, f"code {code} with HTTP {status}: {msg}")
    fail(ErrorKind.PERMANENT, "UNKNOWN_CODE", f"unknown code {code} (HTTP {status}): {msg}")


def _vendor_json(body: bytes) -> dict[str, Any] | None:
    """The body as ``{code: int, ...}``, or None when it is not the vendor's JSON."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    code = payload.get("code")
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code)
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    return {**payload, "code": code}


_Fail = Callable[[ErrorKind, str, str], NoReturn]


def _success(payload: dict[str, Any], request_id: str | None, fail: _Fail) -> TryOnResult:
    data = payload.get("data")
    result_url = data.get("resultImgUrl") if isinstance(data, dict) else None
    if not isinstance(result_url, str) or not result_url:
        fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "code 200 without data.resultImgUrl")
    assert isinstance(data, dict)
    mask_url = data.get("maskImgUrl")
    cache_hit = data.get("cacheHit")
    seed = data.get("seed")
    if isinstance(seed, str) and seed.strip().isdigit():
        seed = int(seed)
    return TryOnResult(
        result_url=result_url,
        mask_url=mask_url if isinstance(mask_url, str) and mask_url else None,
        request_id=request_id,
        cache_hit=cache_hit if isinstance(cache_hit, bool) else None,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
    )


class ChangeClothesClient(TryOnClient):
    """ChangeClothesAI over httpx. The API key is held as ``SecretStr`` and never echoed."""

    name: ClassVar[str] = NAME
    capabilities: ClassVar[Capabilities] = CAPABILITIES

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile = PROFILE,
        api_key: SecretStr,
        base_url: str,
        image_transport: ImageTransport = "file",
        timeout: float = 120.0,
        prompt_options: PromptOptions | None = None,
    ) -> None:
        super().__init__(http=http, profile=profile)
        api_key = require_key(api_key, provider=NAME)
        if image_transport not in ("file", "data_uri", "url"):
            raise ValueError(f"image_transport must be file, data_uri or url: {image_transport!r}")
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.image_transport: ImageTransport = image_transport
        self.timeout = timeout
        self.prompt_options = prompt_options or PromptOptions()

    @classmethod
    def from_env(
        cls,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile = PROFILE,
        image_transport: ImageTransport = "file",
        timeout: float = 120.0,
        prompt_options: PromptOptions | None = None,
    ) -> ChangeClothesClient:
        """Key from ``CHANGECLOTHES_API_KEY``, base URL from ``TRYON_CHANGECLOTHES_BASE_URL``."""
        return cls(
            http=http,
            profile=profile,
            api_key=key_from_env(API_KEY_ENV, provider=NAME),
            base_url=settings.base_url(NAME, DEFAULT_BASE_URL),
            image_transport=image_transport,
            timeout=timeout,
            prompt_options=prompt_options,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, "
            f"image_transport={self.image_transport!r}, timeout={self.timeout!r})"
        )

    async def try_on(
        self, request: TryOnRequest, *, on_submitted: OnSubmitted | None = None
    ) -> TryOnResult:
        """One call: the garment endpoint when a garment is given, else the prompt endpoint.

        The API is synchronous: there is no job id to report, so ``on_submitted`` is unused.
        """
        if request.lower_garment is not None:
            raise _error(ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST", "no separate lower garment")
        parts: list[tuple[str, Any]]
        if request.garment is not None:
            if request.category not in self.capabilities.categories:
                raise _error(
                    ErrorKind.PERMANENT,
                    "UNSUPPORTED_REQUEST",
                    f"category must be upper_body, lower_body or dresses: {request.category!r}",
                )
            path = GARMENT_PATH
            parts = [
                ("modelImg", self._image_part(request.person)),
                ("garmentImg", self._image_part(request.garment)),
                ("category", (None, request.category)),
            ]
            description = (request.garment_description or "").strip()
            if description:  # the doc's example sends the field only when non-empty
                parts.append(("garmentDesc", (None, description)))
        elif request.prompt and request.prompt.strip():
            path = PROMPT_PATH
            parts = [
                ("modelImg", self._image_part(request.person)),
                ("prompt", (None, request.prompt.strip())),
            ]
            parts += [(k, (None, v)) for k, v in self.prompt_options.form_fields()]
        else:
            raise _error(ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST", "needs a garment or a prompt")
        return await self._post(path, parts)

    def _image_part(self, image: PreparedImage) -> tuple[str | None, bytes | str, str] | Any:
        """One image in the configured input form (file part, data: URI or URL string)."""
        if self.image_transport == "file":
            return (f"{image.sha256[:16] or 'image'}.{image.extension}", image.data, image.mime)
        if self.image_transport == "data_uri":
            encoded = base64.b64encode(image.data).decode("ascii")
            return (None, f"data:{image.mime};base64,{encoded}")
        if not image.url:
            raise _error(
                ErrorKind.PERMANENT,
                "NO_IMAGE_URL",
                f"URL transport needs a staged URL for {image.source_uri}",
            )
        return (None, image.url)

    async def _post(self, path: str, parts: list[tuple[str, Any]]) -> TryOnResult:
        key = self._api_key.get_secret_value()
        url = self.base_url + path
        # Always multipart (the doc requires it): httpx sends (None, str) parts as fields.
        response = await guard_transport(
            self.http.post(
                url,
                files=parts,
                headers={"Authorization": f"Bearer {key}"},
                timeout=self.timeout,
            ),
            provider=NAME,
            url=url,
            timeout=self.timeout,
            secrets=[key],
        )
        _log.debug("changeclothes %s -> HTTP %s", path, response.status_code)
        return parse_response(
            response.status_code, response.headers, response.content, redact=[key]
        )


def _error(kind: ErrorKind, code: str, message: str) -> ProviderError:
    return ProviderError(kind=kind, code=code, message=message, provider=NAME)
