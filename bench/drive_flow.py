"""Run ``tryon_batch`` once in this process and print one JSON line of measurements.

Usage: python -m bench.drive_flow MANIFEST LAKE --max-in-flight N [--chunk-size N]

Wall and CPU are measured around the flow call only (t0 just before it); interpreter and import
start-up are reported separately. Prefect's API is whatever the environment says:
``PREFECT_API_URL`` for a running server, unset for an ephemeral one (a child process, whose CPU
is reported as ``children_cpu_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import resource
import sys
import time

T_START = time.perf_counter()
CPU_START = time.process_time()

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("lake")
    parser.add_argument("--max-in-flight", type=int, required=True)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--provider", default="changeclothes")
    parser.add_argument("--profile", help="write a sampled all-thread CPU profile (JSON) here")
    parser.add_argument(
        "--what-if-inline-io",
        action="store_true",
        help="diagnostic, not our code as shipped: run the result sniff and lake writes on the "
        "event loop instead of asyncio.to_thread (both are tiny here)",
    )
    args = parser.parse_args(argv)

    import polars as pl

    from bench.procs import status_kb, tree_cpu_s
    from flows.batch import BatchIncomplete, BatchParams, tryon_batch
    from schemas.results import METADATA_SCHEMA

    if args.what_if_inline_io:
        inline_small_io()
    params = BatchParams(
        manifest=args.manifest,
        lake=args.lake,
        provider=args.provider,
        chunk_size=args.chunk_size,
        limits={"max_in_flight": args.max_in_flight, "global_max_in_flight": args.max_in_flight},
    )
    startup_s = time.perf_counter() - T_START
    startup_cpu_s = time.process_time() - CPU_START
    pid = os.getpid()
    children0 = tree_cpu_s(pid, include_self=False)
    sampler = None
    if args.profile:
        from bench.sampler import Sampler

        sampler = Sampler()
        sampler.start()
    error = None
    t0_unix = time.time()  # on the clock of the records' started_at/finished_at
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        summary = asyncio.run(tryon_batch(params))
    except BatchIncomplete as exc:
        summary, error = exc.summary, str(exc)
    wall_s = time.perf_counter() - t0
    t1_unix = t0_unix + wall_s
    cpu_s = time.process_time() - c0
    children_cpu_s = tree_cpu_s(pid, include_self=False) - children0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    threads = _thread_cpu()
    if sampler is not None:
        sampler.stop()
        with open(args.profile, "w") as handle:
            json.dump(sampler.report(), handle, indent=1)

    parts = glob.glob(f"{args.lake}/metadata/run_id={summary.run_id}/*.parquet")
    # A rerun whose rows earlier runs all recorded writes no metadata of its own.
    frame = pl.read_parquet(parts) if parts else pl.DataFrame(schema=METADATA_SCHEMA)
    tryon = frame.filter(pl.col("stage") == "tryon")
    succeeded = tryon.filter(pl.col("status") == "succeeded").height + summary.already_done
    # Rows whose result is in the lake (outputs are content-addressed: the emulator's fast
    # mode returns the same picture for many rows, which then share one file).
    present = {uri: os.path.isfile(uri) for uri in set(tryon["output_uri"].drop_nulls())}
    results = sum(present[uri] for uri in tryon["output_uri"].drop_nulls())
    report = {
        "rows": summary.total_rows,
        "succeeded": succeeded,
        "result_files": results,
        "counts": summary.counts,
        "provider_calls": summary.provider_calls,
        "already_done": summary.already_done,
        "images_prepared": summary.images_prepared,
        "images_recognised": summary.images_recognised,
        "wall_s": round(wall_s, 3),
        "t0_unix": round(t0_unix, 4),
        "t1_unix": round(t1_unix, 4),
        "cpu_s": round(cpu_s, 3),
        "children_cpu_s": round(children_cpu_s, 3),
        "startup_s": round(startup_s, 3),
        "startup_cpu_s": round(startup_cpu_s, 3),
        "flow_duration_s": summary.duration_s,
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
        "vm_hwm_mb": round((status_kb(pid, "VmHWM") or 0) / 1024, 1),
        "thread_cpu_s": threads,
        "run_id": summary.run_id,
        "fatal_at_unix": summary.fatal_at.timestamp() if summary.fatal_at else None,
        "error": error,
    }
    print("BENCH_RESULT " + json.dumps(report), flush=True)
    return 0


def inline_small_io() -> None:
    """Make ``asyncio.to_thread`` call ``_sniff_extension`` and ``Lake.write_bytes`` inline
    (also ``bench.ladder``'s ``process-inline-io`` rung)."""
    original = asyncio.to_thread
    inline = {"_sniff_extension", "write_bytes"}

    async def to_thread(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in inline:
            return func(*args, **kwargs)
        return await original(func, *args, **kwargs)

    asyncio.to_thread = to_thread


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of the live threads, grouped by pool (main, asyncio workers, Prefect's)."""
    import threading

    from bench.procs import CLK_TCK
    from bench.sampler import _thread_kind, _thread_ticks

    totals: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        kind = _thread_kind(thread.name)
        totals[kind] = totals.get(kind, 0.0) + _thread_ticks(thread.native_id) / CLK_TCK
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    sys.exit(main())
