"""What a user waits for (``make bench-cli``): the wall time of ``tryon run`` on the sample.

The command is the one ``make demo`` runs (``tryon run sample/manifest.csv --emulator
--provider changeclothes --allow-row-errors``), in a fresh process each time, as a user types
it: no ``PREFECT_API_URL``, so the CLI uses the local Prefect server of its Prefect home and
starts it when it is not running. Each run writes a lake of its own, so every flow does the
same work (8 provider calls, one invalid row). Three kinds of run, each repeated:

* ``first_fresh_home``: a new Prefect home (a fresh clone on a new machine, CI's ``make
  demo``): the server's start includes creating and migrating its database;
* ``first_after_stop``: the home's database exists, its server is stopped (``tryon server
  stop``, a reboot);
* ``later``: the server is running; the command reuses it;
* with ``--baseline REF``, ``baseline``: the same command with the code of a git revision
  (exported to a temporary folder), e.g. the one before the local server, whose every command
  started and stopped a server of its own (its home's database already created by one
  unmeasured run).

Against each command's wall time stands the flow's own duration (``duration_s`` in
``<lake>/runs/<id>/summary.json``): the difference is what the command adds around the flow
(interpreter and imports, the server, the emulator, the flow run's creation and end). Medians
over the repetitions; every run is kept in ``bench/results/cli.json`` with the machine, the
commit and the load average (other work on the machine shows in the wall times).

The server listens on a free port (not Prefect's 4200: a machine running the benchmark may run
a server there), and every server is stopped before the harness exits.

    python -m bench.cli [--reps N] [--later N] [--baseline REF] [--out PATH] [--keep-tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs
from bench.run import git_state, machine_facts
from flows.local_server import read_state, stop_server

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample"
DEFAULT_OUT = REPO / "bench" / "results" / "cli.json"
COMMAND = ["run", "sample/manifest.csv", "--emulator", "--provider", "changeclothes"]
COMMAND_TIMEOUT_S = 600.0


def log(message: str) -> None:
    print(f"[bench-cli {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def user_env(home: Path, code: Path = REPO) -> dict[str, str]:
    """A user's shell with this Prefect home: no PREFECT_API_URL, no provider key."""
    drop = ("PREFECT_", "TRYON_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.pop("CHANGECLOTHES_API_KEY", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_PORT=str(procs.free_port()),
        PYTHONPATH=str(code),
    )
    return env


def export_revision(ref: str, into: Path) -> str:
    """The tree of git revision ``ref`` in ``into`` (read-only for the repository)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit


def one_run(work: Path, env: dict[str, str], name: str) -> dict[str, Any]:
    """One ``tryon run`` to its end: wall time, the flow's duration, whether it started the
    server."""
    lake = work / f"lake-{name}"
    argv = [sys.executable, "-m", "flows.cli", *COMMAND, "--lake", str(lake), "--allow-row-errors"]
    started = time.perf_counter()
    done = subprocess.run(
        argv, cwd=work, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    (summary_path,) = lake.glob("runs/*/summary.json")
    summary = json.loads(summary_path.read_text())
    if summary["counts"] != {"invalid": 1, "succeeded": 8}:
        raise RuntimeError(f"{name}: unexpected outcome {summary['counts']}")
    return {
        "wall_s": round(wall_s, 3),
        "flow_duration_s": summary["duration_s"],
        "outside_flow_s": round(wall_s - summary["duration_s"], 3),
        "started_server": "Starting the local Prefect server" in done.stderr,
        "load_1min": round(os.getloadavg()[0], 2),
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall_s", "flow_duration_s", "outside_flow_s")
    figures: dict[str, Any] = {
        f"median_{key}": round(statistics.median(run[key] for run in runs), 3) for key in keys
    }
    figures["median_wall_over_flow"] = round(
        figures["median_wall_s"] / figures["median_flow_duration_s"], 1
    )
    figures["runs"] = runs
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of each 'first' kind")
    parser.add_argument("--later", type=int, default=7, help="runs on a running server")
    parser.add_argument("--baseline", metavar="REF", help="also measure this git revision")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args(argv)

    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    shutil.copytree(SAMPLE, tmp / "sample")
    homes: list[Path] = []
    kinds: dict[str, list[dict[str, Any]]] = {
        "first_fresh_home": [],
        "first_after_stop": [],
        "later": [],
    }
    load_at_start = os.getloadavg()
    baseline_commit = None
    try:
        if args.baseline:
            code = tmp / "baseline-code"
            baseline_commit = export_revision(args.baseline, code)
            env = user_env(tmp / "prefect-home-baseline", code)
            one_run(tmp, env, "baseline-warm-up")  # creates its database: not measured
            kinds["baseline"] = []
            for n in range(args.later):
                baseline = one_run(tmp, env, f"baseline-{n}")
                log(f"baseline run {n}: {baseline}")
                kinds["baseline"].append(baseline)
        for rep in range(args.reps):
            home = tmp / f"prefect-home-{rep}"
            homes.append(home)
            env = user_env(home)
            fresh = one_run(tmp, env, f"fresh-{rep}")
            log(f"first run, fresh home {rep}: {fresh}")
            kinds["first_fresh_home"].append(fresh)
            if rep == 0:
                for n in range(args.later):
                    later = one_run(tmp, env, f"later-{n}")
                    log(f"later run {n}: {later}")
                    kinds["later"].append(later)
            stop_server(home)
            after_stop = one_run(tmp, env, f"after-stop-{rep}")
            log(f"first run after a stop {rep}: {after_stop}")
            kinds["first_after_stop"].append(after_stop)
            state = read_state(home)
            stop_server(home)
            if state is None:
                raise RuntimeError("no server state after a run")
    finally:
        for home in homes:
            stop_server(home)
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    for name, runs in kinds.items():
        expect_start = name.startswith("first")
        if name != "baseline" and any(run["started_server"] != expect_start for run in runs):
            raise RuntimeError(f"{name}: a run did not start the server as it should have")
    results = {name: medians(runs) for name, runs in kinds.items()}
    report: dict[str, Any] = {
        "date_utc": started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "tryon " + " ".join([*COMMAND, "--lake", "<lake>", "--allow-row-errors"]),
        "machine": machine_facts(),
        "git": git_state(),
        "baseline_revision": (
            {"ref": args.baseline, "commit": baseline_commit} if args.baseline else None
        ),
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        **results,
        "harness_wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    for name in kinds:
        figures = results[name]
        print(
            f"{name:<18} wall {figures['median_wall_s']:6.2f} s   flow "
            f"{figures['median_flow_duration_s']:5.2f} s   outside the flow "
            f"{figures['median_outside_flow_s']:6.2f} s  (median of {len(kinds[name])})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
