"""ACME's endpoint for the emulator: checks the key and the images, answers a marked image."""

from __future__ import annotations

import base64
import binascii
import io
import uuid

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from acme_tryon import API_KEY_ENV, NAME, TRY_ON_PATH
from emulator.keys import accepted_key
from emulator.plugins import EmulatedProvider
from emulator.state import EmulatorState

DEFAULT_KEY = "emulator-acme-key"
# Every result is the person image with this colour across its top quarter: a test can tell
# ACME's answers from any other provider's.
MARK_RGB = (255, 0, 255)


def _decoded(text: object) -> Image.Image:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")


async def try_on(request: Request) -> Response:
    if request.headers.get("authorization") != f"Bearer {accepted_key(API_KEY_ENV)}":
        return JSONResponse({"error": "invalid key"}, status_code=401)
    body = await request.json()
    try:
        person = _decoded(body.get("person"))
        _decoded(body.get("garment"))
    except (ValueError, binascii.Error, UnidentifiedImageError):
        return JSONResponse({"error": "person and garment must be base64 images"}, 422)
    person.paste(MARK_RGB, (0, 0, person.width, max(1, person.height // 4)))
    out = io.BytesIO()
    person.save(out, "PNG")
    return JSONResponse(
        {"id": uuid.uuid4().hex, "image": base64.b64encode(out.getvalue()).decode()}
    )


def routes(state: EmulatorState) -> list[Route]:
    return [Route(TRY_ON_PATH, try_on, methods=["POST"], name="acme_try_on")]


EMULATED = EmulatedProvider(name=NAME, routes=routes, default_keys={API_KEY_ENV: DEFAULT_KEY})
