"""The ``s3_100k`` scenario: 100,000 rows on object storage, run and rerun, against plain.

A real S3 server on loopback (SeaweedFS, ``bench.s3server``) holds the plain script's outputs
and our flow's lake. Three measured processes, in this order, each against the same fast
emulator (``--fast-mode``, 0.5 s latency, 32 in flight, as the fast scenario):

1. ``bench.plain`` writing every row's result and mask to ``s3://<bucket>/plain/`` (one
   ``put_object`` each, one aiobotocore client): the baseline;
2. our flow (``bench.drive_flow``) into the lake ``s3://<bucket>/lake``;
3. our flow again, the same manifest into the same lake: every row already done, so no
   provider call, nothing recorded twice.

Every side's S3 requests are counted at the server (Prometheus plus its access log: GET,
HEAD, PUT, LIST, DELETE), between readings taken before the process starts and after it
ends; results are checked afterwards (so the checks' own requests are not counted).

    python -m bench.s3scale [--rows 100000] [--out PATH] [--merge] [--keep-tmp]

``--merge`` puts the result into ``bench/results/latest.json`` under ``s3_100k`` (``s3_<rows>``
for another size). ``make bench`` calls ``s3_scenario`` with the harness's emulator and server.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from bench import data
from bench.s3server import SeaweedS3, per_row

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ROWS = 100_000
LATENCY_S = 0.5
CONCURRENCY = 32
# Rows a chunk (a Prefect task run): 1,000 at this scale. Each task run costs ~30 ms of the
# flow's and the Prefect server's time (state changes over the API), 0.3 ms a row at the
# default 100, which is most of what a rerun of finished rows costs; 1,000 makes it 0.03.
CHUNK = 1000
SMALL_CHUNK = 100
TARGETS = {
    "ratio_vs_plain_min": 0.90,
    "rerun_ratio_vs_first_max": 0.05,
    "peak_rss_mb_max": 1024.0,
}


def log(message: str) -> None:
    print(f"[s3scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scenario_key(rows: int) -> str:
    return "s3_100k" if rows == ROWS else f"s3_{rows}"


def _timeout_s(rows: int) -> float:
    """Generous: a tenth of the ceiling's rate, plus start-up."""
    return 600 + rows / (CONCURRENCY / LATENCY_S) * 10


def _check_lake(s3: SeaweedS3, lake: str, rows: int) -> dict[str, Any]:
    """The committed metadata holds every row once, succeeded, each result and mask in the
    lake. Read after the counters (these requests are the harness's, not the flow's)."""
    fs = s3.filesystem()
    parts = sorted(fs.glob(f"{lake}/metadata/**/*.parquet"))
    frames = []
    for part in parts:
        with fs.open(part, "rb") as handle:
            frames.append(
                pl.read_parquet(
                    handle, columns=["row_id", "stage", "status", "output_uri", "mask_uri"]
                )
            )
    frame = pl.concat(frames) if frames else pl.DataFrame()
    tryon = frame.filter(pl.col("stage") == "tryon") if frames else frame
    succeeded = tryon.filter(pl.col("status") == "succeeded") if frames else tryon
    outputs = {f"s3://{p}" for p in fs.find(f"{lake}/outputs")}
    uris = set(succeeded["output_uri"].drop_nulls()) | set(succeeded["mask_uri"].drop_nulls())
    return {
        "metadata_parts": len(parts),
        "records": frame.height,
        "rows_succeeded": succeeded["row_id"].n_unique() if frames else 0,
        "duplicate_rows": (tryon.height - tryon["row_id"].n_unique()) if frames else 0,
        "output_objects": len(outputs),
        "outputs_missing": len(uris - outputs),
        "rows_without_mask": succeeded["mask_uri"].null_count() if frames else 0,
    }


def _check_plain(s3: SeaweedS3, prefix: str) -> int:
    return sum(1 for _ in s3.filesystem().find(prefix))


def s3_scenario(
    ctx: dict[str, Any],
    emulator: Any,
    rows: int,
    *,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Plain, first run, rerun; ``ctx`` as ``bench.run`` builds it (tmp, env, flow_env,
    manifests). Starts (and stops) its own SeaweedFS."""
    from bench.run import EMULATOR_KEY, manifest_of, measured, run_child

    tmp: Path = ctx["tmp"]
    manifest = manifest_of(ctx, rows)
    chunk = chunk_size or CHUNK
    emulator.control.set_faults("changeclothes", latency_s=LATENCY_S)
    log("starting SeaweedFS")
    s3 = SeaweedS3(tmp / "seaweed", env=ctx["env"])
    log(f"SeaweedFS ready after {s3.ready_s} s at {s3.endpoint_url}")
    timeout_s = _timeout_s(rows)
    sides: dict[str, dict[str, Any]] = {}
    try:

        def side(name: str, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
            log(f"{name} ({rows} rows)")
            before, w0 = s3.reading(), s3.cpu_s()
            with measured(emulator, None) as m:
                result, peaks = run_child(
                    argv, env=env, log_path=tmp / f"s3-{name}.log", what=name, timeout_s=timeout_s
                )
            after = s3.reading()
            out = {**result, **m, **peaks, "s3_cpu_s": round(s3.cpu_s() - w0, 2)}
            out["s3"] = per_row(after.minus(before), rows)
            sides[name] = out
            log(f"{name}: {out['wall_s']} s, S3 {out['s3']['per_row']}")
            return out

        plain_env = {**ctx["env"], **s3.env(), "CHANGECLOTHES_API_KEY": EMULATOR_KEY}
        argv = [PY, "-m", "bench.plain", str(manifest), s3.uri("plain"), "--base-url", emulator.url]
        argv += ["--concurrency", str(CONCURRENCY), "--s3-endpoint", s3.endpoint_url]
        plain = side("plain", argv, plain_env)
        plain["result_objects"] = _check_plain(s3, s3.uri("plain"))

        flow_env = {**ctx["flow_env"], **s3.env()}
        lake = s3.uri("lake")
        argv = [PY, "-m", "bench.drive_flow", str(manifest), lake]
        argv += ["--max-in-flight", str(CONCURRENCY), "--chunk-size", str(chunk)]
        argv += ["--storage-options", json.dumps(s3.flow_storage_options)]
        first = side("flow", argv, flow_env)
        first["lake"] = _check_lake(s3, lake, rows)
        rerun = side("flow_rerun", [*argv, "--phases"], flow_env)
        rerun["lake"] = _check_lake(s3, lake, rows)
        if chunk != SMALL_CHUNK:  # the same rerun at the default chunk size, for comparison
            small = [*argv[: argv.index("--chunk-size") + 1], str(SMALL_CHUNK)]
            small += argv[argv.index("--chunk-size") + 2 :]
            again = side(f"flow_rerun_chunk{SMALL_CHUNK}", [*small, "--phases"], flow_env)
            again["lake"] = _check_lake(s3, lake, rows)
    finally:
        s3.stop()
    return _figures(sides, rows, chunk)


def memory_check(ctx: dict[str, Any], emulator: Any, rows: int, *, latency_s: float) -> dict:
    """Our flow alone, first run and rerun, at a short latency: peak memory and requests per
    row, without the baseline (a check of memory at scale in a fraction of the time)."""
    from bench.run import measured, run_child

    tmp: Path = ctx["tmp"]
    people = sorted((tmp / "inputs" / "people").glob("*.jpg"))
    garments = sorted((tmp / "inputs" / "garments").glob("*.jpg"))
    manifest = data.write_manifest(tmp / "inputs" / f"manifest-{rows}.csv", people, garments, rows)
    emulator.control.set_faults("changeclothes", latency_s=latency_s)
    s3 = SeaweedS3(tmp / "seaweed", env=ctx["env"])
    out: dict[str, Any] = {"rows": rows, "latency_s": latency_s, "chunk_size": CHUNK}
    try:
        lake = s3.uri("lake")
        argv = [PY, "-m", "bench.drive_flow", str(manifest), lake, "--phases"]
        argv += ["--max-in-flight", str(CONCURRENCY), "--chunk-size", str(CHUNK)]
        argv += ["--storage-options", json.dumps(s3.flow_storage_options)]
        for name in ("flow", "flow_rerun"):
            log(f"memory: {name} ({rows} rows, latency {latency_s} s)")
            before = s3.reading()
            with measured(emulator, None) as m:
                result, peaks = run_child(
                    argv,
                    env={**ctx["flow_env"], **s3.env()},
                    log_path=tmp / f"mem-{name}.log",
                    what=name,
                    timeout_s=_timeout_s(rows),
                )
            delta = per_row(s3.reading().minus(before), rows)
            peak = max(result["vm_hwm_mb"], result["ru_maxrss_mb"], peaks["watch_vm_hwm_mb"])
            out[name] = {
                "peak_rss_mb": round(peak, 1),
                "wall_s": result["wall_s"],
                "cpu_ms_per_row": round(1000 * result["cpu_s"] / rows, 3),
                "provider_calls": result["provider_calls"],
                "already_done": result["already_done"],
                "emulator_calls": m["emulator"]["changeclothes_requests"],
                "s3_requests_per_row": delta["per_row"],
                "phases_s": result.get("phases"),
                "lake": _check_lake(s3, lake, rows),
            }
            log(f"memory: {name} peak {peak:.0f} MB, {result['wall_s']} s")
    finally:
        s3.stop()
    return out


def _figures(sides: dict[str, dict[str, Any]], rows: int, chunk: int) -> dict[str, Any]:
    plain, first, rerun = sides["plain"], sides["flow"], sides["flow_rerun"]

    def rate(side: dict[str, Any]) -> float:
        return round(rows / side["wall_s"], 2)

    def cpu_ms(side: dict[str, Any], key: str = "cpu_s") -> float:
        return round(1000 * side[key] / rows, 3)

    peak = max(first.get("vm_hwm_mb", 0), first["watch_vm_hwm_mb"], first.get("ru_maxrss_mb", 0))
    peak_rerun = max(
        rerun.get("vm_hwm_mb", 0), rerun["watch_vm_hwm_mb"], rerun.get("ru_maxrss_mb", 0)
    )
    problems: dict[str, list[str]] = {"plain": [], "flow": [], "flow_rerun": []}
    if plain["succeeded"] != rows or plain["result_objects"] != 2 * rows:
        problems["plain"].append(f"{plain['succeeded']} rows, {plain['result_objects']} objects")
    for name, side in (("flow", first), ("flow_rerun", rerun)):
        lake = side["lake"]
        if lake["rows_succeeded"] != rows or lake["duplicate_rows"] or lake["outputs_missing"]:
            problems[name].append(f"lake: {lake}")
    if first["emulator"]["changeclothes_requests"] != rows:
        problems["flow"].append(f"emulator saw {first['emulator']['changeclothes_requests']}")
    if rerun["provider_calls"] or rerun["emulator"]["changeclothes_requests"]:
        problems["flow_rerun"].append(
            f"provider calls {rerun['provider_calls']}, emulator "
            f"{rerun['emulator']['changeclothes_requests']}"
        )
    if rerun.get("already_done") != rows:
        problems["flow_rerun"].append(f"already_done {rerun.get('already_done')} of {rows}")
    ratio = round(rate(first) / rate(plain), 3)
    rerun_ratio = round(rerun["wall_s"] / first["wall_s"], 4)
    return {
        "rows": rows,
        "latency_s": LATENCY_S,
        "concurrency": CONCURRENCY,
        "chunk_size": chunk,
        "ceiling_rows_per_s": round(CONCURRENCY / LATENCY_S, 2),
        "ratio_vs_plain": ratio,
        "rerun_ratio_vs_first": rerun_ratio,
        "peak_rss_mb": round(peak, 1),
        "peak_rss_mb_rerun": round(peak_rerun, 1),
        "s3_requests_per_row": {
            "flow_first": first["s3"]["per_row"],
            "flow_rerun": rerun["s3"]["per_row"],
            "plain": plain["s3"]["per_row"],
        },
        "rows_per_s": {"flow": rate(first), "plain": rate(plain), "rerun": rate(rerun)},
        "wall_s": {"flow": first["wall_s"], "plain": plain["wall_s"], "rerun": rerun["wall_s"]},
        "cpu_ms_per_row": {
            "flow": cpu_ms(first),
            "plain": cpu_ms(plain),
            "rerun": cpu_ms(rerun),
            "s3_server_flow": cpu_ms(first, "s3_cpu_s"),
            "s3_server_plain": cpu_ms(plain, "s3_cpu_s"),
            "s3_server_rerun": cpu_ms(rerun, "s3_cpu_s"),
            "emulator_flow": cpu_ms(first, "emulator_cpu_s"),
        },
        "rerun_phases_s": rerun.get("phases"),
        **_small_chunk_rerun(sides, first, rows),
        "verdicts": {
            "ratio_vs_plain": ratio >= TARGETS["ratio_vs_plain_min"],
            "rerun_ratio_vs_first": rerun_ratio <= TARGETS["rerun_ratio_vs_first_max"],
            "peak_rss_mb": peak < TARGETS["peak_rss_mb_max"],
        },
        "targets": TARGETS,
        "checks": {name: p or "ok" for name, p in problems.items()},
        "raw": sides,
    }


def _small_chunk_rerun(
    sides: dict[str, dict[str, Any]], first: dict[str, Any], rows: int
) -> dict[str, Any]:
    side = sides.get(f"flow_rerun_chunk{SMALL_CHUNK}")
    if side is None:
        return {}
    ok = not side["provider_calls"] and side.get("already_done") == rows
    ok = ok and not side["lake"]["duplicate_rows"]
    return {
        f"rerun_chunk{SMALL_CHUNK}": {
            "rerun_ratio_vs_first": round(side["wall_s"] / first["wall_s"], 4),
            "wall_s": side["wall_s"],
            "cpu_ms_per_row": round(1000 * side["cpu_s"] / rows, 3),
            "s3_requests_per_row": side["s3"]["per_row"],
            "phases_s": side.get("phases"),
            "checks": "ok" if ok else f"calls {side['provider_calls']}, lake {side['lake']}",
        }
    }


def main(argv: list[str] | None = None) -> int:
    from bench.run import (
        EMULATOR_KEY,
        WARMUP_ROWS,
        Emulator,
        PrefectServer,
        child_env,
        clean_up,
        code_digest,
        git_state,
        machine_facts,
        warm_up_server,
    )

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--chunk-size", type=int, default=CHUNK)
    parser.add_argument("--out", type=Path, help="default: bench/results/<scenario>.json")
    parser.add_argument(
        "--merge", action="store_true", help="also write it into bench/results/latest.json"
    )
    parser.add_argument("--keep-tmp", action="store_true")
    parser.add_argument(
        "--memory-only",
        type=float,
        metavar="LATENCY_S",
        help="our flow alone (first run, rerun) at this emulator latency: peak memory only",
    )
    args = parser.parse_args(argv)

    key = scenario_key(args.rows)
    out = args.out or REPO / "bench" / "results" / f"{key}.json"
    started, t0 = datetime.now(UTC), time.perf_counter()
    git_at_start, code_at_start = git_state(), code_digest()
    tmp = Path(tempfile.mkdtemp(prefix="tryon-s3scale-"))
    log(f"work dir {tmp}")
    base_env = child_env(drop=("CHANGECLOTHES_API_KEY",))
    emulator = server = None
    try:
        people, garments = data.make_inputs(tmp / "inputs")
        manifests = {
            n: data.write_manifest(tmp / "inputs" / f"manifest-{n}.csv", people, garments, n)
            for n in {WARMUP_ROWS, args.rows}
        }
        emulator = Emulator(tmp, base_env, latency_s=LATENCY_S)
        server = PrefectServer(tmp, base_env)
        flow_env = {
            **base_env,
            "TRYON_CHANGECLOTHES_BASE_URL": emulator.url,
            "CHANGECLOTHES_API_KEY": EMULATOR_KEY,
            "PREFECT_API_URL": server.api_url,
            "PREFECT_HOME": str(server.home),
        }
        ctx: dict[str, Any] = {
            "tmp": tmp,
            "env": base_env,
            "flow_env": flow_env,
            "manifests": manifests,
            "concurrency": CONCURRENCY,
            "chunk_size": args.chunk_size,
        }
        warmup = warm_up_server(ctx, server)
        if args.memory_only is not None:
            key += "_memory"
            out = args.out or REPO / "bench" / "results" / f"{key}.json"
            result = memory_check(ctx, emulator, args.rows, latency_s=args.memory_only)
        else:
            result = s3_scenario(ctx, emulator, args.rows, chunk_size=args.chunk_size)
        result["servers"] = {"prefect_server_warmup": warmup}
    finally:
        clean_up(tmp, keep=args.keep_tmp, children=(server, emulator), say=log)
    result["load_avg"] = Path("/proc/loadavg").read_text().split()[:3]
    report = {
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_facts(),
        "git": {"at_start": git_at_start, "at_end": git_state()},
        "code_changed_during_run": code_at_start != code_digest(),
        "harness_wall_s": round(time.perf_counter() - t0, 1),
        key: result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    if args.merge:
        latest = REPO / "bench" / "results" / "latest.json"
        merged = json.loads(latest.read_text()) if latest.exists() else {}
        merged[key] = {**result, "date_utc": report["date_utc"], "git": report["git"]}
        latest.write_text(json.dumps(merged, indent=2) + "\n")
        log(f"merged {key} into {latest}")
    if args.memory_only is None:
        print(summary_lines(result))
    return 0


def summary_lines(result: dict[str, Any]) -> str:
    per = result["s3_requests_per_row"]
    return "\n".join(
        [
            f"s3  ratio_vs_plain        {result['ratio_vs_plain']}  (target >= 0.90)",
            f"s3  rerun_ratio_vs_first  {result['rerun_ratio_vs_first']}  (target <= 0.05)",
            f"s3  peak_rss_mb           {result['peak_rss_mb']}  (target < 1024)",
            f"s3  requests/row first    {per['flow_first']}",
            f"s3  requests/row rerun    {per['flow_rerun']}",
            f"s3  requests/row plain    {per['plain']}",
            f"s3  checks                {result['checks']}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
else:
    from bench.run import register

    register(
        "s3_100k",
        lambda ctx, emulator, server: s3_scenario(ctx, emulator, 2000 if ctx["quick"] else ROWS),
    )
