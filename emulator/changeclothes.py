"""ChangeClothesAI (doc 000) as the emulator speaks it: two multipart endpoints, Bearer auth.

The code table is kept here on purpose, separate from the client's: the emulator follows the
document, so a mistake in the client's table shows up in the contract tests instead of being
mirrored.

HTTP statuses are OUR ASSUMPTION: the document only lists the JSON ``code`` values (its Node
example merely implies that errors arrive with a non-2xx status and a JSON body carrying
``msg``). We answer 200 for code 200; 401 for 10001/10002/30001/30002; 402 for 10003/10006;
400 for 10004/10005 and for codes we do not know; 500 for 500/20001. Injected gateway faults
are not vendor codes: a 429 carries ``Retry-After`` and ``{"code": 429, "msg": "Too Many
Requests"}``; a 5xx is an HTML 503 from "the load balancer".
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from starlette.datastructures import FormData
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
    InputError,
    VendorApi,
    cache_key,
    is_multipart,
    read_image_field,
    text_field,
)
from emulator.keys import accepted_key
from emulator.state import EmulatorState, QuotaError

PROVIDER = "changeclothes"
API_KEY_ENV = "CHANGECLOTHES_API_KEY"
GARMENT_PATH = "/api/openapi/change-clothes-ai"
PROMPT_PATH = "/api/openapi/change-clothes-by-prompt"
CATEGORIES = ("upper_body", "lower_body", "dresses")
SEED_MAX = 2_147_483_647
# The doc names no default seed; a fixed one keeps unrandomized prompt runs reproducible.
DEFAULT_SEED = 42

# code -> (message, HTTP status); messages are the doc's "Nachricht" column.
CODES: dict[int, tuple[str, int]] = {
    200: ("OK", 200),
    500: ("SERVER_ERROR", 500),
    10001: ("NOT_LOGIN", 401),
    10002: ("USER_NOT_EXIST", 401),
    10003: ("INSUFFICIENT_CREDITS", 402),
    10004: ("INVALID_PARAM", 400),
    10005: ("HARMFUL_CONTENT", 400),
    10006: ("INSUFFICIENT_TRAIL_COUNT", 402),
    20001: ("TRY_ON_EXCEPTION", 500),
    30001: ("INVALID_API_KEY", 401),
    30002: ("INVALID_SIGNATURE", 401),
}


class VendorError(common.VendorError[int]):
    """Ends a call with one of the vendor's codes (see ``CODES``)."""


def routes(state: EmulatorState) -> list[Route]:
    """The vendor's endpoints, bound to the shared state."""
    api = _ChangeClothesApi(state)
    return [
        Route(GARMENT_PATH, api.garment, methods=["POST"], name="changeclothes_garment"),
        Route(PROMPT_PATH, api.prompt, methods=["POST"], name="changeclothes_prompt"),
    ]


_Process = Callable[[Request, FormData], Awaitable[dict[str, Any]]]


class _ChangeClothesApi(VendorApi[int]):
    error_type = VendorError
    internal_error = 500

    def __init__(self, state: EmulatorState) -> None:
        super().__init__(state, PROVIDER, accepted_key(API_KEY_ENV))
        self.gateway = GatewayAnswers(
            # A hang ends in the service's own code 500 (counted once, as the timeout).
            timed_out=partial(self._json, 500, "SERVER_ERROR: upstream timed out"),
            rate_limited=self._rate_limited,
            forced=partial(self._error, detail=INJECTED),
        )

    async def garment(self, request: Request) -> Response:
        return await self._call(request, partial(self._form_call, self._garment))

    async def prompt(self, request: Request) -> Response:
        return await self._call(request, partial(self._form_call, self._prompt))

    # -- one call, in the order a real service would answer ----------------------------------

    async def _form_call(
        self, process: _Process, request: Request, admitted: Admitted, credit: Credit
    ) -> Response:
        token = self._authenticate(request)
        try:
            credit.take(token, self.state.config.trial_keys.get(token))
        except QuotaError as exc:
            echo = self._echo("API key", token)
            raise VendorError(10006 if exc.reason == "trial" else 10003, echo) from None
        if not is_multipart(request):
            raise VendorError(10004, "content-type must be multipart/form-data")
        try:
            async with request.form(**FORM_LIMITS) as form:
                return JSONResponse(await process(request, form))
        except MultiPartException as exc:
            raise VendorError(10004, f"malformed multipart body: {exc.message}") from None
        except InputError as exc:
            raise VendorError(10004, str(exc)) from None
        except composite.UndecodableImage as exc:
            raise VendorError(10004, f"image could not be decoded: {exc}") from None

    def _authenticate(self, request: Request) -> str:
        token = self._bearer_token(
            request,
            missing=VendorError(10001),
            malformed=VendorError(30002, "authorization must be 'Bearer <api key>'"),
        )
        if not self._known_key(token, deleted=10002):
            raise VendorError(30001, self._echo("API key", token))
        return token

    # -- the two endpoints ------------------------------------------------------------------

    async def _garment(self, request: Request, form: FormData) -> dict[str, Any]:
        category = text_field(form.get("category"), "category", required=True)
        if category not in CATEGORIES:
            raise InputError(f"category must be one of {', '.join(CATEGORIES)}")
        description = text_field(form.get("garmentDesc"), "garmentDesc", required=False)
        self._check_harmful(description, "garmentDesc")
        person = await self._image(form, "modelImg")
        garment = await self._image(form, "garmentImg")
        key, compute = common.garment_render(
            self.state, person, garment, category, label="garment", vendor="changeclothes"
        )
        rendered = await self.state.composites.get_or_compute(key, compute)
        result = await common.handed_out(self.state, self.provider, rendered.result, person)
        return {
            "code": 200,
            "msg": "OK",
            "data": {
                "resultImgUrl": self._store(request, result),
                "maskImgUrl": self._store(request, rendered.mask),
                # The vendor sets this only for its own preset models and garments.
                "cacheHit": False,
            },
        }

    async def _prompt(self, request: Request, form: FormData) -> dict[str, Any]:
        prompt = text_field(form.get("prompt"), "prompt", required=True)
        assert prompt is not None
        self._check_harmful(prompt, "prompt")
        seed = _int_field(form, "seed", 0, SEED_MAX)
        randomize = text_field(form.get("randomize_seed"), "randomize_seed", required=False)
        if randomize is not None and randomize not in ("true", "false"):
            raise InputError("randomize_seed must be 'true' or 'false'")
        guidance = text_field(form.get("guidance_scale"), "guidance_scale", required=False)
        if guidance is not None:
            try:
                value = float(guidance)
            except ValueError:
                raise InputError("guidance_scale must be a number") from None
            if not (math.isfinite(value) and 1 <= value <= 100):
                raise InputError("guidance_scale must be between 1 and 100")
        _int_field(form, "num_inference_steps", 1, 50)
        person = await self._image(form, "modelImg")
        if randomize == "true":
            seed = self.provider.seed_rng.randint(0, SEED_MAX)
        elif seed is None:
            seed = DEFAULT_SEED
        max_side = self.state.config.composite_max_side
        if self.state.config.fast_mode:
            key = f"fast|prompt|{max_side}"
            compute = partial(composite.prerendered, "prompt", "", max_side)
        else:
            key = cache_key("prompt", str(max_side), person, prompt.encode())
            compute = partial(composite.render_prompt, person, prompt, max_side=max_side)
        rendered = await self.state.composites.get_or_compute(key, compute)
        result = await common.handed_out(self.state, self.provider, rendered.result, person)
        # The doc's example answer for this endpoint has no "msg" and no mask.
        result_url = self._store(request, result)
        return {"code": 200, "data": {"resultImgUrl": result_url, "seed": seed}}

    # -- helpers ----------------------------------------------------------------------------

    async def _image(self, form: FormData, field: str) -> bytes:
        config = self.state.config
        data = await read_image_field(
            form.get(field), field, http=self.state.http, max_bytes=config.max_image_bytes
        )
        if config.fast_mode and composite.sniff_image(data) is None:
            raise InputError(f"{field}: not a JPEG, PNG, WEBP, GIF or BMP image")
        return data

    def _check_harmful(self, text: str | None, field: str) -> None:
        if not text:
            return
        for word in self.state.config.blocked_words:
            if re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE):
                raise VendorError(10005, f"{field} contains blocked content")

    def _store(self, request: Request, data: bytes) -> str:
        return common.store_result(self.state, common.base_url(request), data)

    def _rate_limited(self) -> Response:
        return common.rate_limited(self.provider, {"code": 429, "msg": "Too Many Requests"})

    def _error(self, code: int, detail: str | None = None) -> Response:
        self.provider.record(code)
        name, _ = CODES.get(code, ("UNKNOWN", 400))
        return self._json(code, f"{name}: {detail}" if detail else name)

    @staticmethod
    def _json(code: int, msg: str) -> JSONResponse:
        _, status = CODES.get(code, ("UNKNOWN", 400))
        return JSONResponse({"code": code, "msg": msg}, status_code=status)


def _int_field(form: FormData, field: str, low: int, high: int) -> int | None:
    raw = text_field(form.get(field), field, required=False)
    if raw is None:
        return None
    if not re.fullmatch(r"\s*-?\d+\s*", raw):
        raise InputError(f"{field} must be an integer")
    value = int(raw)
    if not low <= value <= high:
        raise InputError(f"{field} must be between {low} and {high}")
    return value
