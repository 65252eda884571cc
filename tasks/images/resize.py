"""Resizing large images on every core with the same pixels as one call. Prefect-free.

``banded_resize`` splits a large resize into bands resized on a small shared pool (Pillow
releases the GIL while resampling), cut where each band keeps the whole resize's coefficients
and pass order. ``residual_filter`` picks the cheapest filter that sample crops show
indistinguishable from LANCZOS for a residual (< 2x) downscale.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from PIL import Image, ImageChops, ImageStat

__all__ = ["DRAFT_PROBE_CANDIDATES", "PROBE_CANDIDATES", "banded_resize", "residual_filter"]

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
PROBE_CANDIDATES: Final = (Image.Resampling.HAMMING,)
DRAFT_PROBE_CANDIDATES: Final = (Image.Resampling.HAMMING, Image.Resampling.BICUBIC)
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


def residual_filter(
    im: Image.Image,
    ratio: float,
    candidates: tuple[Image.Resampling, ...] = PROBE_CANDIDATES,
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


def banded_resize(
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
