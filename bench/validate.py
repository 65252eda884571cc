"""Manifest validation at scale (``make bench-validate``): ``tryon validate`` against reading.

Writes a 1,000,000-row CSV manifest (http(s) and s3 URLs, relative and absolute local paths
over a few hundred real files, data URIs, prompts, descriptions, case and whitespace variants;
about 3% invalid rows of every kind, missing local files included), then measures, each in a
fresh process, interleaved and repeated (the best run counts; the machine is shared):

* ``read_csv``: ``pl.read_csv`` of the file, every column as text: the baseline;
* ``core``: what ``tryon validate MANIFEST`` computes (``load_manifest`` with local files
  checked), timed inside the process;
* ``core_provider``: the same plus the run's plan for a provider (``--provider --refine``);
* ``cli`` / ``cli_provider``: the command end to end (interpreter, imports, output to a file),
  and ``cli_floor``: ``tryon --help``, what any command costs before it starts;
* ``core_plan`` / ``cli_plan``: ``tryon plan`` with the same options, against a lake whose one
  committed run already did a third of the rows (``flows.estimate.estimate_for``: the plan,
  the prices, the lake's records read and matched to every row), inside the process and end
  to end.

Peak RSS is each process's own high-water mark (``ru_maxrss``, from ``wait4``). Writes
``bench/results/validate.json`` with the figures and the ratio against ``read_csv``.

    python -m bench.validate [--rows N] [--runs K] [--out PATH] [--keep-tmp]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.manifest import KNOWN_COLUMNS

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TARGETS = {
    "core_ratio_vs_read_csv_max": 3.0,
    "core_peak_rss_mb_max": 1024.0,
    # "tryon plan ... in at most a few times the time of tryon validate on it"
    "plan_ratio_vs_validate_max": 3.0,
}
DONE_SHARE = 1 / 3  # of the valid rows, done by the bench lake's committed run
PROVIDER = "hidream"  # no prompt endpoint: prompt rows are invalid for it
HEADER = KNOWN_COLUMNS  # every column a manifest may have
PEOPLE, GARMENTS = 300, 200
INVALID_SHARE = 0.03


def log(message: str) -> None:
    print(f"[bench.validate {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the manifest


def _image(rng: random.Random, kind: str, count: int, root: Path) -> str:
    k = rng.randrange(count)
    draw = rng.random()
    if draw < 0.45:
        return f"https://cdn.example.com/{kind}/{k:05d}.jpg?v={k % 7}"
    if draw < 0.75:
        return f"{kind}/{k:05d}.jpg"  # relative to the manifest
    if draw < 0.85:
        return str(root / kind / f"{k:05d}.jpg")
    if draw < 0.95:
        return f"s3://bucket/{kind}/{k:05d}.jpg"
    if draw < 0.99:
        return f"HTTP://cdn.example.com/{kind}/{k:05d}.jpg"
    return "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNg"


# Every kind of invalid row (and a few unusual valid ones), written over a good row.
def _spoil(row: dict[str, str], kind: int, i: int) -> None:
    match kind:
        case 0:
            row["id"] = ""
        case 1:
            row["id"] = f"../escape-{i}"
        case 2:
            row["id"] = f"row-{i - 1:07d}"  # the row before's id
        case 3:
            row["person_image"] = f"ftp://files.example.com/p{i}.jpg"
        case 4:
            row["garment_image"] = f"simplecache::https://cdn.example.com/g{i}.jpg"
        case 5:
            row["person_image"] = f"http:/cdn.example.com/p{i}.jpg"
        case 6:
            row["category"] = "shoes"
        case 7:
            row["category"] = ""
        case 8:
            row["gender"] = "robot"
        case 9:
            row["provider"] = "acme"
        case 10:
            row["person_image"] = f"people/{i}\tx.jpg"  # a control character
        case 11:
            row["garment_image"] = "data:text/plain;base64,aGk="
        case 12:
            row.update(garment_image="", category="", prompt="", lower_garment_image="")
        case 13:
            row["prompt"] = "tuck \x00 in"
        case 14:
            row.update(garment_image="", category="", lower_garment_image="lower/1.jpg")
        case 15:
            row["person_image"] = ""
        case 16:
            row["person_image"] = f"people/missing-{i}.jpg"  # no such file
        case 17:
            row["provider"] = "changeclothes"
            row["lower_garment_image"] = "https://cdn.example.com/lower/1.jpg"  # not taken
        case _:
            row["id"] = f"row-{i:07d} "  # fine once stripped


KINDS = 19


def write_manifest(path: Path, rows: int, seed: int = 7) -> dict[str, Any]:
    """The manifest and the local images it names; what it holds, counted."""
    root = path.parent
    for kind, count in (("people", PEOPLE), ("garments", GARMENTS)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            (root / kind / f"{k:05d}.jpg").write_bytes(b"\xff\xd8\xff")
    rng = random.Random(seed)
    spoiled = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for i in range(rows):
            row = dict.fromkeys(HEADER, "")
            row["id"] = f"row-{i:07d}"
            row["person_image"] = _image(rng, "people", PEOPLE, root)
            if rng.random() < 0.06:
                row["prompt"] = f"a {rng.choice(['red', 'blue', 'green'])} summer dress, look {i}"
            else:
                row["garment_image"] = _image(rng, "garments", GARMENTS, root)
                row["category"] = rng.choice(["upper_body"] * 6 + ["lower_body", "dresses"])
                if rng.random() < 0.02:
                    row["category"] = row["category"].upper()
            if rng.random() < 0.4:
                row["garment_description"] = f"cotton tee, size {rng.choice('SMLX')}"
            # A refined run needs a gender: most rows have one.
            row["gender"] = rng.choice(["woman", "man", "female", "M"] * 5 + [""])
            if rng.random() < 0.05:
                row["provider"] = rng.choice(["changeclothes", "hidream"])
            if i and rng.random() < INVALID_SHARE:
                _spoil(row, rng.randrange(KINDS), i)
                spoiled += 1
            writer.writerow(row.values())
    return {"rows": rows, "spoiled_rows": spoiled, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------ measurements


def child(what: str, manifest: str) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import polars as pl

    if what == "make_lake":  # here, not in the harness: its peak RSS would pass to children
        return {"done": write_done_lake(Path(manifest))}
    if what == "read_csv":
        t0, c0 = time.perf_counter(), time.process_time()
        frame = pl.read_csv(manifest, infer_schema=False)
        s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        return {"s": s, "cpu_s": cpu_s, "rows": frame.height}
    from providers.registry import PROVIDERS
    from tasks.manifest import load_manifest
    from tasks.plan import plan_run

    if what == "core_plan":
        from flows.estimate import estimate_for
        from flows.params import BatchParams

        params = BatchParams(
            manifest=manifest, lake=_lake_of(manifest), provider=PROVIDER, refine=True
        )
        t0, c0 = time.perf_counter(), time.process_time()
        estimate = estimate_for(params)
        s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        done = int(estimate.lines["done"].sum())
        return {"s": s, "cpu_s": cpu_s, "calls": estimate.calls, "done": done}
    t0, c0 = time.perf_counter(), time.process_time()
    report = load_manifest(manifest, known_providers=sorted(PROVIDERS), check_files=True)
    invalid = len(report.invalid)
    if what == "core_provider":
        plan = plan_run(report, default_provider=PROVIDER, refine=True)
        invalid = len(plan.invalid)
    s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"s": s, "cpu_s": cpu_s, "rows": report.n_rows, "invalid": invalid}


def _lake_of(manifest: str) -> str:
    return str(Path(manifest).with_name("lake"))


def write_done_lake(manifest: Path) -> int:
    """A lake with one committed run that did a third of the manifest's valid rows (their
    try-on and refine records, with the requests as a run records them). Returns how many."""
    import polars as pl

    from providers.registry import PROVIDERS
    from schemas.results import METADATA_SCHEMA
    from tasks.estimate import REQUEST
    from tasks.lake import Lake
    from tasks.manifest import load_manifest
    from tasks.plan import plan_run

    report = load_manifest(str(manifest), known_providers=sorted(PROVIDERS), check_files=True)
    rows = plan_run(report, default_provider=PROVIDER, refine=True).rows_by_provider[PROVIDER]
    requests = rows.frame(REQUEST)
    done = requests.head(int(requests.height * DONE_SHARE))
    tryon = done.with_columns(
        run_id=pl.lit("bench-run"),
        stage=pl.lit("tryon"),
        provider=pl.lit(PROVIDER),
        status=pl.lit("succeeded"),
        attempts=pl.lit(1, pl.Int32()),
        provider_ms=pl.lit(2500.0),
    )
    refined = tryon.with_columns(
        stage=pl.lit("refine"), provider=pl.lit("ailab_refiner"), coarse_provider=pl.lit(PROVIDER)
    )
    both = pl.concat([tryon, refined], how="diagonal")
    frame = both.select(
        pl.col(c).cast(t) if c in both.columns else pl.lit(None, t).alias(c)
        for c, t in METADATA_SCHEMA.items()
    )
    lake = Lake.open(_lake_of(str(manifest)))
    staged = Path(lake.run_path("bench-run", "parts"))  # commit_run publishes these
    staged.mkdir(parents=True)
    frame.write_parquet(staged / "part-bench.parquet")
    lake.commit_run("bench-run", {"run_id": "bench-run"})
    return done.height


def measure(argv: list[str], stdout: Path) -> dict[str, Any]:
    """Run ``argv`` to completion: wall time, CPU, exit status, peak RSS, its BENCH_RESULT."""
    stderr = stdout.with_suffix(".err")
    with stdout.open("wb") as out, stderr.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = {
        "wall_s": wall,
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "exit": proc.returncode,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }
    for line in stdout.read_text(errors="replace").splitlines()[-3:]:
        if line.startswith("BENCH_RESULT "):
            result |= json.loads(line.removeprefix("BENCH_RESULT "))
    if proc.returncode not in (0, 1):  # 1: the manifest has invalid rows, as it should
        tail = stderr.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{argv}: exit {proc.returncode}\n{tail}")
    return result


def scenarios(manifest: Path) -> dict[str, list[str]]:
    own = [PY, "-m", "bench.validate", "--child"]
    cli = [PY, "-m", "flows.cli"]
    return {
        "read_csv": [*own, "read_csv", str(manifest)],
        "core": [*own, "core", str(manifest)],
        "core_provider": [*own, "core_provider", str(manifest)],
        "cli": [*cli, "validate", str(manifest)],
        "cli_provider": [*cli, "validate", str(manifest), "--provider", PROVIDER, "--refine"],
        "core_plan": [*own, "core_plan", str(manifest)],
        "cli_plan": [
            *[*cli, "plan", str(manifest), "--provider", PROVIDER, "--refine"],
            *["--lake", _lake_of(str(manifest))],
        ],
        "cli_floor": [*cli, "--help"],
    }


def summarise(runs: list[dict[str, Any]], timed_inside: bool) -> dict[str, Any]:
    """Best (the machine is shared: the least disturbed run) and median of the runs; CPU is
    the measured step's own for steps timed inside their process, else the process's."""
    times = [r["s" if timed_inside else "wall_s"] for r in runs]
    cpu = [r["cpu_s" if timed_inside else "process_cpu_s"] for r in runs]
    return {
        "s_best": round(min(times), 3),
        "s_median": round(statistics.median(times), 3),
        "s_runs": [round(t, 3) for t in times],
        "cpu_s_best": round(min(cpu), 3),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        **{k: runs[-1][k] for k in ("rows", "invalid", "exit", "calls", "done") if k in runs[-1]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="default: bench/results/validate.json")
    parser.add_argument("--keep-tmp", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "MANIFEST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.child:
        print("BENCH_RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0

    from bench.run import code_digest, git_state, machine_facts

    out_path = args.out or REPO / "bench" / "results" / "validate.json"
    started, t_start = datetime.now(UTC), time.perf_counter()
    git_at_start, code_at_start = git_state(), code_digest()
    tmp = Path(tempfile.mkdtemp(prefix="tryon-bench-validate-"))
    try:
        manifest = tmp / "manifest.csv"
        log(f"writing {args.rows} rows to {manifest}")
        written = write_manifest(manifest, args.rows)
        made = measure(
            [PY, "-m", "bench.validate", "--child", "make_lake", str(manifest)], tmp / "lake.out"
        )
        written["done_in_lake"] = made["done"]
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.runs):  # interleaved: a busy spell hits every scenario alike
            for name, command in scenarios(manifest).items():
                runs.setdefault(name, []).append(measure(command, tmp / f"{name}.out"))
            log(
                f"round {round_ + 1}/{args.runs}: "
                + ", ".join(
                    f"{name} {r[-1].get('s', r[-1]['wall_s']):.2f} s" for name, r in runs.items()
                )
            )
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results: dict[str, Any] = {
        name: summarise(r, timed_inside=name.startswith(("read", "core")))
        for name, r in runs.items()
    }
    read = results["read_csv"]
    ratios = {
        f"{name}_vs_read_csv": round(results[name]["s_best"] / read["s_best"], 2)
        for name in ("core", "core_provider", "cli", "cli_provider")
    }
    ratios["core_plan_vs_core_provider"] = round(
        results["core_plan"]["s_best"] / results["core_provider"]["s_best"], 2
    )
    ratios["cli_plan_vs_cli_provider"] = round(
        results["cli_plan"]["s_best"] / results["cli_provider"]["s_best"], 2
    )
    ratios["core_cpu_vs_read_csv_cpu"] = round(
        results["core"]["cpu_s_best"] / read["cpu_s_best"], 2
    )
    report = {
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "manifest": written,
        "provider_options": ["--provider", PROVIDER, "--refine"],
        "targets": TARGETS,
        **results,
        "ratios": ratios,
        "verdicts": {
            "core_within_3x_read_csv": ratios["core_vs_read_csv"]
            <= TARGETS["core_ratio_vs_read_csv_max"],
            "core_under_1gib": results["core"]["peak_rss_mb"] < TARGETS["core_peak_rss_mb_max"],
            "plan_within_3x_validate": ratios["cli_plan_vs_cli_provider"]
            <= TARGETS["plan_ratio_vs_validate_max"],
        },
        "machine": machine_facts(),
        "git": {"at_start": git_at_start, "at_end": git_state()},
        "code_changed_during_run": code_at_start != code_digest(),
        "harness_wall_s": round(time.perf_counter() - t_start, 1),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_path}")
    for name in results:
        r = results[name]
        print(
            f"{name:14s} best {r['s_best']:7.3f} s  median {r['s_median']:7.3f} s  "
            f"peak RSS {r['peak_rss_mb']:7.1f} MB"
        )
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
