"""libvips for the case where it beats Pillow here: 8-bit JPEGs scaled down. Prefect-free.

``fit_jpeg`` decodes a JPEG with shrink-on-load (libjpeg's DCT scaling at 1/2^n, as Pillow's
draft), resizes it (LANCZOS3, within 2 levels of Pillow's LANCZOS) on libvips' threads, turns it
upright and encodes it while it is still being decoded: the full-size image is never held in
memory, and no stage waits for the one before to finish. ``fit_jpeg_pixels`` stops before the
encoding and hands the fitted pixels to Pillow.

libvips only ever sees what ``vips_jpeg`` lets through: a file Pillow has already opened as a
JPEG, whose frame is one libjpeg decodes alike for both (baseline, extended or progressive,
8-bit, grey or 3-channel), reduced to the segments decoding reads (no EXIF, ICC, comments or
other application data reach libvips' parsers). It goes to the JPEG loader called by name (no
format sniffing), with untrusted loaders blocked and the operation cache off. Any libjpeg
warning is an error here (``fail_on="warning"``): the caller then goes the Pillow way, whose
verdict on odd or damaged files stays the one that counts.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from PIL import Image

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "JpegFrame",
    "VipsDeclined",
    "fit_jpeg",
    "fit_jpeg_pixels",
    "jpeg_frame",
    "vips",
    "vips_jpeg",
]

# Frame types libjpeg decodes the same way for Pillow and libvips: baseline, extended
# sequential and progressive Huffman (SOF0-2). Lossless, hierarchical and arithmetic-coded
# frames stay with Pillow.
_SOF_TAKEN: Final = frozenset({0xC0, 0xC1, 0xC2})
_SOF_ANY: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Segments before the scan that decoding does not read: APP1-APP13 and APP15 (EXIF, XMP, ICC,
# MPF, IPTC...) and comments. APP0 (JFIF) and APP14 (Adobe) are kept: libjpeg reads its
# colour space from them.
_METADATA: Final = frozenset({*range(0xE1, 0xEE), 0xEF, 0xFE})
# Markers without a length field (TEM, RSTn); everything else before the scan has one.
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS: Final = 0xDA
# Pillow's draft scales, largest first: libjpeg scales by 1/1, 1/2, 1/4 or 1/8 in the DCT.
_SHRINKS: Final = (8, 4, 2, 1)
# libvips worker threads per pipeline. Its default is one per core; more than 2 did not lower
# the wall time on this 2-core machine (bench/README.md), and the flow already prepares images
# side by side. ``VIPS_CONCURRENCY`` in the environment still wins.
_CONCURRENCY: Final = max(1, min(2, os.cpu_count() or 1))
# Pillow's Transpose for each EXIF orientation (``prepare.EXIF_TRANSPOSE``) as libvips calls.
_ORIENT: Final[dict[int, tuple[str, ...]]] = {
    2: ("fliphor",),
    3: ("rot180",),
    4: ("flipver",),
    5: ("rot90", "fliphor"),  # TRANSPOSE
    6: ("rot90",),  # ROTATE_270 (a quarter clockwise)
    7: ("rot270", "fliphor"),  # TRANSVERSE
    8: ("rot270",),  # ROTATE_90 (a quarter anticlockwise)
}


class VipsDeclined(RuntimeError):
    """libvips did not fit this image (not loadable, a libjpeg warning, another header...).

    The caller prepares it with Pillow instead. The message never quotes the data.
    """


_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def vips() -> ModuleType:
    """pyvips, configured once: untrusted loaders blocked, no operation cache, bounded threads."""
    global _module, _failed
    with _lock:
        if _module is None:
            if _failed:
                raise VipsDeclined("pyvips did not load")
            try:
                import pyvips

                # Loaders libvips itself marks unfit for untrusted input (ImageMagick, MATLAB,
                # CSV...) must never run, whatever a future caller passes.
                pyvips.block_untrusted_set(True)
                # Nothing here is computed twice, and the cache would keep sources referenced:
                # off, so memory stays flat over a long run.
                pyvips.cache_set_max(0)
                pyvips.cache_set_max_mem(0)
                pyvips.cache_set_max_files(0)
                if not os.environ.get("VIPS_CONCURRENCY"):
                    pyvips.concurrency_set(_CONCURRENCY)
            except Exception as exc:  # no pyvips, no libvips, or one too old to be configured
                _failed = True
                raise VipsDeclined(f"pyvips did not load ({type(exc).__name__})") from None
            _module = pyvips
        return _module


class JpegFrame(NamedTuple):
    """A JPEG's frame header (SOFn), and the file reduced to what decoding reads."""

    marker: int
    precision: int
    width: int
    height: int
    components: int
    decodable: bytes  # SOI, the header segments but metadata, then the scans as they are


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame of a JPEG, read from its header segments; ``None`` if they do not parse."""
    if data[:2] != b"\xff\xd8":
        return None
    kept = [b"\xff\xd8"]
    frame: tuple[int, ...] | None = None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):  # SOI again, or EOI before any scan
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        if marker == _SOS:
            if frame is None:
                return None
            # A view of the scans: one copy of the file, not two.
            scans = memoryview(data)[pos:]
            return JpegFrame(*frame, decodable=b"".join([*kept, scans]))
        if marker in _SOF_ANY:
            if frame is not None or length < 8:
                return None
            body = data[pos + 4 : pos + 2 + length]
            height = int.from_bytes(body[1:3], "big")
            width = int.from_bytes(body[3:5], "big")
            frame = (marker, body[0], width, height, body[5])
        if marker not in _METADATA:
            kept.append(data[pos : pos + 2 + length])
        pos += 2 + length
    return None


def vips_jpeg(data: bytes, im: Image.Image) -> bytes | None:
    """What libvips may decode of a JPEG Pillow opened (not yet loaded); ``None``: not for it."""
    frame = jpeg_frame(data)
    if frame is None:
        return None
    taken = (
        frame.marker in _SOF_TAKEN
        and frame.precision == 8
        and (frame.width, frame.height) == im.size
        and (frame.components, im.mode) in ((3, "RGB"), (1, "L"))
    )
    return frame.decodable if taken else None


def draft_shrink(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The DCT scale Pillow's ``draft`` would pick: the largest 1/2^n keeping both sides."""
    scale = min(size[0] // target[0], size[1] // target[1])
    return next(s for s in _SHRINKS if scale >= s)


def fit_jpeg(
    jpeg: bytes,
    *,
    size: tuple[int, int],
    target: tuple[int, int],
    orientation: int,
    quality: int,
) -> bytes:
    """``jpeg`` (from ``vips_jpeg``) scaled to ``target`` (stored orientation), turned upright
    and encoded at ``quality``: 4:2:0, no metadata, as Pillow encodes the same pixels (the same
    coded data, without its JFIF segment).

    Raises ``VipsDeclined`` on any libjpeg warning or error, or if libvips does not see the
    header Pillow saw.
    """
    pyvips = vips()
    try:
        image = _fitted(pyvips, jpeg, size, target, orientation)
        blob: bytes = image.jpegsave_buffer(
            Q=quality, optimize_coding=False, subsample_mode="on", keep="none"
        )
    except pyvips.Error as exc:
        raise _declined(exc) from None
    return blob


def fit_jpeg_pixels(
    jpeg: bytes, *, size: tuple[int, int], target: tuple[int, int], orientation: int
) -> Image.Image:
    """As ``fit_jpeg``, but the fitted pixels, as a Pillow RGB image."""
    pyvips = vips()
    try:
        image = _fitted(pyvips, jpeg, size, target, orientation)
        buffer = image.write_to_memory()
    except pyvips.Error as exc:
        raise _declined(exc) from None
    return Image.frombytes("RGB", (image.width, image.height), buffer)


def _declined(exc: Exception) -> VipsDeclined:
    # libvips' text can quote the data (marker bytes, strings from the file): the type only.
    return VipsDeclined(f"libvips refused the data ({type(exc).__name__})")


def _fitted(
    pyvips: Any,
    jpeg: bytes,
    size: tuple[int, int],
    target: tuple[int, int],
    orientation: int,
) -> Any:
    """The lazy pipeline: load (shrunk on load), resize, turn, as 3-band sRGB."""
    shrink = draft_shrink(size, target)
    image = pyvips.Image.jpegload_buffer(
        jpeg, shrink=shrink, fail_on="warning", access="sequential"
    )
    loaded = (-(-size[0] // shrink), -(-size[1] // shrink))
    if (image.width, image.height) != loaded or image.format != "uchar":
        raise VipsDeclined("libvips read another header")
    if image.bands not in (1, 3):
        raise VipsDeclined("libvips read another channel count")
    if loaded != target:
        # Scale factors from the exact sizes: libvips rounds each side * scale to the target.
        image = image.resize(target[0] / loaded[0], vscale=target[1] / loaded[1], kernel="lanczos3")
        if (image.width, image.height) != target:
            raise VipsDeclined("libvips resized to another size")
    if orientation in _ORIENT:
        # Rotations and vertical flips read out of order: hold the fitted (small) image first.
        image = image.copy_memory()
        for step in _ORIENT[orientation]:
            image = getattr(image, step)()
    if image.bands == 1:
        # Grey in, RGB out, as Pillow's path converts before resizing (same pixels per band).
        image = image.bandjoin([image, image]).copy(interpretation="srgb")
    return image
