"""The result check's CPU per result, by result kind: Pillow vs libvips decoding, in one run.

For each kind (the fast emulator's 512x768 WebP, photo-like try-ons as WebP, JPEG and PNG) it
times ``check_output`` three ways, interleaved round by round: every format decoded by Pillow
(``pillow``: the check as it was before libvips), every format by libvips (``vips``), and the
module's default routing (``default``: ``VIPS_FORMATS``). The person image is the fast
scenario's (a 768x1024 JPEG at quality 85), decoded once and kept, as in a run.

CPU is ``time.process_time`` (every thread of this process: libvips decodes on its own worker
thread) per call, median over rounds; wall-clock medians beside it. Besides, for JPEG and WebP,
the cheapest decode libvips offers on its own (shrink-on-load: ``jpegload_buffer(shrink=)``,
``webpload_buffer(scale=)``, to the 1/8-scale image and no further) against Pillow's decode as
the check does it: what decoding alone costs, check aside.

Every verdict is also compared across the three ways (``same_verdict``).

    python -m bench.checks [--rounds 7] [--seconds 0.25]

prints one ``BENCH_RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from bench.data import PERSON_SIZE, synthetic_photo
from emulator import composite
from providers.base import ProviderError
from tasks import output_checks
from tasks.images.vips import vips

ALL_VIPS = frozenset({"JPEG", "PNG", "WEBP"})
WAYS: dict[str, frozenset[str] | None] = {
    "pillow": frozenset(),
    "vips": ALL_VIPS,
    "default": None,
}


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _try_on(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like person with an upper-body region replaced from another photo."""
    person = np.asarray(synthetic_photo(seed, size, noise=2.0)).copy()
    other = np.asarray(synthetic_photo(seed + 1, size, noise=2.0))
    h, w = person.shape[:2]
    rows, cols = slice(h * 18 // 100, h * 52 // 100), slice(w * 28 // 100, w * 72 // 100)
    person[rows, cols] = other[rows, cols]
    return Image.fromarray(person, "RGB")


def kinds() -> dict[str, bytes]:
    """Result bytes by kind."""
    medium = _try_on((1024, 1536), 31)
    return {
        "webp_512x768_emulator": composite.prerendered("garment", "upper_body").result,
        "webp_1024x1536_photo": _encode(medium, "WEBP", quality=82),
        "jpeg_1024x1536_photo": _encode(medium, "JPEG", quality=90),
        "png_512x768_photo": _encode(_try_on((512, 768), 41), "PNG"),
        "png_1024x1536_photo": _encode(medium, "PNG"),
        "png_2048x3072_photo": _encode(_try_on((2048, 3072), 51), "PNG"),
    }


def _verdict(data: bytes, person: bytes, way: frozenset[str] | None) -> str:
    try:
        return output_checks.check_output(data, person=person, vips_formats=way)
    except ProviderError as exc:
        return exc.code


def _time(call: Callable[[], object], seconds: float) -> tuple[float, float]:
    """CPU and wall ms per call, over about ``seconds`` of calls."""
    call()
    cpu, wall = time.process_time(), time.perf_counter()
    calls = 0
    while time.perf_counter() - wall < seconds or calls < 3:
        call()
        calls += 1
    return (
        (time.process_time() - cpu) * 1000 / calls,
        (time.perf_counter() - wall) * 1000 / calls,
    )


def _decoders(data: bytes) -> dict[str, Callable[[], object]]:
    """Decode-only calls for JPEG and WebP: Pillow as the check does it, libvips' shrink."""
    fmt = Image.open(io.BytesIO(data)).format
    pyvips = vips()

    def pillow() -> object:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (64, 64))
            image.load()
            return image.reduce(8) if fmt != "JPEG" else image

    if fmt == "JPEG":
        return {
            "pillow_decode": pillow,
            "vips_shrink_on_load": lambda: pyvips.Image.jpegload_buffer(
                data, shrink=8, fail_on="warning", access="sequential"
            ).write_to_memory(),
        }
    if fmt == "WEBP":
        return {
            "pillow_decode": pillow,
            "vips_shrink_on_load": lambda: pyvips.Image.webpload_buffer(
                data, scale=1 / 8, fail_on="warning", access="sequential"
            ).write_to_memory(),
        }
    return {}


def run(rounds: int, seconds: float) -> dict[str, Any]:
    person = _encode(synthetic_photo(20261121, PERSON_SIZE, noise=2.0), "JPEG", quality=85)
    results: dict[str, Any] = {}
    for kind, data in kinds().items():
        calls: dict[str, Callable[[], object]] = {
            name: (lambda data=data, way=way: _verdict(data, person, way))
            for name, way in WAYS.items()
        }
        calls |= _decoders(data)
        verdicts = {name: _verdict(data, person, way) for name, way in WAYS.items()}
        samples: dict[str, list[tuple[float, float]]] = {key: [] for key in calls}
        for _ in range(rounds):
            for key, call in calls.items():
                samples[key].append(_time(call, seconds))
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fmt = image.format
        entry: dict[str, Any] = {
            "format": fmt,
            "size": [width, height],
            "bytes": len(data),
            "verdict": verdicts["pillow"],
            "same_verdict": len(set(verdicts.values())) == 1,
            "default_path": "vips" if fmt in output_checks.VIPS_FORMATS else "pillow",
        }
        for key, values in samples.items():
            entry[f"{key}_cpu_ms"] = round(statistics.median(v[0] for v in values), 3)
            entry[f"{key}_wall_ms"] = round(statistics.median(v[1] for v in values), 3)
        entry["default_cpu_vs_pillow"] = round(entry["default_cpu_ms"] / entry["pillow_cpu_ms"], 3)
        entry["vips_cpu_vs_pillow"] = round(entry["vips_cpu_ms"] / entry["pillow_cpu_ms"], 3)
        results[kind] = entry
    pyvips = vips()
    return {
        "kinds": results,
        "rounds": rounds,
        "seconds_per_timing": seconds,
        "vips_formats_default": sorted(output_checks.VIPS_FORMATS),
        "vips_concurrency": pyvips.concurrency_get(),
        "versions": {
            "pillow": Image.__version__,
            "pyvips": pyvips.__version__,
            "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
            "python": platform.python_version(),
        },
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.25, help="per timing, per round")
    args = parser.parse_args(argv)
    print("BENCH_RESULT " + json.dumps(run(args.rounds, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
