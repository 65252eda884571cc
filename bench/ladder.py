"""Decompose the fast scenario's CPU: the same rows, one layer of our stack added at a time.

    python -m bench.ladder MODE MANIFEST OUT --max-in-flight N

MODE ``client``: our ChangeClothes client and result download (the provider layer) driven by a
bare semaphore loop, files written with ``Path.write_bytes``; no Prefect, no ``tasks.process``.
MODE ``process``: ``tasks.process.process_rows`` over every row with a hand-built run context
(what one Prefect task runs), no Prefect. MODE ``process-inline-io``: the same with the result
sniff and lake writes run on the event loop instead of ``asyncio.to_thread``. The flow itself
(``bench.drive_flow``) is the last rung. Base URL and key come from the environment, as for
the flow. Prints one BENCH_RESULT line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from bench.drive_flow import inline_small_io
from providers.base import PreparedImage, TryOnRequest
from providers.changeclothes.client import ChangeClothesClient
from providers.changeclothes.settings import PROFILE as CHANGECLOTHES
from providers.transport import provider_http_client
from schemas.manifest import ManifestRow
from tasks.images import PreparedImageCache, prepare_image
from tasks.lake import Lake
from tasks.manifest import load_manifest
from tasks.process import Lane, RunContext, process_rows, rows_in_progress


async def _client_only(
    client: ChangeClothesClient, rows: list[ManifestRow], out: Path, max_in_flight: int
) -> int:
    cache: dict[str, PreparedImage] = {}

    def prepared(uri: str) -> PreparedImage:
        if uri not in cache:
            data = Path(uri).read_bytes()
            cache[uri] = prepare_image(data, profile=CHANGECLOTHES, source_uri=uri)
        return cache[uri]

    for row in rows:  # outside the timed part, like the flow's once-per-image preparation
        prepared(row.person_image)
        if row.garment_image:
            prepared(row.garment_image)
    gate = asyncio.Semaphore(max_in_flight)
    out.mkdir(parents=True, exist_ok=True)

    async def one(row: ManifestRow) -> bool:
        assert row.garment_image is not None
        request = TryOnRequest(
            row_id=row.id,
            person=prepared(row.person_image),
            garment=prepared(row.garment_image),
            category=row.category,
        )
        async with gate:
            result = await client.try_on(request)
        assert result.result_url is not None
        (out / f"{row.id}.webp").write_bytes(await client.download(result.result_url))
        if result.mask_url:
            (out / f"{row.id}-mask.webp").write_bytes(await client.download(result.mask_url))
        return True

    done = await asyncio.gather(*(one(row) for row in rows))
    return sum(done)


async def run(mode: str, manifest: str, out: Path, max_in_flight: int) -> dict[str, Any]:
    rows = list(load_manifest(manifest, known_providers=["changeclothes"]).valid)
    if mode == "process-inline-io":
        inline_small_io()
    timeout = httpx.Timeout(180.0, connect=10.0)
    async with provider_http_client(
        max_connections=rows_in_progress(max_in_flight), timeout=timeout
    ) as http:
        client = ChangeClothesClient.from_env(http=http, profile=CHANGECLOTHES)
        if mode == "client":
            c0, t0 = time.process_time(), time.perf_counter()
            succeeded = await _client_only(client, rows, out, max_in_flight)
        else:
            lane = Lane(client=client, max_in_flight=max_in_flight)
            ctx = RunContext(
                run_id="ladder",
                lane=lane,
                http=http,
                lake=Lake.open(str(out)),
                images=PreparedImageCache(),
            )
            c0, t0 = time.process_time(), time.perf_counter()
            records = await process_rows(rows, ctx)
            succeeded = sum(str(r.status) == "succeeded" for r in records)
        cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
    return {
        "mode": mode,
        "rows": len(rows),
        "succeeded": succeeded,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["client", "process", "process-inline-io"])
    parser.add_argument("manifest")
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-in-flight", type=int, default=32)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.mode, args.manifest, args.out, args.max_in_flight))
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
