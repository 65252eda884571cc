"""The rerun scenario: a finished manifest of big photos run again into the same lake.

60 rows, each with its own 12-megapixel person photo (4000x3000 JPEG) and one of the bench's
garments, against the fast emulator. The first run fetches, decodes and fits every photo and
calls the provider for every row; the rerun of the same manifest into the same lake should
find every row done from its sources (``tasks.images.sources``): no provider call, no image
decoded. Our figure is the rerun's CPU (in the flow's process, from the flow call to its
return: the interpreter's start and imports are the same for any command) against the first
run's.

    python -m bench.rerun  (standalone: its own emulator and Prefect server)
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import ImageDraw

from bench import data

ROWS = 60
PHOTO_SIZE = (4000, 3000)
MAX_IN_FLIGHT = 16
CPU_RATIO_MAX = 0.05


def make_photos(root: Path, count: int) -> list[Path]:
    """``count`` distinct 12 MP photo-like JPEGs: one drawn photo, each copy marked apart."""
    root.mkdir(parents=True, exist_ok=True)
    base = data.synthetic_photo(1200, PHOTO_SIZE)
    paths = []
    for k in range(count):
        photo = base.copy()
        draw = ImageDraw.Draw(photo)
        x, y = 40 + 37 * k, 60 + 23 * k
        draw.rectangle((x, y, x + 400, y + 300), fill=(k * 4 % 256, 255 - k * 4 % 256, 90))
        path = root / f"person-{k:03d}.jpg"
        photo.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def write_manifest(path: Path, people: list[Path], garments: list[Path]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "person_image", "garment_image", "category"])
        for i, person in enumerate(people):
            garment = garments[i % len(garments)]
            writer.writerow([f"big-{i:03d}", str(person), str(garment), "upper_body"])
    return path


def side(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "wall_s",
        "cpu_s",
        "provider_calls",
        "images_prepared",
        "images_recognised",
        "succeeded",
        "already_done",
        "counts",
    )
    return {k: result.get(k) for k in keys}


def rerun_scenario(ctx: dict[str, Any], emulator: Any, server: Any) -> dict[str, Any]:
    """First run and rerun of the big-photo manifest, each a fresh process (``bench.run``)."""
    from bench.run import flow_argv, log, measured, run_child

    tmp: Path = ctx["tmp"] / "rerun"
    log(f"rerun: {ROWS} photos of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}")
    people = make_photos(tmp / "photos", ROWS)
    garments = sorted((ctx["tmp"] / "inputs" / "garments").glob("*.jpg"))[:10]
    manifest = write_manifest(tmp / "manifest.csv", people, garments)
    lake = tmp / "lake"
    out: dict[str, Any] = {"rows": ROWS, "photo_size": list(PHOTO_SIZE)}
    for name in ("first", "rerun"):
        log(f"rerun: {name} run")
        argv = flow_argv(manifest, lake, MAX_IN_FLIGHT, ctx["chunk_size"])
        with measured(emulator, server) as scope:
            result, peaks = run_child(
                argv, env=ctx["flow_env"], log_path=tmp / f"{name}.log", what=f"rerun-{name}"
            )
        out[name] = side(result) | {
            "emulator_requests": scope["emulator"]["changeclothes_requests"],
            # VmHWM, not ru_maxrss: the latter carries over the harness's own peak (the
            # photos it drew) through fork and exec.
            "peak_rss_mb": max(result["vm_hwm_mb"], peaks["watch_vm_hwm_mb"]),
        }
    first, rerun = out["first"], out["rerun"]
    out["cpu_ratio_vs_first"] = round(rerun["cpu_s"] / first["cpu_s"], 4)
    out["wall_ratio_vs_first"] = round(rerun["wall_s"] / first["wall_s"], 4)
    problems = []
    if first["succeeded"] != ROWS or first["emulator_requests"] != ROWS:
        problems.append(f"first run: {first['succeeded']} succeeded, {first['emulator_requests']}")
    if rerun["emulator_requests"] or rerun["provider_calls"]:
        problems.append(f"rerun called the provider {rerun['emulator_requests']} times")
    if rerun["images_prepared"] != 0:
        problems.append(f"rerun decoded {rerun['images_prepared']} images")
    out["checks"] = problems or "ok"
    return out


def main(argv: list[str] | None = None) -> int:
    """Standalone: its own emulator and Prefect server, the result printed."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args(argv)
    from bench.run import (
        EMULATOR_KEY,
        Emulator,
        PrefectServer,
        child_env,
        clean_up,
        log,
    )

    tmp = Path(tempfile.mkdtemp(prefix="tryon-bench-rerun-"))
    env = child_env(drop=("CHANGECLOTHES_API_KEY",))
    emulator = server = None
    try:
        emulator = Emulator(tmp, env, latency_s=0.5)
        server = PrefectServer(tmp, env)
        ctx = {
            "tmp": tmp,
            "chunk_size": 100,
            "flow_env": {
                **env,
                "TRYON_CHANGECLOTHES_BASE_URL": emulator.url,
                "CHANGECLOTHES_API_KEY": EMULATOR_KEY,
                "PREFECT_API_URL": server.api_url,
                "PREFECT_HOME": str(server.home),
            },
        }
        data.make_inputs(tmp / "inputs")
        result = rerun_scenario(ctx, emulator, server)
    finally:
        clean_up(tmp, keep=args.keep_tmp, children=(server, emulator), say=log)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
