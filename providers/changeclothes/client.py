"""ChangeClothesAI client (doc 000): two synchronous multipart endpoints with Bearer auth.

``POST /api/openapi/change-clothes-ai`` puts a garment image on a model image;
``POST /api/openapi/change-clothes-by-prompt`` dresses the model from a text prompt. Both answer
JSON ``{code, msg, data}``; ``code`` 200 is success. The document does not say which HTTP
status comes with an error, so ``parse_response`` reads the JSON ``code`` whatever the status
and falls back to the HTTP status only when the body is not the vendor's JSON.

Balance: docs 000/001 document no endpoint for the account's credits (they point to the
dashboard's pricing page only), so a run cannot read what is left before it starts.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from providers import settings
from providers.base import (
    Capabilities,
    OnSubmitted,
    PreparedImage,
    TryOnClient,
    TryOnRequest,
    TryOnResult,
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
    ResponseContext,
    classify_status,
    json_with_code,
    key_from_env,
    require_key,
    send,
    staged_url,
    unsupported_category,
    unsupported_request,
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
    ctx = ResponseContext(
        NAME, status, headers, redact=redact, request_id_headers=REQUEST_ID_HEADERS
    )
    payload = json_with_code(body)
    if payload is None:
        ctx.fail_without_json(body)
    code: int = payload["code"]
    msg = str(payload.get("msg") or "")[:500]
    if code == 200:
        return _success(payload, ctx)
    spec = ERROR_TABLE.get(code)
    if spec is not None:
        ctx.fail_code(code, spec, msg)
    # Not a vendor code; a gateway in front may still be saying "slow down" or "try later".
    kind, name = classify_status(status)
    if status == 429 or status >= 500 or status in (401, 403):
        ctx.fail(kind, name, f"code {code} with HTTP {status}: {msg}")
    ctx.fail(ErrorKind.PERMANENT, "UNKNOWN_CODE", f"unknown code {code} (HTTP {status}): {msg}")


def _success(payload: dict[str, Any], ctx: ResponseContext) -> TryOnResult:
    data = payload.get("data")
    result_url = data.get("resultImgUrl") if isinstance(data, dict) else None
    if not isinstance(result_url, str) or not result_url:
        ctx.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", "code 200 without data.resultImgUrl")
    assert isinstance(data, dict)
    mask_url = data.get("maskImgUrl")
    cache_hit = data.get("cacheHit")
    seed = data.get("seed")
    if isinstance(seed, str) and seed.strip().isdecimal():
        seed = int(seed)
    return TryOnResult(
        result_url=result_url,
        mask_url=mask_url if isinstance(mask_url, str) and mask_url else None,
        request_id=ctx.request_id,
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
            raise unsupported_request(NAME, "no separate lower garment")
        parts: list[tuple[str, Any]]
        if request.garment is not None:
            if request.category not in self.capabilities.categories:
                raise unsupported_category(NAME, request.category)
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
            raise unsupported_request(NAME, "needs a garment or a prompt")
        return await self._post(path, parts)

    def _image_part(self, image: PreparedImage) -> tuple[str | None, bytes | str, str] | Any:
        """One image in the configured input form (file part, data: URI or URL string)."""
        if self.image_transport == "file":
            return (f"{image.sha256[:16] or 'image'}.{image.extension}", image.data, image.mime)
        if self.image_transport == "data_uri":
            encoded = base64.b64encode(image.data).decode("ascii")
            return (None, f"data:{image.mime};base64,{encoded}")
        return (None, staged_url(image, provider=NAME))

    async def _post(self, path: str, parts: list[tuple[str, Any]]) -> TryOnResult:
        key = self._api_key.get_secret_value()
        # Always multipart (the doc requires it): httpx sends (None, str) parts as fields.
        response = await send(
            self.http,
            "POST",
            self.base_url + path,
            provider=NAME,
            timeout=self.timeout,
            secrets=[key],
            files=parts,
            headers={"Authorization": f"Bearer {key}"},
        )
        _log.debug("changeclothes %s -> HTTP %s", path, response.status_code)
        return parse_response(
            response.status_code, response.headers, response.content, redact=[key]
        )
