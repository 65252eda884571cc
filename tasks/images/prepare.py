"""Fit an input image to a provider's ``ImageProfile``. Prefect-free.

``prepare_image`` decodes (refusing decompression bombs from the header alone), makes the image
upright, flattens it to 8-bit sRGB, fits it to the profile and re-encodes it under the byte limit.
``fetch_and_prepare`` is ``fetch_bytes`` then ``prepare_image``, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from io import BytesIO
from typing import Any, Final

import httpx
from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

from providers.base import PreparedImage
from schemas.image_profile import ImageProfile
from tasks.images.fetch import DEFAULT_MAX_FETCH_BYTES, ImageInputError, display_uri, fetch_bytes
from tasks.images.resize import (
    DRAFT_PROBE_CANDIDATES,
    PROBE_CANDIDATES,
    banded_resize,
    residual_filter,
)
from tasks.images.vips import VipsDeclined, fit_jpeg, fit_jpeg_pixels, vips_jpeg

__all__ = [
    "DEFAULT_ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "MIN_SOURCE_SIDE",
    "fetch_and_prepare",
    "image_profile_fits",
    "prepare_image",
]

DEFAULT_MAX_PIXELS: Final = 100_000_000
DEFAULT_ALLOWED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
# Below this a source image carries too little to be upscaled into a usable input.
MIN_SOURCE_SIDE: Final = 16

_MIME: Final = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Lossy fallbacks tried, in order, when the profile's quality overshoots the byte limit.
_FALLBACK_QUALITIES: Final = (85, 75, 65, 55)
_SCALE_STEP: Final = 0.8
_RESAMPLE: Final = Image.Resampling.LANCZOS
_REDUCING_GAP: Final = 2.0
_WHITE: Final = (255, 255, 255)
# Same table as ``ImageOps.exif_transpose``; applied by hand so it runs after the resize.
EXIF_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BOMB_PIXELS_RE: Final = re.compile(r"\((\d+) pixels\)")
# EXIF orientations that turn the image a quarter: width and height swap.
_SWAPS_SIDES: Final = frozenset({5, 6, 7, 8})


def prepare_image(
    data: bytes,
    *,
    profile: ImageProfile,
    source_uri: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: tuple[str, ...] = DEFAULT_ALLOWED_FORMATS,
) -> PreparedImage:
    """Decode ``data`` and fit it to ``profile``: upright, 8-bit sRGB, sized, under max_bytes.

    CPU-bound and synchronous: call it through ``asyncio.to_thread``.
    """
    shown = display_uri(source_uri)
    im = _open(data, shown, max_pixels, allowed_formats)
    width, height = im.size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageInputError(
            "DECOMPRESSION_BOMB",
            f"{shown}: {width}x{height} = {pixels} pixels exceeds max_pixels {max_pixels}; "
            f"refused before decoding",
        )
    # Scaling keeps the aspect ratio, so the target can be computed in stored orientation and
    # the EXIF transpose applied last, on the small image.
    target = _fit_size(width, height, profile=profile, shown=shown)
    jpeg = _vips_source(data, im, target)
    if jpeg is not None:
        fitted = _prepare_with_vips(jpeg, im, target, profile=profile, source_uri=source_uri)
        if fitted is not None:
            return fitted
    drafted = False
    if im.format in ("JPEG", "MPO") and target != im.size:
        # DCT-domain downscale by 1/2, 1/4 or 1/8, never below the target size.
        drafted = im.draft("RGB", target) is not None and im.size != (width, height)
    try:
        im.load()
        # After load: PNG's getexif() would otherwise decode before the bomb check above.
        orientation = _orientation(im)
        rgb = _to_rgb(im)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(shown, exc) from None
    except Exception as exc:  # Pillow raises many types on corrupt data
        raise ImageInputError(
            "DECODE_FAILED", f"{shown}: {im.format} data does not decode ({type(exc).__name__})"
        ) from None

    if rgb.size != target:
        residual = rgb.width / target[0]
        if 1 < residual < 2:
            # No reducing_gap step below 2x: the filter alone decides the result.
            candidates = DRAFT_PROBE_CANDIDATES if drafted else PROBE_CANDIDATES
            rgb = banded_resize(rgb, target, residual_filter(rgb, residual, candidates))
        else:
            rgb = banded_resize(rgb, target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if orientation in EXIF_TRANSPOSE:
        rgb = rgb.transpose(EXIF_TRANSPOSE[orientation])
    rgb.info = {}  # never carry EXIF/ICC/comments over
    return _encode_within_limit(rgb, profile=profile, source_uri=source_uri, shown=shown)


def _vips_source(data: bytes, im: Image.Image, target: tuple[int, int]) -> bytes | None:
    """What libvips is to decode, if it may prepare this image: a JPEG, 8-bit grey or RGB
    (untagged or sRGB), scaled down, of a frame type libjpeg decodes alike for Pillow and libvips
    (``vips_jpeg`` reads the header again, not trusting Pillow's alone). ``None``: Pillow."""
    if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L"):
        return None
    if target[0] >= im.width or target[1] >= im.height:
        return None
    icc = im.info.get("icc_profile")
    # Pillow's path ignores a grey image's profile and keeps an sRGB one: the same here.
    if icc and im.mode == "RGB" and not _is_srgb(icc):
        return None
    return vips_jpeg(data, im)


def _prepare_with_vips(
    jpeg: bytes,
    im: Image.Image,
    target: tuple[int, int],
    *,
    profile: ImageProfile,
    source_uri: str,
) -> PreparedImage | None:
    """The image fitted by libvips, or ``None``: Pillow's path then decides, as before."""
    orientation = _orientation(im)
    fmt = profile.formats[0]
    try:
        if fmt == "JPEG":
            blob = fit_jpeg(
                jpeg,
                size=im.size,
                target=target,
                orientation=orientation,
                quality=profile.jpeg_quality,
            )
            if profile.encoded_size(len(blob)) <= profile.max_bytes:
                upright = target[::-1] if orientation in _SWAPS_SIDES else target
                return _prepared(blob, fmt, (upright[0], upright[1]), source_uri)
        # Over the limit, or another format: the fitted pixels go through the usual fall-backs.
        rgb = fit_jpeg_pixels(jpeg, size=im.size, target=target, orientation=orientation)
    except VipsDeclined:
        return None
    shown = display_uri(source_uri)
    return _encode_within_limit(rgb, profile=profile, source_uri=source_uri, shown=shown)


def _open(
    data: bytes, shown: str, max_pixels: int, allowed_formats: tuple[str, ...]
) -> Image.Image:
    if not data:
        raise ImageInputError("DECODE_FAILED", f"{shown}: empty file")
    Image.init()
    allowed = [f.upper() for f in allowed_formats]
    # MPO has no opener of its own (the JPEG one returns it); unknown names would KeyError.
    openers = [f for f in allowed if f in Image.OPEN]
    try:
        im = Image.open(BytesIO(data), formats=openers)
        if im.format in allowed:
            return im
    except UnidentifiedImageError:
        pass
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (a warning too when warnings are errors): same verdict as ours.
        raise _bomb_error(shown, exc) from None
    except Exception as exc:
        # Exception texts can quote the file (PNG chunk names, TIFF tags): the type only.
        raise ImageInputError(
            "DECODE_FAILED", f"{shown}: unreadable header ({type(exc).__name__})"
        ) from None
    # Tell "not an image" from "an image in a format we refuse" by asking every plugin.
    found: str | None = None
    try:
        with Image.open(BytesIO(data)) as probe:
            found = probe.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        found = "an image"
    except Exception:
        found = None
    if found:
        raise ImageInputError(
            "FORMAT_NOT_ALLOWED",
            f"{shown}: format {found} is not allowed (allowed: {', '.join(allowed_formats)})",
        )
    # The size only: the first bytes of a local file are its content (a manifest may point at
    # any file the worker can read).
    raise ImageInputError("DECODE_FAILED", f"{shown}: not a recognisable image ({len(data)} bytes)")


def _bomb_error(shown: str, exc: Exception) -> ImageInputError:
    match = _BOMB_PIXELS_RE.search(str(exc))
    claim = f"{match.group(1)} pixels" if match else "too many pixels"
    return ImageInputError(
        "DECOMPRESSION_BOMB",
        f"{shown}: header claims {claim}, over Pillow's decompression-bomb limit; "
        f"refused before decoding",
    )


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF must not sink an otherwise good image
        return 1
    return value if isinstance(value, int) and value in EXIF_TRANSPOSE else 1


def _fit_size(width: int, height: int, *, profile: ImageProfile, shown: str) -> tuple[int, int]:
    """Target size keeping aspect: longest side <= max_side, shortest side >= min_side."""
    short, long = min(width, height), max(width, height)
    if short < profile.min_side and short < MIN_SOURCE_SIDE:
        raise ImageInputError(
            "TOO_SMALL",
            f"{shown}: image is {width}x{height} px; its short side {short} px is under "
            f"{MIN_SOURCE_SIDE} px, too small to upscale to min_side {profile.min_side} "
            f"(profile {profile.name})",
        )
    # Integer form of long/short > max_side/min_side: no scale satisfies both bounds.
    if long * profile.min_side > short * profile.max_side:
        raise ImageInputError(
            "ASPECT_RATIO",
            f"{shown}: image is {width}x{height} px (aspect {long / short:.2f}:1); with the long "
            f"side at most max_side {profile.max_side} the short side would be "
            f"{short * profile.max_side / long:.0f} < min_side {profile.min_side} "
            f"(profile {profile.name})",
        )
    if long > profile.max_side:
        scale = profile.max_side / long
    elif short < profile.min_side:
        scale = profile.min_side / short
    else:
        return width, height
    # The inequality above guarantees rounding keeps both bounds; max() guards 1-px sides.
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha onto white, 16/32-bit rescaled, ICC -> sRGB."""
    mode = im.mode
    if mode in ("RGB", "CMYK") and "transparency" not in im.info:
        icc = im.info.get("icc_profile")
        if icc:
            converted = _icc_to_srgb(im, icc)
            if converted is not None:
                return converted
        # Pillow already un-inverts Adobe CMYK JPEGs, so the plain conversion is right.
        return im if mode == "RGB" else im.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(im).convert("RGB")
    if mode in ("1", "L") and "transparency" not in im.info:
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa", "P", "RGB", "L", "1"):
        rgba = im.convert("RGBA")  # honours palette/colour-key transparency
        if rgba.getextrema()[3][0] == 255:  # fully opaque: skip the composite
            return rgba.convert("RGB")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")  # YCbCr, LAB, HSV...


def _is_srgb(icc: bytes) -> bool:
    """Whether an embedded profile calls itself sRGB (its description, as ``_icc_to_srgb``)."""
    try:
        source = ImageCms.ImageCmsProfile(BytesIO(icc))
        return "srgb" in ImageCms.getProfileDescription(source).lower()
    except Exception:
        return False


def _icc_to_srgb(im: Image.Image, icc: bytes) -> Image.Image | None:
    """Convert via the embedded profile; ``None`` (plain conversion) if the profile is unusable."""
    try:
        source = ImageCms.ImageCmsProfile(BytesIO(icc))
        if im.mode == "RGB" and "srgb" in ImageCms.getProfileDescription(source).lower():
            return im  # already sRGB: the transform would be a costly no-op
        return ImageCms.profileToProfile(
            im, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except Exception:
        return None


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit or 32-bit grey -> 8-bit "L" by scaling (a plain convert would clip at 255)."""
    if im.mode.startswith("I;16"):
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    low, high = im.getextrema()
    if im.mode == "I" and low >= 0 and high <= 65535:
        return im.point(lambda v: v * (1 / 256)).convert("L")
    if im.mode == "F" and low >= 0 and high <= 1.0:
        return im.point(lambda v: v * 255).convert("L")
    span = (high - low) or 1
    return im.point(lambda v: (v - low) * (255 / span)).convert("L")


def _encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = BytesIO()
    if fmt == "JPEG":
        im.save(buffer, "JPEG", quality=quality, optimize=False)
    elif fmt == "WEBP":
        im.save(buffer, "WEBP", quality=quality, method=4)
    else:
        im.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def _encode_within_limit(
    im: Image.Image, *, profile: ImageProfile, source_uri: str, shown: str
) -> PreparedImage:
    fmt = profile.formats[0]
    qualities = [profile.jpeg_quality]
    if fmt != "PNG":
        qualities += [q for q in _FALLBACK_QUALITIES if q < profile.jpeg_quality]

    def measured(blob: bytes) -> int:
        return profile.encoded_size(len(blob))

    for quality in qualities:
        blob = _encode(im, fmt, quality)
        if measured(blob) <= profile.max_bytes:
            return _prepared(blob, fmt, im.size, source_uri)

    # Still too big at the lowest quality: shrink (always from the fitted image, not the
    # previous step, so blur does not compound) while the short side stays >= min_side.
    quality = qualities[-1]
    width, height = im.size
    min_scale = profile.min_side / min(width, height)
    scale = 1.0
    while scale > min_scale:
        # Size roughly tracks pixel count: jump near the goal, but at least one 0.8 step.
        ratio = math.sqrt(profile.max_bytes / measured(blob)) * 0.95
        scale = max(min_scale, scale * min(_SCALE_STEP, max(ratio, 0.25)))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        blob = _encode(banded_resize(im, size, _RESAMPLE, reducing_gap=_REDUCING_GAP), fmt, quality)
        if measured(blob) <= profile.max_bytes:
            return _prepared(blob, fmt, size, source_uri)
    encoding = fmt if fmt == "PNG" else f"{fmt} quality {quality}"
    raise ImageInputError(
        "CANNOT_FIT_BYTES",
        f"{shown}: smallest encoding ({encoding} at short side "
        f"{profile.min_side} px) measures {measured(blob)} bytes > max_bytes "
        f"{profile.max_bytes} (profile {profile.name})",
    )


def _prepared(blob: bytes, fmt: str, size: tuple[int, int], source_uri: str) -> PreparedImage:
    return PreparedImage(
        data=blob,
        mime=_MIME[fmt],
        width=size[0],
        height=size[1],
        sha256=hashlib.sha256(blob).hexdigest(),
        source_uri=source_uri,
    )


def image_profile_fits(img_bytes: bytes, profile: ImageProfile) -> bool:
    """Whether already-encoded bytes satisfy ``profile`` as they are (format, sides, size)."""
    if profile.encoded_size(len(img_bytes)) > profile.max_bytes:
        return False
    try:
        with Image.open(BytesIO(img_bytes), formats=profile.formats) as im:
            short, long = min(im.size), max(im.size)
    except Exception:
        return False
    return profile.min_side <= short and long <= profile.max_side


async def fetch_and_prepare(
    uri: str,
    *,
    http: httpx.AsyncClient,
    profile: ImageProfile,
    storage_options: dict[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Fetch ``uri`` and prepare it for ``profile`` without blocking the event loop."""
    data = await fetch_bytes(uri, http=http, max_bytes=max_bytes, storage_options=storage_options)
    return await asyncio.to_thread(
        prepare_image, data, profile=profile, source_uri=uri, max_pixels=max_pixels
    )
