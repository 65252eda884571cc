"""The baseline: plain asyncio + httpx + a semaphore doing the flow's HTTP work, nothing else.

Usage: python -m bench.plain MANIFEST OUT_DIR --base-url URL [--concurrency 32] [--no-mask]
For each row: read both images (bytes cached per path), POST them multipart to ChangeClothesAI's
garment endpoint, GET the result (and the mask, as the flow does, unless --no-mask) and write
it to OUT_DIR. Prints one JSON line like bench.drive_flow.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import resource
import time
from pathlib import Path

T_START, CPU_START = time.perf_counter(), time.process_time()
import httpx  # noqa: E402  (imported after the clock starts: it is part of start-up)


async def run(args: argparse.Namespace) -> dict[str, object]:
    manifest = Path(args.manifest)
    rows = list(csv.DictReader(manifest.open()))
    out = Path(args.out_dir)
    cache: dict[str, bytes] = {}
    headers = {"Authorization": f"Bearer {args.key}"}
    url = args.base_url.rstrip("/") + "/api/openapi/change-clothes-ai"
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 4)

    def image(path: str) -> bytes:
        if path not in cache:
            cache[path] = (manifest.parent / path).read_bytes()
        return cache[path]

    async def one(http: httpx.AsyncClient, row: dict[str, str]) -> bool:
        files = {
            "modelImg": ("person.jpg", image(row["person_image"]), "image/jpeg"),
            "garmentImg": ("garment.jpg", image(row["garment_image"]), "image/jpeg"),
            "category": (None, row["category"]),
        }
        async with gate:
            response = await http.post(url, files=files, headers=headers)
        data = response.json()["data"]
        (out / f"{row['id']}.webp").write_bytes((await http.get(data["resultImgUrl"])).content)
        if args.mask and data.get("maskImgUrl"):
            mask = (await http.get(data["maskImgUrl"])).content
            (out / f"{row['id']}-mask.webp").write_bytes(mask)
        return response.status_code == 200

    out.mkdir(parents=True, exist_ok=True)
    startup_s, startup_cpu_s = time.perf_counter() - T_START, time.process_time() - CPU_START
    t0, c0 = time.perf_counter(), time.process_time()
    async with httpx.AsyncClient(timeout=180.0, limits=limits) as http:
        done = await asyncio.gather(*(one(http, row) for row in rows), return_exceptions=True)
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    files = sum((out / f"{row['id']}.webp").is_file() for row in rows)
    return {
        "rows": len(rows),
        "succeeded": sum(ok is True for ok in done),
        "result_files": files,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "startup_s": round(startup_s, 3),
        "startup_cpu_s": round(startup_cpu_s, 3),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "errors": sorted({repr(e)[:200] for e in done if isinstance(e, BaseException)})[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out_dir")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--key", default=os.environ.get("CHANGECLOTHES_API_KEY", ""))
    parser.add_argument("--no-mask", dest="mask", action="store_false")
    print("BENCH_RESULT " + json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
