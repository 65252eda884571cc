"""A trivial Prefect flow run in this (fresh) process: what any flow pays per run.

Usage: python -m bench.empty_flow

Prints one BENCH_RESULT line: the wall time of ``asyncio.run(flow())`` (flow-run creation, its
state changes, the engine's start-up and shutdown, against whatever ``PREFECT_API_URL`` says),
and the import time before it. The slow scenario uses it as the floor no flow can go below.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

T_START = time.perf_counter()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> int:
    from prefect import flow

    @flow(name="bench-empty")
    async def empty() -> int:
        return 0

    startup_s = time.perf_counter() - T_START
    t0 = time.perf_counter()
    asyncio.run(empty())
    wall_s = time.perf_counter() - t0
    print(
        "BENCH_RESULT " + json.dumps({"wall_s": round(wall_s, 3), "startup_s": round(startup_s, 3)})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
