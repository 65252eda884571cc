"""Image preparation: ``prepare_image`` vs naive Pillow on 24-megapixel JPEGs, per profile.

Naive = ``Image.open``, ``convert("RGB")``, LANCZOS resize to the size our output has, save as
JPEG at the profile's quality. Times are best of N, ours, our Pillow-only path (``prepare_image``
as before libvips: ``pillow_path_*``) and naive interleaved. Naive is single-threaded; ours
runs on libvips' worker threads (or, on the Pillow path, resizes in parallel bands), so besides
wall-clock time each case also reports CPU time (``time.process_time``, all threads of this
process) and a ``cpu_speedup``: the part of the wall-clock speedup that does not come from
using more cores. SSIM is a Gaussian-window SSIM (sigma 1.5, 11 taps, K1 0.01, K2 0.03) on
BT.601 luminance between our decoded output and naive's decoded output. ``peak_rss``: what one
preparation adds to a fresh process's peak RSS, ours vs the Pillow path vs naive.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from providers.registry import BUILT_IN, REFINER
from schemas.image_profile import ImageProfile
from tasks.images import prepare, prepare_image
from tasks.images.vips import vips

# Every built-in profile, the refiner's included.
PROFILES: dict[str, ImageProfile] = {
    spec.name: spec.profile for spec in (*BUILT_IN.values(), REFINER)
}


def naive_prepare(data: bytes, size: tuple[int, int], quality: int) -> bytes:
    im = Image.open(BytesIO(data)).convert("RGB")
    im = im.resize(size, Image.Resampling.LANCZOS)
    out = BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _gaussian_kernel(sigma: float = 1.5, taps: int = 11) -> np.ndarray:
    x = np.arange(taps, dtype=np.float64) - (taps - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _filter_valid(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' convolution of a 2-D array with the symmetric 1-D kernel ``k``."""
    n = len(k)
    h, w = a.shape
    rows = np.zeros((h - n + 1, w), dtype=np.float64)
    for i, weight in enumerate(k):
        rows += weight * a[i : i + h - n + 1]
    out = np.zeros((h - n + 1, w - n + 1), dtype=np.float64)
    for i, weight in enumerate(k):
        out += weight * rows[:, i : i + w - n + 1]
    return out


def luminance(img: Image.Image) -> np.ndarray:
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004) of two same-size greyscale arrays."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    k = _gaussian_kernel()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    aa = _filter_valid(a * a, k) - mu_a**2
    bb = _filter_valid(b * b, k) - mu_b**2
    ab = _filter_valid(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (aa + bb + c2)
    return float(np.mean(num / den))


class _Timer:
    """Best wall-clock and best CPU time (whole process, every thread) over several calls."""

    def __init__(self) -> None:
        self.wall = float("inf")
        self.cpu = float("inf")

    def __call__(self, fn: Any) -> Any:
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        t1, c1 = time.perf_counter(), time.process_time()
        self.wall, self.cpu = min(self.wall, t1 - t0), min(self.cpu, c1 - c0)
        return result


SSIM_TARGET = 0.97


@contextmanager
def pillow_path() -> Iterator[None]:
    """``prepare_image`` as it was before libvips: every image through Pillow."""
    real = prepare._vips_source
    prepare._vips_source = lambda *_: None
    try:
        yield
    finally:
        prepare._vips_source = real


def takes_vips(data: bytes, profile: ImageProfile) -> bool:
    """Whether ``prepare_image`` gives this image to libvips for this profile."""
    with Image.open(BytesIO(data)) as im:
        target = prepare._fit_size(*im.size, profile=profile, shown="bench")
        return prepare._vips_source(data, im, target) is not None


def bench_one(data: bytes, profile: ImageProfile, runs: int) -> dict[str, Any]:
    ours_t, pillow_t, naive_t = _Timer(), _Timer(), _Timer()

    def run_ours() -> Any:
        return prepare_image(data, profile=profile, source_uri="bench.jpg")

    def run_pillow() -> Any:
        with pillow_path():
            return prepare_image(data, profile=profile, source_uri="bench.jpg")

    ours = ours_t(run_ours)
    size = (ours.width, ours.height)
    naive = b""
    # Interleaved so that load from other processes hits every side alike.
    for index in range(runs):
        if index:
            ours_t(run_ours)
        pillow = pillow_t(run_pillow)
        naive = naive_t(lambda: naive_prepare(data, size, profile.jpeg_quality))
    # The serial part no pipeline on libjpeg skips: decoding at the smallest DCT scale (1/2,
    # 1/4, 1/8 or none) that keeps the size. naive / decode bounds any speed-up, however cheap
    # the resize and however well the encode overlaps the decode.
    decode_t = _Timer()
    for _ in range(runs):
        decode_t(lambda: _draft_decode(data, size))
    with Image.open(BytesIO(naive)) as reference:
        naive_lum = luminance(reference)
    with Image.open(BytesIO(ours.data)) as a, Image.open(BytesIO(pillow.data)) as b:
        score = ssim(luminance(a), naive_lum)
        pillow_score = ssim(luminance(b), naive_lum)
        ours_format = a.format
    return {
        "profile": profile.name,
        "path": "vips" if takes_vips(data, profile) else "pillow",
        "output_size": list(size),
        "ours_ms": round(ours_t.wall * 1000, 1),
        "naive_ms": round(naive_t.wall * 1000, 1),
        "speedup": round(naive_t.wall / ours_t.wall, 2),
        "ours_cpu_ms": round(ours_t.cpu * 1000, 1),
        "naive_cpu_ms": round(naive_t.cpu * 1000, 1),
        "cpu_speedup": round(naive_t.cpu / max(ours_t.cpu, 1e-9), 2),
        "ssim": round(score, 4),
        "ours_bytes": len(ours.data),
        "naive_bytes": len(naive),
        "ours_format": ours_format,
        # Our Pillow-only path (before libvips), measured in the same rounds.
        "pillow_path_ms": round(pillow_t.wall * 1000, 1),
        "pillow_path_speedup": round(naive_t.wall / pillow_t.wall, 2),
        "pillow_path_cpu_speedup": round(naive_t.cpu / max(pillow_t.cpu, 1e-9), 2),
        "pillow_path_ssim": round(pillow_score, 4),
        "decode_ms": round(decode_t.wall * 1000, 1),
        "speedup_bound_decode": round(naive_t.wall / decode_t.wall, 2),
    }


def _draft_decode(data: bytes, size: tuple[int, int]) -> Image.Image:
    im = Image.open(BytesIO(data))
    im.draft("RGB", size)
    im.load()
    return im


# One preparation in a fresh process: the high-water RSS after imports and reading the file,
# and after preparing (what the preparation itself added at its peak).
_PEAK_RSS_CHILD = """
import json, re, sys
from pathlib import Path
from bench.prep import PROFILES, naive_prepare, pillow_path
from tasks.images import prepare_image
data = Path(sys.argv[1]).read_bytes()
profile, which = PROFILES[sys.argv[2]], sys.argv[3]
size = tuple(int(v) for v in sys.argv[4].split("x"))
from tasks.images.vips import vips
vips()  # libvips loaded in every child alike: the figures are the preparation's own
def hwm():  # VmHWM, not ru_maxrss: Linux carries the parent's peak over fork and exec there
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
before = hwm()
if which == "naive":
    naive_prepare(data, size, profile.jpeg_quality)
elif which == "pillow":
    with pillow_path():
        prepare_image(data, profile=profile, source_uri="bench.jpg")
else:
    prepare_image(data, profile=profile, source_uri="bench.jpg")
after = hwm()
print(json.dumps({"before_kb": before, "after_kb": after}))
"""


def peak_rss(photo: Path, cases: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Peak RSS added by one preparation of ``photo``, per profile size: ours, Pillow's, naive."""
    out: dict[str, dict[str, float]] = {}
    for name in ("changeclothes", "ailab"):
        case = next(c for c in cases if c["profile"] == name and c["image"] == photo.name)
        size = "x".join(str(v) for v in case["output_size"])
        row: dict[str, float] = {}
        for which in ("vips", "pillow", "naive"):
            argv = [sys.executable, "-c", _PEAK_RSS_CHILD, str(photo), name, which, size]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            reading = json.loads(done.stdout.strip().splitlines()[-1])
            label = "ours" if which == "vips" else f"{which}_path" if which == "pillow" else which
            row[f"{label}_peak_mb"] = round(reading["after_kb"] / 1024, 1)
            row[f"{label}_added_mb"] = round((reading["after_kb"] - reading["before_kb"]) / 1024, 1)
        out[name] = row
    return out


def _median(values: Any, digits: int) -> float:
    return round(statistics.median(values), digits)


def run_prep(photos: list[Path], *, runs: int = 3, memory: bool = True) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    cases = []
    for photo in photos:
        data = photo.read_bytes()
        for profile in PROFILES.values():
            case = bench_one(data, profile, runs)
            case["image"] = photo.name
            cases.append(case)
            print(
                f"  prep {photo.name} {profile.name:14s} {case['path']:6s}"
                f" ours {case['ours_ms']:6.1f} ms  naive {case['naive_ms']:6.1f} ms"
                f"  x{case['speedup']:.2f}  cpu {case['ours_cpu_ms']:6.1f}/"
                f"{case['naive_cpu_ms']:6.1f} ms x{case['cpu_speedup']:.2f}"
                f"  ssim {case['ssim']:.4f}  pillow path x{case['pillow_path_speedup']:.2f}"
                f"  bound x{case['speedup_bound_decode']:.2f}",
                flush=True,
            )
    speedups = [c["speedup"] for c in cases]
    cpu_speedups = [c["cpu_speedup"] for c in cases]
    ssims = [c["ssim"] for c in cases]
    by_profile: dict[str, dict[str, Any]] = {}
    for name in PROFILES:
        mine = [c for c in cases if c["profile"] == name]
        by_profile[name] = {
            "paths": sorted({c["path"] for c in mine}),
            "speedup_median": _median((c["speedup"] for c in mine), 2),
            "speedup_min": round(min(c["speedup"] for c in mine), 2),
            "ssim_min": round(min(c["ssim"] for c in mine), 4),
            "ours_ms_median": _median((c["ours_ms"] for c in mine), 1),
            "naive_ms_median": _median((c["naive_ms"] for c in mine), 1),
            "cpu_speedup_median": _median((c["cpu_speedup"] for c in mine), 2),
            "ours_cpu_ms_median": _median((c["ours_cpu_ms"] for c in mine), 1),
            "naive_cpu_ms_median": _median((c["naive_cpu_ms"] for c in mine), 1),
            "pillow_path_speedup_median": _median((c["pillow_path_speedup"] for c in mine), 2),
            "pillow_path_cpu_speedup_median": _median(
                (c["pillow_path_cpu_speedup"] for c in mine), 2
            ),
            "pillow_path_ssim_min": round(min(c["pillow_path_ssim"] for c in mine), 4),
            "decode_ms_median": _median((c["decode_ms"] for c in mine), 1),
            "speedup_bound_decode_median": _median((c["speedup_bound_decode"] for c in mine), 2),
        }
    return {
        "speedup_vs_naive": _median(speedups, 2),
        "speedup_min": round(min(speedups), 2),
        "speedup_median": _median(speedups, 2),
        # The per-profile target: every profile's median speed-up, the lowest of them.
        "speedup_median_min_profile": min(p["speedup_median"] for p in by_profile.values()),
        "cpu_speedup": _median(cpu_speedups, 2),
        "cpu_speedup_min": round(min(cpu_speedups), 2),
        "ssim_min": round(min(ssims), 4),
        "ssim_median": _median(ssims, 4),
        "runs_per_case": runs,
        "cpu_count": os.cpu_count(),
        "vips": _vips_info(),
        # Wall-clock speedups lean on a free second core: note how busy the machine was.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "images": [p.name for p in photos],
        "source_size": [6000, 4000],
        "by_profile": by_profile,
        "peak_rss": peak_rss(photos[0], cases) if memory else None,
        "cases": cases,
    }


def _vips_info() -> dict[str, Any]:
    pyvips = vips()
    return {
        "pyvips": pyvips.__version__,
        "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
        "concurrency": pyvips.concurrency_get(),
    }


def main(argv: list[str] | None = None) -> int:
    """Generate the photos in WORKDIR, run the comparison, print one BENCH_RESULT line."""
    import argparse
    import shutil

    from bench.data import make_photos

    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS children")
    args = parser.parse_args(argv)
    photos = make_photos(args.workdir, args.photos)
    try:
        result = run_prep(photos, runs=args.runs, memory=not args.no_memory)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
