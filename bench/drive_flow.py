"""Run ``tryon_batch`` once in this process and print one JSON line of measurements.

Usage: python -m bench.drive_flow MANIFEST LAKE --max-in-flight N [--chunk-size N]
                                  [--storage-options JSON]

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
    parser.add_argument(
        "--storage-options",
        type=json.loads,
        default=None,
        help="the flow's storage_options (JSON) for a remote lake; the results are then "
        "checked by the caller, so this process makes no request of its own to the lake",
    )
    parser.add_argument("--profile", help="write a sampled all-thread CPU profile (JSON) here")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="time the flow's steps (diagnostic: wraps them, a few us each)",
    )
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
    phases = time_phases() if args.phases else None
    params = BatchParams(
        manifest=args.manifest,
        lake=args.lake,
        provider=args.provider,
        chunk_size=args.chunk_size,
        limits={"max_in_flight": args.max_in_flight, "global_max_in_flight": args.max_in_flight},
        storage_options=args.storage_options or {},
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

    if args.storage_options is None:
        parts = glob.glob(f"{args.lake}/metadata/run_id={summary.run_id}/*.parquet")
        # A rerun whose rows earlier runs all recorded writes no metadata of its own.
        frame = pl.read_parquet(parts) if parts else pl.DataFrame(schema=METADATA_SCHEMA)
        tryon = frame.filter(pl.col("stage") == "tryon")
        succeeded: int | None = (
            tryon.filter(pl.col("status") == "succeeded").height + summary.already_done
        )
        # Rows whose result is in the lake (outputs are content-addressed: the emulator's fast
        # mode returns the same picture for many rows, which then share one file).
        present = {uri: os.path.isfile(uri) for uri in set(tryon["output_uri"].drop_nulls())}
        results: int | None = sum(present[uri] for uri in tryon["output_uri"].drop_nulls())
    else:  # checked by the caller, after it has read the server's request counters
        succeeded = results = None
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
    if phases is not None:
        report["phases"] = {
            k: round(v, 3) if isinstance(v, float) else v for k, v in phases.items()
        }
        report["phases"]["flow_run_outside_body_s"] = round(wall_s - summary.duration_s, 3)
    print("BENCH_RESULT " + json.dumps(report), flush=True)
    return 0


def time_phases() -> dict[str, float | int]:
    """Wrap the flow's steps (``flows.batch``'s names, looked up when the flow runs) and the
    chunks' parts with timers: wall seconds per step; inside chunks, seconds summed over
    chunks (they overlap)."""
    import functools

    import flows.batch as batch
    import tasks.tryon as tryon
    from tasks.lake import Lake

    phases: dict[str, float | int] = {}

    def add(name: str, seconds: float) -> None:
        phases[name] = phases.get(name, 0.0) + seconds

    def timed_async(module: object, name: str, label: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        async def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                add(label, time.perf_counter() - t0)

        setattr(module, name, wrapper)

    def timed_sync(module: object, name: str, label: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                add(label, time.perf_counter() - t0)

        setattr(module, name, wrapper)

    timed_async(batch, "start_run", "start_run_checks_manifest_s")
    timed_async(batch, "record_invalid", "record_invalid_s")
    timed_async(batch, "open_run_contexts", "open_run_contexts_s")
    timed_sync(batch, "summarize", "summarize_s")
    timed_sync(batch, "commit_run", "commit_s")
    timed_async(batch, "publish_run_outputs", "report_and_artifacts_s")
    timed_async(batch, "emit_run_events", "events_s")
    timed_async(tryon, "process_rows", "chunks_rows_sum_s")
    timed_sync(tryon, "write_report_records", "chunks_report_parts_sum_s")
    timed_async(Lake, "awrite_metadata", "chunks_metadata_parts_sum_s")
    from tasks.execute import InProcessChunks

    timed_async(InProcessChunks, "run", "chunks_wall_s")
    original_chunk = tryon._process_chunk

    async def process_chunk(*args, **kwargs):  # type: ignore[no-untyped-def]
        phases["chunks"] = int(phases.get("chunks", 0)) + 1
        t0 = time.perf_counter()
        try:
            return await original_chunk(*args, **kwargs)
        finally:
            add("chunks_body_sum_s", time.perf_counter() - t0)

    tryon._process_chunk = process_chunk
    return phases


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
