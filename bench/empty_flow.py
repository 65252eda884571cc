"""A trivial Prefect flow run in this (fresh) process: what any flow pays per run.

Usage: python -m bench.empty_flow

Prints one BENCH_RESULT line: the wall and CPU time of ``asyncio.run(flow())`` (flow-run
creation, its state changes, the engine's start-up and shutdown, against whatever
``PREFECT_API_URL`` says), and the import time before it. The slow and rerun scenarios use it
as the floor no flow can go below.
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
    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(empty())
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    result = {"wall_s": round(wall_s, 3), "cpu_s": round(cpu_s, 3)}
    result["startup_s"] = round(startup_s, 3)
    print("BENCH_RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
