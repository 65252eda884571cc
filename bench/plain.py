"""The baseline: plain asyncio + httpx + a semaphore doing the flow's HTTP work, nothing else.

Usage: python -m bench.plain MANIFEST OUT_DIR --base-url URL [--concurrency 32] [--no-mask]
                               [--s3-endpoint URL]
For each row: read both images (bytes cached per path), POST them multipart to ChangeClothesAI's
garment endpoint, GET the result (and the mask, as the flow does, unless --no-mask) and write
it to OUT_DIR. Prints one JSON line like bench.drive_flow.

OUT_DIR ``s3://bucket/prefix``: each file is a ``put_object`` through one aiobotocore client
(the AWS environment's credentials, ``--s3-endpoint``), as a plain script would write to S3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path

T_START, CPU_START = time.perf_counter(), time.process_time()
import httpx  # noqa: E402  (imported after the clock starts: it is part of start-up)


async def run(args: argparse.Namespace) -> dict[str, object]:
    manifest = Path(args.manifest)
    rows = list(csv.DictReader(manifest.open()))
    s3 = args.out_dir.startswith("s3://")
    out = Path(args.out_dir) if not s3 else None
    bucket, _, prefix = args.out_dir.removeprefix("s3://").partition("/")
    cache: dict[str, bytes] = {}
    headers = {"Authorization": f"Bearer {args.key}"}
    url = args.base_url.rstrip("/") + "/api/openapi/change-clothes-ai"
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 4)

    def image(path: str) -> bytes:
        if path not in cache:
            cache[path] = (manifest.parent / path).read_bytes()
        return cache[path]

    stored: set[str] = set()

    async def write(client: object, name: str, data: bytes) -> None:
        if out is not None:
            (out / name).write_bytes(data)
        else:
            await client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)  # type: ignore[attr-defined]
        stored.add(name)

    async def one(http: httpx.AsyncClient, client: object, row: dict[str, str]) -> bool:
        files = {
            "modelImg": ("person.jpg", image(row["person_image"]), "image/jpeg"),
            "garmentImg": ("garment.jpg", image(row["garment_image"]), "image/jpeg"),
            "category": (None, row["category"]),
        }
        async with gate:
            response = await http.post(url, files=files, headers=headers)
        data = response.json()["data"]
        await write(client, f"{row['id']}.webp", (await http.get(data["resultImgUrl"])).content)
        if args.mask and data.get("maskImgUrl"):
            mask = (await http.get(data["maskImgUrl"])).content
            await write(client, f"{row['id']}-mask.webp", mask)
        return response.status_code == 200

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    startup_s, startup_cpu_s = time.perf_counter() - T_START, time.process_time() - CPU_START
    t0, c0 = time.perf_counter(), time.process_time()
    async with httpx.AsyncClient(timeout=180.0, limits=limits) as http, _s3_client(args) as client:
        done = await asyncio.gather(
            *(one(http, client, row) for row in rows), return_exceptions=True
        )
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    files = sum(f"{row['id']}.webp" in stored for row in rows)
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


@contextlib.asynccontextmanager
async def _s3_client(args: argparse.Namespace) -> AsyncIterator[object]:
    """An aiobotocore S3 client when writing to S3 (credentials from the environment)."""
    if not args.out_dir.startswith("s3://"):
        yield None
        return
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(max_pool_connections=args.concurrency * 2 + 4)
    async with get_session().create_client(
        "s3", endpoint_url=args.s3_endpoint, config=config
    ) as client:
        yield client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out_dir")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--key", default=os.environ.get("CHANGECLOTHES_API_KEY", ""))
    parser.add_argument("--no-mask", dest="mask", action="store_false")
    parser.add_argument("--s3-endpoint", help="the S3 endpoint for an s3:// OUT_DIR")
    print("BENCH_RESULT " + json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
