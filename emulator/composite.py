"""Visible, deterministic stand-ins for try-on results (Pillow only: numpy is a dev extra).

The garment is pasted, its near-white background keyed out, into the body region of the
category; a prompt tints the torso. Same input bytes -> identical output bytes, so callers
may cache by input hash. Functions here are CPU-bound: call them from a worker thread.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageOps

from emulator.config import BadOutput

# Body regions as fractions of the person image: (left, top, right, bottom).
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "upper_body": (0.20, 0.18, 0.80, 0.55),
    "lower_body": (0.25, 0.48, 0.75, 0.92),
    "dresses": (0.20, 0.18, 0.80, 0.88),
}
PROMPT_REGION = REGIONS["upper_body"]
LABEL = "EMULATOR"
WEBP_QUALITY = 82
# Bad outputs (``FaultPlan.bad_outputs``): sizes well past the limits a result check sets.
TINY_SIDE = 64  # a thumbnail's long side
WIDE_SIZE = (1024, 160)  # a 6.4:1 banner, its short side no thumbnail's

# Signatures checked instead of decoding in fast mode.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can read."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """One try-on result and its inpaint mask, both WEBP."""

    result: bytes
    mask: bytes
    width: int
    height: int


def sniff_image(data: bytes) -> str | None:
    """The MIME type from the file signature, or None: fast mode's only check."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    return None


def decode(data: bytes, max_side: int) -> Image.Image:
    """Decode, rotate upright, convert to RGB and shrink to fit ``max_side``."""
    try:
        image = Image.open(io.BytesIO(data))
        # draft lets the JPEG decoder downscale while decoding: far cheaper than full size.
        image.draft("RGB", (max_side, max_side))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UndecodableImage(str(exc) or type(exc).__name__) from None
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def region_box(size: tuple[int, int], region: tuple[float, float, float, float]) -> tuple[int, ...]:
    width, height = size
    left, top, right, bottom = region
    return (round(left * width), round(top * height), round(right * width), round(bottom * height))


def _garment_cutout(garment: Image.Image) -> Image.Image:
    """RGBA garment with its near-white background made transparent by a soft mask."""
    red, green, blue = garment.split()
    darkest = ImageChops.darker(ImageChops.darker(red, green), blue)
    # Distance from white: 0 on the background, large on the garment.
    distance = ImageChops.invert(darkest)
    alpha = distance.point(lambda v: 0 if v < 14 else min(255, (v - 14) * 8))
    alpha = alpha.filter(ImageFilter.GaussianBlur(1.2))
    bbox = alpha.point(lambda v: 255 if v > 32 else 0).getbbox()
    if bbox is None:  # nothing but white: paste the whole image opaque so it stays visible
        alpha = Image.new("L", garment.size, 255)
        bbox = (0, 0, *garment.size)
    cutout = garment.convert("RGBA")
    cutout.putalpha(alpha)
    return cutout.crop(bbox)


def _font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(10, height // 40))


def _label(image: Image.Image, text: str = LABEL) -> None:
    """A small dark tag in the bottom-left corner, outside every body region's centre."""
    draw = ImageDraw.Draw(image)
    font = _font(image.height)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 3
    x, y = pad, image.height - (bottom - top) - 3 * pad
    box = (x - pad, y - pad, x + right - left + pad, y + bottom - top + pad)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((x - left, y - top), text, fill=(255, 255, 255), font=font)


@lru_cache(maxsize=64)  # one per image size and region: most batches share a few sizes
def _mask(size: tuple[int, int], box: tuple[int, ...]) -> bytes:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return _webp(mask, lossless=True)


def _webp(image: Image.Image, *, lossless: bool = False) -> bytes:
    buffer = io.BytesIO()
    # method 2: a third of the encoder time of the default 4 for a slightly larger file.
    image.save(
        buffer, "WEBP", quality=WEBP_QUALITY, method=2 if not lossless else 4, lossless=lossless
    )
    return buffer.getvalue()


def render_garment(
    person_bytes: bytes,
    garment_bytes: bytes,
    category: str,
    *,
    max_side: int = 768,
    tag: str = LABEL,
) -> Rendered:
    """The garment pasted onto the person in the category's region, plus the region mask.
    ``tag``: the corner label; each vendor's names it, so two vendors never answer the same
    bytes (as real ones never do)."""
    try:
        person = decode(person_bytes, max_side)
    except UndecodableImage as exc:
        raise UndecodableImage(f"modelImg: {exc}") from None
    try:
        garment = decode(garment_bytes, max_side)
    except UndecodableImage as exc:
        raise UndecodableImage(f"garmentImg: {exc}") from None
    box = region_box(person.size, REGIONS[category])
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    cutout = _garment_cutout(garment)
    cutout = ImageOps.contain(cutout, (box_w, box_h), Image.Resampling.LANCZOS)
    x = box[0] + (box_w - cutout.width) // 2
    y = box[1] + (box_h - cutout.height) // 2
    person.paste(cutout, (x, y), cutout)
    _label(person, tag)
    return Rendered(_webp(person), _mask(person.size, box), person.width, person.height)


def prompt_colour(prompt: str) -> tuple[int, int, int]:
    """A saturated colour derived from the prompt text only."""
    digest = hashlib.sha256(prompt.strip().lower().encode()).digest()
    red, green, blue = colorsys.hsv_to_rgb(digest[0] / 255, 0.55 + digest[1] / 1020, 0.85)
    return round(red * 255), round(green * 255), round(blue * 255)


def render_prompt(person_bytes: bytes, prompt: str, *, max_side: int = 768) -> Rendered:
    """The torso tinted with the prompt's colour and its first words written on it."""
    try:
        person = decode(person_bytes, max_side)
    except UndecodableImage as exc:
        raise UndecodableImage(f"modelImg: {exc}") from None
    box = region_box(person.size, PROMPT_REGION)
    soft = Image.new("L", person.size, 0)
    ImageDraw.Draw(soft).rounded_rectangle(box, radius=max(4, (box[2] - box[0]) // 8), fill=170)
    soft = soft.filter(ImageFilter.GaussianBlur(3))
    person.paste(Image.new("RGB", person.size, prompt_colour(prompt)), (0, 0), soft)
    words = " ".join(prompt.split()[:4])
    draw = ImageDraw.Draw(person)
    font = _font(person.height)
    draw.text((box[0] + 6, box[1] + 6), words, fill=(255, 255, 255), font=font)
    _label(person)
    return Rendered(_webp(person), _mask(person.size, box), person.width, person.height)


def synthetic_person(width: int = 512, height: int = 768) -> bytes:
    """A plain figure on a grey background (JPEG): a stand-in person for fast mode and demos."""
    image = Image.new("RGB", (width, height), (200, 204, 210))
    draw = ImageDraw.Draw(image)
    cx, w, h = width // 2, width, height
    draw.ellipse((cx - w * 0.1, h * 0.04, cx + w * 0.1, h * 0.17), fill="tan")
    draw.rectangle((cx - w * 0.22, h * 0.18, cx + w * 0.22, h * 0.52), fill="navy")
    draw.rectangle((cx - w * 0.18, h * 0.52, cx + w * 0.18, h * 0.95), fill="grey")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def synthetic_garment(colour: tuple[int, int, int] = (200, 30, 40), size: int = 512) -> bytes:
    """A plain garment shape on a white background (JPEG)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    s = size
    draw.polygon(
        [(s * 0.3, s * 0.1), (s * 0.7, s * 0.1), (s * 0.9, s * 0.3), (s * 0.78, s * 0.4),
         (s * 0.72, s * 0.34), (s * 0.72, s * 0.9), (s * 0.28, s * 0.9), (s * 0.28, s * 0.34),
         (s * 0.22, s * 0.4), (s * 0.1, s * 0.3)],
        fill=colour,
    )  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@lru_cache(maxsize=16)
def prerendered(kind: str, category: str, max_side: int = 768, tag: str = LABEL) -> Rendered:
    """Fast mode's fixed answer per endpoint kind, category and vendor tag, rendered once per
    process."""
    if kind == "prompt":
        return render_prompt(synthetic_person(), "emulator fast mode", max_side=max_side)
    return render_garment(
        synthetic_person(), synthetic_garment(), category, max_side=max_side, tag=tag
    )


def bad_output(kind: BadOutput, result: bytes, person: bytes, *, max_side: int = 768) -> bytes:
    """``result`` (a WEBP the route rendered) replaced by the bad output ``kind``, as WEBP
    (``corrupt``: its first half). ``unchanged`` is ``person`` decoded and re-encoded the way
    a result is, not its bytes: harder to tell from a real result."""
    if kind == "corrupt":
        return result[: len(result) // 2]
    if kind == "unchanged":
        return _webp(decode(person, max_side))
    with Image.open(io.BytesIO(result)) as image:
        if kind == "blank":  # as a moderation filter answers: black, at the result's size
            return _webp(Image.new("RGB", image.size, (0, 0, 0)))
        picture = image.convert("RGB")
    if kind == "tiny":
        picture.thumbnail((TINY_SIDE, TINY_SIDE), Image.Resampling.LANCZOS)
        return _webp(picture)
    if kind == "wide":
        return _webp(picture.resize(WIDE_SIZE, Image.Resampling.LANCZOS))
    raise ValueError(f"unknown bad output {kind!r}")
