"""Drawn test images, and requests made of them, for the provider and emulator tests."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from providers.base import PreparedImage, TryOnRequest

PERSON_SIZE = (384, 576)
# Where a garment of each category lands on ``person_jpeg``'s figure, as row fractions: a band
# it changes, and one it leaves alone.
CATEGORY_BANDS = {
    "upper_body": ((0.25, 0.50), (0.62, 0.90)),
    "lower_body": ((0.60, 0.85), (0.20, 0.45)),
    "dresses": ((0.25, 0.85), (0.00, 0.15)),
}


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def person_jpeg(
    shirt: tuple[int, int, int] = (20, 40, 120), size: tuple[int, int] = PERSON_SIZE
) -> bytes:
    """A flat figure: head, torso (``shirt``), legs, on a light grey background."""
    w, h = size
    image = Image.new("RGB", (w, h), (205, 205, 210))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.4, h * 0.03, w * 0.6, h * 0.16), fill=(210, 170, 140))
    draw.rectangle((w * 0.28, h * 0.18, w * 0.72, h * 0.52), fill=shirt)
    draw.rectangle((w * 0.32, h * 0.52, w * 0.68, h * 0.95), fill=(90, 90, 90))
    return _jpeg(image)


def garment_jpeg(
    colour: tuple[int, int, int] = (220, 30, 30), size: tuple[int, int] = (400, 400)
) -> bytes:
    """A garment filling most of a white product shot."""
    w, h = size
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle((w * 0.15, h * 0.125, w * 0.85, h * 0.9), fill=colour)
    return _jpeg(image)


def prepared(
    data: bytes, *, url: str | None = None, mime: str = "image/jpeg", source: str = "mem://image"
) -> PreparedImage:
    """Bytes -> ``PreparedImage`` as the preparation step would hand it to a client."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except OSError:  # deliberately broken bytes
        width, height = 1, 1
    return PreparedImage(
        data=data,
        mime=mime,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        source_uri=source,
        url=url,
    )


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def band_diff(a: np.ndarray, b: np.ndarray, top: float, bottom: float) -> float:
    """Mean absolute difference of two same-size images over rows [top, bottom), middle columns."""
    h, w = a.shape[:2]
    rows = slice(round(top * h), round(bottom * h))
    cols = slice(round(0.4 * w), round(0.6 * w))
    return float(np.abs(a[rows, cols] - b[rows, cols]).mean())


def garment_request(
    person: bytes, garment: bytes, category: str = "upper_body", **kwargs: Any
) -> TryOnRequest:
    """One person, one garment: the request every try-on provider takes."""
    return TryOnRequest(
        row_id="row-1",
        person=prepared(person),
        garment=prepared(garment),
        category=category,  # type: ignore[arg-type]
        **kwargs,
    )


def assert_dressed(output: np.ndarray, original: np.ndarray, category: str) -> None:
    """``output`` is ``original`` with a garment of ``category`` on: its band changed, the
    band it leaves alone unchanged (``CATEGORY_BANDS``)."""
    changed, unchanged = CATEGORY_BANDS[category]
    assert band_diff(output, original, *changed) > 40
    assert band_diff(output, original, *unchanged) < 6
