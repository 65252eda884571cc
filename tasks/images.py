"""Fetch input images from anywhere and fit them to a provider's ``ImageProfile``. Prefect-free.

``fetch_bytes`` reads ``data:`` URIs, http(s) through an injected ``httpx.AsyncClient``, local
paths, ``file://``, ``s3://`` and ``memory://`` (the closed list of ``schemas.uris``; anything
else, chained fsspec URLs included, is refused), always with a byte cap.
``prepare_image`` decodes (refusing decompression bombs from the header alone), makes the image
upright, flattens it to 8-bit sRGB, fits it to the profile and re-encodes it under the byte limit.
``PreparedImageCache`` prepares each distinct (uri, profile) once per run, however many rows and
coroutines ask for it.

Every failure is an ``ImageInputError`` with a stable ``code`` and a ``transient`` flag.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import math
import os
import re
import threading
import urllib.parse
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any, Final

import fsspec
import httpx
from fsspec.spec import AbstractFileSystem
from PIL import ExifTags, Image, ImageChops, ImageCms, ImageStat, UnidentifiedImageError

from providers.base import PreparedImage
from schemas.limits import ImageProfile
from schemas.results import ErrorKind
from schemas.uris import ImageRoute, Refusal, classify_image_ref
from tasks.fetch_guard import BLOCKED_CODE, FetchBlockedError

__all__ = [
    "DEFAULT_ALLOWED_FORMATS",
    "DEFAULT_MAX_FETCH_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MIN_SOURCE_SIDE",
    "ImageInputError",
    "PreparedImageCache",
    "display_uri",
    "fetch_and_prepare",
    "fetch_bytes",
    "image_profile_fits",
    "prepare_image",
]

DEFAULT_MAX_FETCH_BYTES: Final = 50 * 1024 * 1024
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
# A residual (< 2x) downscale, after a JPEG draft (whose DCT scaling has already band-limited
# the image) or not, can often use HAMMING (~2x cheaper than LANCZOS).
# Dense fine texture and sensor noise still come out visibly different with them, so a few
# crops are resized each way first and LANCZOS is kept unless one agrees within this RMS
# (8-bit levels).
_PROBE_SIDE: Final = 192
_PROBE_MAX_RMS: Final = 1.0
_PROBE_AT: Final = ((0.5, 0.5), (0.2, 0.2), (0.8, 0.2), (0.2, 0.8), (0.8, 0.8))
# Cheaper filters the probe may pick instead of LANCZOS, cheapest first. BICUBIC (~1.5x cheaper
# than LANCZOS) only after a draft: on noisy full-resolution photos it passes the probe too, but
# its JPEG output measured down to SSIM 0.9715 vs naive LANCZOS, too close to the 0.97 bar
# (after a draft: >= 0.976, where exact LANCZOS gives 0.98).
_PROBE_CANDIDATES: Final = (Image.Resampling.HAMMING,)
_DRAFT_PROBE_CANDIDATES: Final = (Image.Resampling.HAMMING, Image.Resampling.BICUBIC)
# Large resizes are split into bands resized on a small shared pool (Pillow releases the GIL
# while resampling); below this many output pixels the thread hand-off costs more than it saves.
_BAND_MIN_PIXELS: Final = 1_000_000
_BAND_WORKERS: Final = max(1, min(8, os.cpu_count() or 1))
# Continuous filters only: a band's tap positions can differ from the whole resize's in the last
# bit, which moves these weights by ~1e-16 but can flip a tap of BOX's hard edge.
_BAND_FILTERS: Final = frozenset(
    {
        Image.Resampling.BILINEAR,
        Image.Resampling.HAMMING,
        Image.Resampling.BICUBIC,
        Image.Resampling.LANCZOS,
    }
)
_WHITE: Final = (255, 255, 255)
# Same table as ``ImageOps.exif_transpose``; applied by hand so it runs after the resize.
_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES: Final = frozenset({5, 6, 7, 8})
_SCHEME_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BOMB_PIXELS_RE: Final = re.compile(r"\((\d+) pixels\)")
_STREAM_CHUNK: Final = 64 * 1024
_URLSAFE_B64: Final = str.maketrans("-_", "+/")
_INLINE_DECODE_LIMIT: Final = 256 * 1024


class ImageInputError(Exception):
    """An input image that could not be fetched or prepared.

    ``code`` is stable and machine-readable; ``message`` names the (redacted) URI and the limit;
    ``transient`` says whether retrying the same input could succeed.
    """

    def __init__(self, code: str, message: str, *, transient: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.transient = transient

    @property
    def kind(self) -> ErrorKind:
        return ErrorKind.TRANSIENT if self.transient else ErrorKind.PERMANENT

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only ``transient`` breaks Exception's default pickling (Prefect pickles errors).
        return (_rebuild_error, (self.code, self.message, self.transient))


def _rebuild_error(code: str, message: str, transient: bool) -> ImageInputError:
    return ImageInputError(code, message, transient=transient)


def display_uri(uri: str, *, limit: int = 200) -> str:
    """``uri`` safe for messages and logs: no credentials, no query string, no inline data."""
    if uri[:5].lower() == "data:":
        header = uri[5:].split(",", 1)[0][:64]
        return f"data:{header},...({len(uri)} chars)"
    match = _SCHEME_RE.match(uri)
    if match:
        try:
            parts = urllib.parse.urlsplit(uri)
        except ValueError:
            return f"{match.group(1)}://...({len(uri)} chars)"
        netloc = parts.netloc
        if "@" in netloc:  # user:password@host
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        # Query strings carry presigned-URL signatures and tokens.
        shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        if parts.query:
            shown += "?..."
    else:
        shown = uri
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# --------------------------------------------------------------------------------------- fetch


async def fetch_bytes(
    uri: str,
    *,
    http: httpx.AsyncClient,
    max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
    storage_options: dict[str, Any] | None = None,
) -> bytes:
    """Read the raw bytes behind ``uri``, never more than ``max_bytes``.

    ``uri`` goes to the one reader ``classify_image_ref`` routes it to: http(s) only through
    ``http`` (the guarded client), files through one explicitly chosen filesystem, never through
    fsspec's URL parsing (which would follow ``proto::url`` chains). A refused reference fails
    with UNSUPPORTED_SCHEME before any IO. ``storage_options`` configure ``s3://`` only.
    """
    if not uri or not uri.strip():
        raise ImageInputError("BAD_URI", "empty image URI")
    verdict = classify_image_ref(uri)
    if isinstance(verdict, Refusal):
        # The reason names the scheme only: the URL itself may carry credentials.
        raise ImageInputError("UNSUPPORTED_SCHEME", verdict.reason)
    if verdict.route == "data":
        if len(uri) > _INLINE_DECODE_LIMIT:  # decoding megabytes of base64 would stall the loop
            return await asyncio.to_thread(_decode_data_uri, uri, max_bytes)
        return _decode_data_uri(uri, max_bytes)
    if verdict.route == "http":
        return await _fetch_http(uri, http=http, max_bytes=max_bytes)
    return await asyncio.to_thread(
        _read_filesystem, verdict, display_uri(uri), max_bytes, dict(storage_options or {})
    )


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    shown = display_uri(uri)
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageInputError("BAD_DATA_URI", f"{shown}: no ',' separating header and data")
    # Cheap bound before decoding: no encoding inflates by more than 3x (percent-encoding).
    if len(payload) > 3 * max_bytes + 16:
        raise ImageInputError("FETCH_TOO_LARGE", f"{shown}: exceeds max_bytes {max_bytes}")
    if "base64" in (p.strip().lower() for p in header.split(";")[1:]):
        text = re.sub(r"\s+", "", urllib.parse.unquote(payload))
        text = text.translate(_URLSAFE_B64) + "=" * (-len(text) % 4)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError("BAD_DATA_URI", f"{shown}: invalid base64 payload") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ImageInputError("BAD_DATA_URI", f"{shown}: empty payload")
    if len(data) > max_bytes:
        raise ImageInputError(
            "FETCH_TOO_LARGE", f"{shown}: {len(data)} bytes exceeds max_bytes {max_bytes}"
        )
    return data


async def _fetch_http(uri: str, *, http: httpx.AsyncClient, max_bytes: int) -> bytes:
    shown = display_uri(uri)
    try:
        # Image hosts and presigned storage URLs redirect routinely.
        async with http.stream("GET", uri, follow_redirects=True) as response:
            status = response.status_code
            if status in (404, 410):
                raise ImageInputError("FETCH_NOT_FOUND", f"{shown}: HTTP {status}")
            if status in (408, 429) or status >= 500:
                raise ImageInputError(
                    f"FETCH_HTTP_{status}", f"{shown}: HTTP {status}", transient=True
                )
            if not 200 <= status < 300:
                raise ImageInputError(f"FETCH_HTTP_{status}", f"{shown}: HTTP {status}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageInputError(
                    "FETCH_TOO_LARGE",
                    f"{shown}: Content-Length {declared} exceeds max_bytes {max_bytes}",
                )
            buffer = bytearray()
            async for chunk in response.aiter_bytes(_STREAM_CHUNK):
                buffer += chunk
                if len(buffer) > max_bytes:
                    # Leaving the ``async with`` closes the connection: the rest is never read.
                    raise ImageInputError(
                        "FETCH_TOO_LARGE",
                        f"{shown}: body exceeds max_bytes {max_bytes} (aborted after "
                        f"{len(buffer)} bytes)",
                    )
            return bytes(buffer)
    except FetchBlockedError as exc:
        # The host only: the path and query of an internal URL are nobody's business.
        raise ImageInputError(BLOCKED_CODE, f"{exc}: refused (see fetch_allow)") from None
    except httpx.TimeoutException as exc:
        raise ImageInputError(
            "FETCH_TIMEOUT", f"{shown}: timed out ({type(exc).__name__})", transient=True
        ) from None
    except httpx.UnsupportedProtocol as exc:
        # The first URL is http(s): a redirect led elsewhere (file://, ftp://...).
        raise ImageInputError("FETCH_BAD_REDIRECT", f"{shown}: {exc}") from None
    except httpx.TransportError as exc:
        raise ImageInputError(
            "FETCH_CONNECTION", f"{shown}: connection failed ({type(exc).__name__})", transient=True
        ) from None
    except httpx.TooManyRedirects:
        raise ImageInputError("FETCH_REDIRECTS", f"{shown}: too many redirects") from None
    except httpx.DecodingError as exc:
        raise ImageInputError(
            "FETCH_DECODING", f"{shown}: undecodable response body ({type(exc).__name__})"
        ) from None
    except httpx.InvalidURL:
        raise ImageInputError("BAD_URI", f"{shown}: invalid URL") from None


def _filesystem(route: ImageRoute, storage_options: dict[str, Any]) -> AbstractFileSystem:
    """The one filesystem for an allowed non-HTTP route, chosen here, never from the URL."""
    if route.route == "s3":
        # The endpoint and credentials come from the run's configuration, not the manifest.
        return fsspec.filesystem("s3", **storage_options)
    if route.route == "memory":
        return fsspec.filesystem("memory")
    return fsspec.filesystem("file")


def _read_filesystem(
    route: ImageRoute, shown: str, max_bytes: int, storage_options: dict[str, Any]
) -> bytes:
    """Blocking filesystem read, run in a worker thread."""
    try:
        fs = _filesystem(route, storage_options)
        path = route.target
        try:
            info = fs.info(path)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception:  # some filesystems cannot stat; the capped read still protects us
            info = {}
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        size = info.get("size")
        if isinstance(size, int) and size > max_bytes:
            raise ImageInputError(
                "FETCH_TOO_LARGE", f"{shown}: {size} bytes exceeds max_bytes {max_bytes}"
            )
        with fs.open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except ImageInputError:
        raise
    except FileNotFoundError:
        raise ImageInputError("FETCH_NOT_FOUND", f"{shown}: no such file") from None
    except IsADirectoryError:
        raise ImageInputError("FETCH_NOT_A_FILE", f"{shown}: is a directory") from None
    except PermissionError:
        raise ImageInputError("FETCH_FORBIDDEN", f"{shown}: permission denied") from None
    except ImportError as exc:
        # s3:// without s3fs installed; fsspec's message names the missing package.
        raise ImageInputError("UNSUPPORTED_SCHEME", f"{shown}: {exc}") from None
    except (TimeoutError, ConnectionError) as exc:
        raise ImageInputError(
            "FETCH_CONNECTION", f"{shown}: {type(exc).__name__}", transient=True
        ) from None
    except OSError as exc:
        # Remote filesystems surface throttling and 5xx as bare OSError: worth a retry.
        raise ImageInputError(
            "FETCH_IO", f"{shown}: {type(exc).__name__}: {exc.strerror or ''}", transient=True
        ) from None
    except Exception as exc:
        raise ImageInputError("FETCH_FAILED", f"{shown}: {type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise ImageInputError("FETCH_TOO_LARGE", f"{shown}: exceeds max_bytes {max_bytes}")
    return data


# ------------------------------------------------------------------------------------- prepare


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
            candidates = _DRAFT_PROBE_CANDIDATES if drafted else _PROBE_CANDIDATES
            rgb = _resize(rgb, target, _residual_filter(rgb, residual, candidates))
        else:
            rgb = _resize(rgb, target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    rgb.info = {}  # never carry EXIF/ICC/comments over
    return _encode_within_limit(rgb, profile=profile, source_uri=source_uri, shown=shown)


def _residual_filter(
    im: Image.Image,
    ratio: float,
    candidates: tuple[Image.Resampling, ...] = _PROBE_CANDIDATES,
) -> Image.Resampling:
    """The cheapest filter that sample crops show indistinguishable from LANCZOS at ``ratio``.

    Tries ``candidates`` in order: one is kept only if, on every crop, its result is
    within ``_PROBE_MAX_RMS`` (8-bit levels, per channel) of LANCZOS's; otherwise LANCZOS.
    """
    side = _PROBE_SIDE
    if min(im.size) < 2 * side:  # small images: LANCZOS is cheap anyway
        return Image.Resampling.LANCZOS
    small = (round(side / ratio),) * 2

    def agreeing(at: tuple[float, float]) -> list[bool]:
        """Per candidate: does it match LANCZOS on the crop at ``at``?"""
        x, y = round((im.width - side) * at[0]), round((im.height - side) * at[1])
        crop = im.crop((x, y, x + side, y + side))
        exact = crop.resize(small, Image.Resampling.LANCZOS)
        return [
            max(ImageStat.Stat(ImageChops.difference(crop.resize(small, cheap), exact)).rms)
            <= _PROBE_MAX_RMS
            for cheap in candidates
        ]

    im.load()
    # Resizing releases the GIL: half the crops go to the band pool, if there is one.
    spread = _BAND_WORKERS > 1
    jobs = [_band_executor().submit(agreeing, at) for at in _PROBE_AT[1::2]] if spread else []
    votes = [agreeing(at) for at in (_PROBE_AT[::2] if spread else _PROBE_AT)]
    votes += [job.result() for job in jobs]
    for index, candidate in enumerate(candidates):
        if all(vote[index] for vote in votes):
            return candidate
    return Image.Resampling.LANCZOS


_band_pool: ThreadPoolExecutor | None = None
_band_pool_pid = 0
_band_pool_lock = threading.Lock()


def _band_executor() -> ThreadPoolExecutor:
    """The shared resize pool (``_BAND_WORKERS - 1`` threads: the caller resizes a band too)."""
    global _band_pool, _band_pool_pid
    with _band_pool_lock:
        # A forked child inherits the pool object but none of its threads: start a new one.
        if _band_pool is None or _band_pool_pid != os.getpid():
            _band_pool = ThreadPoolExecutor(
                max(1, _BAND_WORKERS - 1), thread_name_prefix="image-resize"
            )
            _band_pool_pid = os.getpid()
        return _band_pool


def _horizontal_first(src: tuple[int, int], out: tuple[int, int]) -> bool:
    """Pillow 13's choice of pass order for a resize of ``src`` to ``out`` (Resample.c).

    Bands must run their two passes in the whole resize's order (the 8-bit intermediate differs
    otherwise). Older Pillow always goes horizontal first, where this check is merely cautious.
    """
    shrink_y = src[1] - out[1]
    return not (shrink_y > 0 and shrink_y > (src[0] - out[0]) * 2)


def _band_edges(src_len: int, out_len: int, parts: int) -> list[int] | None:
    """Output cut points at which the source coordinate is an integer, about ``parts`` bands.

    Only there does a band's box keep exactly the full resize's scale (Pillow takes the box
    as float32 and derives the scale from it), so the bands reproduce it pixel for pixel.
    """
    unit = out_len // math.gcd(src_len, out_len)
    edges = [0]
    for i in range(1, parts):
        edge = round(out_len * i / parts / unit) * unit
        if edges[-1] < edge < out_len:
            edges.append(edge)
    edges.append(out_len)
    if len(edges) < 3 or max(b - a for a, b in itertools.pairwise(edges)) > 0.75 * out_len:
        return None
    return edges


_Band = tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]


def _band_boxes(src: tuple[int, int], out: tuple[int, int]) -> list[_Band] | None:
    """(offset, size, source box) per band: rows or columns, whichever splits more evenly."""
    (sw, sh), (w, h) = src, out
    order = _horizontal_first(src, out)
    splits: list[tuple[float, list[_Band]]] = []
    rows = _band_edges(sh, h, _BAND_WORKERS)
    if rows is not None and all(
        _horizontal_first(src, (w, b - a)) == order for a, b in itertools.pairwise(rows)
    ):
        bands = [
            ((0, a), (w, b - a), (0, a * sh // h, sw, b * sh // h))
            for a, b in itertools.pairwise(rows)
        ]
        splits.append((max(b - a for a, b in itertools.pairwise(rows)) / h, bands))
    cols = _band_edges(sw, w, _BAND_WORKERS)
    if cols is not None and all(
        _horizontal_first(src, (b - a, h)) == order for a, b in itertools.pairwise(cols)
    ):
        bands = [
            ((a, 0), (b - a, h), (a * sw // w, 0, b * sw // w, sh))
            for a, b in itertools.pairwise(cols)
        ]
        splits.append((max(b - a for a, b in itertools.pairwise(cols)) / w, bands))
    # The largest band sets the wall time; rows win ties (contiguous memory).
    return min(splits, key=lambda split: split[0])[1] if splits else None


def _resize(
    im: Image.Image,
    size: tuple[int, int],
    resample: Image.Resampling,
    *,
    reducing_gap: float | None = None,
) -> Image.Image:
    """``im.resize(size, resample, reducing_gap=...)``, in parallel bands when that pays.

    Each band is resized from its own source box on a worker thread (Pillow drops the GIL while
    resampling) and the bands are pasted together. Cut points are chosen so every band has the
    whole resize's coefficients and pass order, so the result is the same pixels as one call.
    """
    w, h = size
    if (
        _BAND_WORKERS < 2
        or w * h < _BAND_MIN_PIXELS
        or resample not in _BAND_FILTERS
        or im.mode not in ("RGB", "L")
        or w > im.width
        or h > im.height
        or max(im.size) > 1 << 24  # float32 box coordinates must stay exact
        or (
            reducing_gap is not None
            and (int(im.width / w / reducing_gap) > 1 or int(im.height / h / reducing_gap) > 1)
        )
    ):
        return im.resize(size, resample, reducing_gap=reducing_gap)
    bands = _band_boxes(im.size, size)
    if bands is None:
        return im.resize(size, resample, reducing_gap=reducing_gap)
    im.load()
    pool = _band_executor()
    jobs = [pool.submit(im.resize, part, resample, box) for _, part, box in bands[1:]]
    # Not initialised (color None): the bands cover every pixel, and filling a canvas this
    # size first would cost a tenth of the whole preparation.
    out = Image.new(im.mode, size, None)
    out.paste(im.resize(bands[0][1], resample, bands[0][2]), bands[0][0])
    for (offset, _, _), job in zip(bands[1:], jobs, strict=True):
        out.paste(job.result(), offset)
    return out


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
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


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
        blob = _encode(_resize(im, size, _RESAMPLE, reducing_gap=_REDUCING_GAP), fmt, quality)
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


# --------------------------------------------------------------------------------------- cache

_Key = tuple[str, ImageProfile]


class PreparedImageCache:
    """Single-flight, byte-bounded LRU of prepared images keyed by (uri, profile).

    Concurrent requests for one key share a single fetch+prepare. Permanent ``ImageInputError``s
    are remembered (a broken image stays broken for the run); transient ones are not, so a retry
    fetches again. The whole profile is part of the key, so a per-run override of a profile
    that keeps its name never reuses images fitted to the old limits.
    """

    def __init__(
        self,
        max_bytes: int = 512 * 1024 * 1024,
        *,
        max_failures: int = 10_000,
        fetch_max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_failures = max_failures
        self.fetch_max_bytes = fetch_max_bytes
        self.max_pixels = max_pixels
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[_Key, PreparedImage] = OrderedDict()
        self._failures: OrderedDict[_Key, ImageInputError] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[PreparedImage]] = {}
        self._size = 0
        # Bookkeeping only (never held across an await): guards callers on other threads.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Total encoded bytes currently held."""
        return self._size

    async def get(
        self,
        uri: str,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile,
        storage_options: dict[str, Any] | None = None,
    ) -> PreparedImage:
        """The prepared image for (uri, profile), fetching and preparing it at most once."""
        key: _Key = (uri, profile)
        loop = asyncio.get_running_loop()
        with self._lock:
            image = self._entries.get(key)
            if image is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return image
            failure = self._failures.get(key)
            if failure is not None:
                self.hits += 1
                raise ImageInputError(failure.code, failure.message, transient=False)
            task = self._inflight.get(key)
            if task is not None and task.get_loop() is loop:
                self.hits += 1
            else:
                # A task from another event loop cannot be awaited here: load independently.
                self.misses += 1
                task = loop.create_task(self._load(key, uri, http, profile, storage_options))
                task.add_done_callback(_consume_exception)
                self._inflight[key] = task
        # shield: one caller being cancelled must not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(
        self,
        key: _Key,
        uri: str,
        http: httpx.AsyncClient,
        profile: ImageProfile,
        storage_options: dict[str, Any] | None,
    ) -> PreparedImage:
        try:
            image = await fetch_and_prepare(
                uri,
                http=http,
                profile=profile,
                storage_options=storage_options,
                max_bytes=self.fetch_max_bytes,
                max_pixels=self.max_pixels,
            )
        except ImageInputError as exc:
            with self._lock:
                self._drop_inflight(key)
                if not exc.transient:
                    self._failures[key] = exc
                    while len(self._failures) > self.max_failures:
                        self._failures.popitem(last=False)
            raise
        except BaseException:
            with self._lock:
                self._drop_inflight(key)
            raise
        with self._lock:
            self._drop_inflight(key)
            self._store(key, image)
        return image

    def _drop_inflight(self, key: _Key) -> None:
        task = self._inflight.get(key)
        if task is not None and task is asyncio.current_task():
            del self._inflight[key]

    def _store(self, key: _Key, image: PreparedImage) -> None:
        size = len(image.data)
        if size > self.max_bytes:  # larger than the whole cache: hand it out, keep nothing
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self._size -= len(previous.data)
        self._entries[key] = image
        self._size += size
        while self._size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._size -= len(evicted.data)

    def clear(self) -> None:
        """Forget every entry and remembered failure (in-flight loads still complete)."""
        with self._lock:
            self._entries.clear()
            self._failures.clear()
            self._size = 0


def _consume_exception(task: asyncio.Task[PreparedImage]) -> None:
    # If every waiter was cancelled nobody reads the error; avoid "never retrieved" noise.
    if not task.cancelled():
        task.exception()
