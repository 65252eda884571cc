"""Checks a provider's result must pass before it counts. Pure and Prefect-free.

A provider can answer "success" with something no one wants: bytes that do not decode (or stop
half way), a thumbnail, a banner, a blank frame (moderation often returns a black one), or the
person photo handed back untouched. ``check_output`` turns each into a ``ProviderError`` with its
own code, so the row records why and may go on to a fallback provider.

It runs on every row, so it stays cheap: the header is read first (size, pixel count, with Pillow),
the pixels are decoded at up to 1/8 scale, and everything after works on a 32x32 thumbnail.

Which decoder, by format (``VIPS_FORMATS``; ``bench/checks.py`` measures both for each kind):

- JPEG and WebP: Pillow. A JPEG decodes at 1/2, 1/4 or 1/8 scale (``Image.draft``: DCT
  scaling); a WebP in full, then block means. libvips' shrink-on-load was measured slower here
  (its per-image pipeline costs more than Pillow's whole decode of a 512x768 WebP; a JPEG's
  entropy decoding, which no scaling skips, costs both the same).
- PNG: libvips, streamed (``access="sequential"``: the full-size image is never held), flattened
  on white and reduced to the same block means; about a third less CPU than Pillow's decode.
  Only a format Pillow identified from the header reaches libvips, through that format's own
  loader, with ``fail_on="warning"``: truncated or damaged data stops it, and then Pillow decodes
  the bytes as before and gives the verdict (so a result libvips refuses is judged exactly as it
  always was). Modes libvips would read otherwise (16-bit), animations, and a PNG with metadata
  after its pixels (where an orientation may hide) go to Pillow too.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from PIL import Image, ImageChops

from providers.base import ProviderError
from schemas.results import ErrorKind
from tasks.images.prepare import EXIF_TRANSPOSE
from tasks.images.vips import VipsDeclined, vips

__all__ = [
    "CHANGE_LEVEL",
    "MAX_OUTPUT_ASPECT",
    "MAX_OUTPUT_PIXELS",
    "MIN_CHANGED_SHARE",
    "MIN_GREY_SPREAD",
    "MIN_OUTPUT_SIDE",
    "VIPS_FORMATS",
    "check_output",
    "image_extension",
]

# Providers take inputs under 4096 px a side and answer at about the input's size: 16.8 MP at
# most; past 40 MP the bytes are a decompression bomb, refused from the header before decoding.
MAX_OUTPUT_PIXELS: Final = 40_000_000
# Person inputs are at least 151 px on the short side (AILab's limit; 256 or 513 elsewhere) and
# results come back near that size: under 128 px is a thumbnail or a placeholder.
MIN_OUTPUT_SIDE: Final = 128
# A person photo longer than 4:1 either way is a strip or a banner; a person input that is
# itself more elongated allows its own aspect, with ``ASPECT_SLACK`` for a provider's crop.
MAX_OUTPUT_ASPECT: Final = 4.0
ASPECT_SLACK: Final = 1.25
# Grey levels (0..255) between the 5th and 95th percentile of the thumbnail: a flat frame
# (black, white, one colour) measures 0-1 after lossy encoding; the emulator's results and
# photo-like try-ons measure 90 and more. A watermark under 5% of the frame does not count.
MIN_GREY_SPREAD: Final = 4.0
# Whether the result is the person returned as is: the share of thumbnail pixels that moved
# by more than ``CHANGE_LEVEL`` (in any colour channel). Re-encoding and resizing move no pixel
# by more than 9 (JPEG q50 at half size; WebP q82: 4), so that share is 0; a garment changes
# 11% and more of the frame (a 15% region +15 brighter: 14%), an accessory-sized 3% still 2%.
CHANGE_LEVEL: Final = 12
MIN_CHANGED_SHARE: Final = 0.01

_THUMB: Final = (32, 32)  # aspect ignored: a resized copy of the person still matches
# Decoded at most 8x smaller than this, then resized: block means, as a JPEG decodes at 1/8.
_DRAFT: Final = (_THUMB[0] * 2, _THUMB[1] * 2)
_SPREAD_PERCENTILES: Final = (0.05, 0.95)
_EXTENSIONS: Final = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
# The formats libvips decodes for the thumbnail (Pillow the others): those where it was measured
# cheaper (``bench/checks.py``). Any of JPEG, PNG and WEBP may be listed: the tests hold every
# verdict to Pillow's with all three.
VIPS_FORMATS: frozenset[str] = frozenset({"PNG"})
# Pillow modes each libvips loader reads as 8-bit grey or colour, with or without alpha, as
# Pillow does (a JPEG's CMYK and a 16-bit PNG are converted otherwise: Pillow keeps them).
_VIPS_MODES: Final = {
    "JPEG": frozenset({"L", "RGB"}),
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
# From a source over the bytes: the ``_buffer`` loaders copy them first.
_VIPS_LOADERS: Final = {
    "JPEG": "jpegload_source",
    "PNG": "pngload_source",
    "WEBP": "webpload_source",
}
# PNG chunks Pillow reads after the pixels, on a full decode: any of them may set an orientation.
_PNG_LATE_METADATA: Final = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})
_BACKDROP: Final = (255, 255, 255)  # transparency flattened on white, as input preparation does
# Rows share person photos (one model, many garments): each is decoded once, its thumbnail
# (3 KB) kept by digest. Checks run on worker threads, hence the lock.
_PERSONS_KEPT: Final = 512
_PERSONS: OrderedDict[tuple[bytes, frozenset[str]], _Decoded | None] = OrderedDict()
_PERSONS_LOCK: Final = threading.Lock()
# The last person looked up, by identity: a run hands every row of one person the same bytes
# object (its prepared image), so most lookups skip hashing them (0.1 ms for 100 KB). Keeps that
# one person's bytes alive; replaced whole (one assignment), so no lock.
_LAST_PERSON: tuple[bytes, frozenset[str], _Decoded | None] | None = None


def _fail(code: str, message: str) -> ProviderError:
    return ProviderError(kind=ErrorKind.PERMANENT, code=code, message=message, provider="result")


@dataclass(frozen=True, slots=True)
class _Decoded:
    extension: str
    width: int
    height: int
    thumb: Image.Image  # RGB, ``_THUMB``, upright


def _open(data: bytes, what: str) -> Image.Image:
    """The image with its header read; refuses non-images and pixel bombs before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _fail(
            "OUTPUT_TOO_LARGE", f"{what} has more than {MAX_OUTPUT_PIXELS} pixels"
        ) from None
    except Exception as exc:  # Pillow raises many types on non-images
        raise _fail(
            "RESULT_NOT_AN_IMAGE", f"{what} does not decode as an image ({type(exc).__name__})"
        ) from None
    width, height = image.size
    if width * height > MAX_OUTPUT_PIXELS:
        raise _fail(
            "OUTPUT_TOO_LARGE",
            f"{what} is {width}x{height} px ({width * height} pixels), at most "
            f"{MAX_OUTPUT_PIXELS} expected",
        )
    return image


def _draft_scale(size: tuple[int, int]) -> int:
    """The reduction ``Image.draft`` picks for a JPEG of ``size``: 8, 4, 2 or 1."""
    fits = min(size[0] // _DRAFT[0], size[1] // _DRAFT[1])
    return next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)


def _thumbnail(
    image: Image.Image, data: bytes, what: str, vips_formats: frozenset[str]
) -> Image.Image:
    """Decode into an upright RGB thumbnail, with libvips for ``vips_formats``; truncated or
    corrupt data fails here, which ``Image.verify`` alone would let through."""
    if (image.format or "").upper() in vips_formats:
        thumb = _vips_thumbnail(image, data)
        if thumb is not None:
            return thumb
    return _pillow_thumbnail(image, what)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation from what Pillow read of the header (1 when there is none)."""
    try:
        # Image.Image's own: PngImageFile.getexif decodes the whole image first, to read the
        # chunks after the pixels (``_vips_thumbnail`` sends a PNG that has any to Pillow).
        orientation = Image.Image.getexif(image).get(0x0112, 1)
    except Exception:  # malformed EXIF must not sink an otherwise good image
        return 1
    return orientation if isinstance(orientation, int) else 1


def _png_late_metadata(data: bytes) -> bool:
    """Whether the PNG has a chunk after its first IDAT that Pillow would read for metadata
    (EXIF, text: an orientation may be in either), or a chunk list that does not parse."""
    offset, seen_pixels = 8, False
    try:
        while offset + 8 <= len(data):
            length, kind = struct.unpack_from(">I4s", data, offset)
            if kind == b"IDAT":
                seen_pixels = True
            elif kind == b"IEND":
                return False
            elif seen_pixels and kind in _PNG_LATE_METADATA:
                return True
            offset += 12 + length
    except struct.error:
        return True
    return True  # no IEND: truncated, Pillow decides


def _vips_thumbnail(image: Image.Image, data: bytes) -> Image.Image | None:
    """``_pillow_thumbnail``'s thumbnail decoded by libvips (a JPEG at reduced scale, a PNG or
    WebP streamed), or None when libvips is not for these bytes or refuses them: then Pillow
    decodes them and gives the verdict, as it always has."""
    fmt = (image.format or "").upper()
    if image.mode not in _VIPS_MODES.get(fmt, ()) or getattr(image, "is_animated", False):
        return None
    if fmt == "PNG" and _png_late_metadata(data):
        return None
    orientation = _orientation(image)
    width, height = image.size
    scale = _draft_scale(image.size)
    alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    try:
        pyvips = vips()
    except VipsDeclined:  # no usable libvips here: Pillow decodes
        return None
    load = getattr(pyvips.Image, _VIPS_LOADERS[fmt])
    # The reduced image's size, and the source box in its coordinates (as ``_pillow_thumbnail``).
    size = (math.ceil(width / scale), math.ceil(height / scale))
    box = (0.0, 0.0, width / scale, height / scale)
    try:
        source = pyvips.Source.new_from_memory(data)
        if fmt == "JPEG":  # DCT scaling, as ``Image.draft``: the same pixels
            picture = load(source, shrink=scale, fail_on="warning", access="sequential")
        else:
            # In full, streamed, then block means. Not libwebp's scaled decode: it was no
            # cheaper here, and it resamples chroma at half resolution and rounds the size,
            # which moved thumbnails by up to 16 levels (the unchanged check's margin is 12).
            picture = load(source, fail_on="warning", access="sequential")
            if (picture.width, picture.height) != (width, height):
                return None
        if picture.format != "uchar" or picture.bands - picture.hasalpha() not in (1, 3):
            return None
        if picture.hasalpha():  # on white, at full size, as ``_pillow_thumbnail``
            picture = picture.flatten(background=[255.0] * (picture.bands - 1))
        elif alpha:  # transparency libvips did not read as alpha: Pillow's way
            return None
        if fmt != "JPEG" and scale > 1:
            # A partial last block is edge-extended here, a mean of what is there in Pillow's
            # ``reduce``: up to a few levels apart in the thumbnail's last row and column.
            picture = picture.shrink(scale, scale, ceil=True)
        if (picture.width, picture.height) != size:
            return None
        pixels = picture.write_to_memory()
    except pyvips.Error:
        return None
    reduced = Image.frombytes("L" if picture.bands == 1 else "RGB", size, pixels)
    thumb = reduced.convert("RGB").resize(_THUMB, Image.Resampling.BILINEAR, box=box)
    method = EXIF_TRANSPOSE.get(orientation)
    return thumb.transpose(method) if method is not None else thumb


def _pillow_thumbnail(image: Image.Image, what: str) -> Image.Image:
    """``_thumbnail`` by Pillow (a JPEG decoded at reduced scale)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF must not sink an otherwise good image
        orientation = 1
    try:
        drafted = image.draft("RGB", _DRAFT)
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", image.size, _BACKDROP)
            image.paste(rgba, mask=rgba)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        if drafted is not None:
            box = drafted[1]
        else:  # other formats: the same 1/2, 1/4 or 1/8 block means as a JPEG's scaled decode
            scale = _draft_scale(image.size)
            box = (0.0, 0.0, image.width / scale, image.height / scale)
            image = image.reduce(scale) if scale > 1 else image
        # From the exact source box: the reduced image's last row and column cover partial
        # blocks, and ignoring that shifts the thumbnail against one made another way.
        thumb = image.resize(_THUMB, Image.Resampling.BILINEAR, box=box)
    except Exception as exc:
        raise _fail(
            "RESULT_NOT_AN_IMAGE", f"{what} does not decode as an image ({type(exc).__name__})"
        ) from None
    method = EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return thumb.transpose(method) if method is not None else thumb


def _decode(data: bytes, what: str, vips_formats: frozenset[str]) -> _Decoded:
    with _open(data, what) as image:
        fmt = (image.format or "").upper()
        width, height = image.size
        thumb = _thumbnail(image, data, what, vips_formats)
    return _Decoded(_EXTENSIONS.get(fmt, fmt.lower()), width, height, thumb)


def image_extension(data: bytes) -> str:
    """The file extension of a by-product image (a mask, which may well be flat): refuses
    non-images and pixel bombs from the header and structure (``Image.verify``), without
    decoding: a mask never fails its row, so it is not worth a result's full check."""
    with _open(data, "mask") as image:
        fmt = (image.format or "").upper()
        try:
            image.verify()
        except Exception as exc:
            raise _fail(
                "RESULT_NOT_AN_IMAGE", f"mask does not decode as an image ({type(exc).__name__})"
            ) from None
    return _EXTENSIONS.get(fmt, fmt.lower())


def grey_spread(thumb: Image.Image) -> float:
    """Grey levels between the 5th and 95th percentile of ``thumb``'s pixels."""
    histogram = thumb.convert("L").histogram()
    total = sum(histogram)
    low_rank, high_rank = (total * p for p in _SPREAD_PERCENTILES)
    low = high = None
    seen = 0
    for level, count in enumerate(histogram):
        seen += count
        if low is None and seen > low_rank:
            low = level
        if seen >= high_rank:
            high = level
            break
    assert low is not None and high is not None
    return float(high - low)


def changed_share(a: Image.Image, b: Image.Image) -> float:
    """The share of pixels of two same-size RGB thumbnails that differ by more than
    ``CHANGE_LEVEL`` in any channel: colour counts, so a garment swapped for one of another
    hue but equal brightness is a change; compression noise, spread thin, is not."""
    red, green, blue = ImageChops.difference(a, b).split()
    largest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    histogram = largest.histogram()
    return sum(histogram[CHANGE_LEVEL + 1 :]) / sum(histogram)


def _person(person: bytes | None, vips_formats: frozenset[str]) -> _Decoded | None:
    """The person image as sent, decoded; None when there is none or it does not decode (a
    broken input is not the result's fault: the unchanged check is then skipped)."""
    if person is None:
        return None
    return _person_thumbnail(person, vips_formats)


def _person_thumbnail(person: bytes, vips_formats: frozenset[str]) -> _Decoded | None:
    global _LAST_PERSON
    last = _LAST_PERSON
    if last is not None and last[0] is person and last[1] == vips_formats:
        return last[2]
    # The digest keeps no image bytes alive; a person is decoded as results are, hence the key.
    key = (hashlib.blake2b(person, digest_size=16).digest(), vips_formats)
    with _PERSONS_LOCK:
        found = key in _PERSONS
        if found:
            _PERSONS.move_to_end(key)
            decoded = _PERSONS[key]
    if not found:
        try:
            decoded = _decode(person, "person image", vips_formats)
        except ProviderError:
            decoded = None
        with _PERSONS_LOCK:
            _PERSONS[key] = decoded
            while len(_PERSONS) > _PERSONS_KEPT:
                _PERSONS.popitem(last=False)
    _LAST_PERSON = (person, vips_formats, decoded)
    return decoded


def check_output(
    data: bytes, *, person: bytes | None, vips_formats: frozenset[str] | None = None
) -> str:
    """The file extension of a provider result that is fit to keep, else a ``ProviderError``
    (``PERMANENT``, provider ``"result"``) with the problem's code:

    ``RESULT_NOT_AN_IMAGE`` does not decode (also truncated), ``OUTPUT_TOO_LARGE`` a pixel bomb,
    ``OUTPUT_TOO_SMALL``, ``OUTPUT_BAD_ASPECT``, ``OUTPUT_BLANK`` (one flat level),
    ``OUTPUT_UNCHANGED`` (``person``, the person image as sent, returned byte for byte or
    re-encoded). Messages give the measured figure and the limit, never image bytes.

    ``vips_formats``: the formats libvips decodes, Pillow the others; ``VIPS_FORMATS`` unless
    given (the verdicts are the same either way; the CPU is not: see the module docstring).
    """
    if vips_formats is None:
        vips_formats = VIPS_FORMATS
    if person is not None and data == person:
        raise _fail("OUTPUT_UNCHANGED", "result is the person image as sent, byte for byte")
    with _open(data, "provider result") as image:
        fmt = (image.format or "").upper()
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if short < MIN_OUTPUT_SIDE:
            raise _fail(
                "OUTPUT_TOO_SMALL",
                f"result is {width}x{height} px: short side {short} px, "
                f"at least {MIN_OUTPUT_SIDE} expected",
            )
        person_image = _person(person, vips_formats)
        limit = MAX_OUTPUT_ASPECT
        if person_image is not None:
            p_short = max(1, min(person_image.width, person_image.height))
            p_aspect = max(person_image.width, person_image.height) / p_short
            limit = max(limit, p_aspect * ASPECT_SLACK)
        aspect = long / short
        if aspect > limit:
            raise _fail(
                "OUTPUT_BAD_ASPECT",
                f"result is {width}x{height} px: aspect {aspect:.2f}:1, at most {limit:.2f}:1 "
                "expected",
            )
        thumb = _thumbnail(image, data, "provider result", vips_formats)
    spread = grey_spread(thumb)
    if spread < MIN_GREY_SPREAD:
        raise _fail(
            "OUTPUT_BLANK",
            f"result is uniform: grey-level spread {spread:.1f}, at least {MIN_GREY_SPREAD:g} "
            "expected",
        )
    if person_image is not None:
        share = changed_share(thumb, person_image.thumb)
        if share < MIN_CHANGED_SHARE:
            raise _fail(
                "OUTPUT_UNCHANGED",
                f"result is the person image unchanged: {share:.1%} of the picture changed by "
                f"more than {CHANGE_LEVEL} levels, at least {MIN_CHANGED_SHARE:.0%} expected",
            )
    return _EXTENSIONS.get(fmt, fmt.lower())
