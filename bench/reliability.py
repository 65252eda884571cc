"""The fault suite (``make reliability``): our flow against the emulator's injected faults.

Four scenarios, each with its own emulator (``tryon emulator --fast-mode --fault ...``) and its
own lake, against one real ``prefect server start`` (the only kind that reclaims a killed run's
global-concurrency lease):

* ``sync_faults``: 1,000 rows of distinct work on ChangeClothes (sync) with ~10% of calls
  faulted: HTTP 503, 429 with Retry-After, calls that hang (the client's own timeout ends them).
* ``async_faults``: the same rows on HiDream (submit, then poll) with 503, 429 and hangs on
  every call (submissions and polls) plus async jobs that end failed or moderated.
* ``credits``: ChangeClothes with credits for N calls: a run-fatal error mid-run. Then the
  credits are topped up and the same manifest rerun into the same lake.
* ``sigkill``: HiDream with 503/429 faults; the flow's process is SIGKILLed once some rows are
  done and some jobs accepted, then the same manifest is rerun into the same lake.

Figures come from the committed metadata (``pl.scan_parquet(<lake>/metadata/**/*.parquet)``)
and from the emulator's call log (``GET /_emulator/calls``: route, status, injected fault and
timing of every call) and job counts (``job_contents`` in its stats: submissions per request
content). Writes ``bench/results/reliability.json``.

    python -m bench.reliability [--rows N] [--out PATH] [--keep-tmp] [--sequential]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from bench import data, procs
from bench.run import (
    PY,
    REPO,
    PrefectServer,
    child_env,
    clean_up,
    code_digest,
    git_state,
    machine_facts,
    run_child,
)
from emulator.control import EmulatorCall, EmulatorControl, EmulatorStats
from emulator.keys import accepted_keys

IN_FLIGHT = 32
# Rows per Prefect task. Not the flow's default (100) on purpose: the flow keeps two chunks in
# progress and a chunk ends with its slowest row, so each hung call (cut at the client's 120 s
# timeout) holds back its chunk and the next ones; at 100 rows a chunk the sync scenario took
# ~12 minutes (bench/README.md, "Reliability"). With 500, all rows are in reach of the 32 slots.
CHUNK_SIZE = 500
LATENCY_S = 0.2
LEASE_DURATION_S = 60  # the server's minimum: a killed run's slots come back after this
SEED = 11
# The provider clients' own per-request timeouts (their ``from_env`` defaults: no setting
# changes them, see the README section). A hanging call is cut by the client after this.
CLIENT_TIMEOUT_S = {"changeclothes": 120.0, "hidream": 60.0}
HANG_S = 600  # the emulator's hang: longer than any client timeout, so the client's fires

SUBMIT = "POST /api-pub/ec/v3/image/vton/async"
POLL = "GET /api-pub/ec/v3/image/vton/async/results"
GARMENT = "POST /api/openapi/change-clothes-ai"

SCENARIO_FAULTS: dict[str, dict[str, Any]] = {
    "sync_faults": {
        "provider": "changeclothes",
        "faults": {
            "timeout_rate": 0.03,
            "timeout_s": HANG_S,
            "error_rate_429": 0.035,
            "retry_after_s": 1,
            "error_rate_5xx": 0.04,
        },
    },
    "async_faults": {
        "provider": "hidream",
        "faults": {
            "timeout_rate": 0.02,
            "timeout_s": HANG_S,
            "error_rate_429": 0.03,
            "retry_after_s": 1,
            "error_rate_5xx": 0.03,
            "async_failure_rate": 0.03,
        },
    },
    "credits": {"provider": "changeclothes", "faults": {"credits": 300}},  # 30% of the rows
    "sigkill": {
        "provider": "hidream",
        "faults": {"error_rate_429": 0.03, "retry_after_s": 1, "error_rate_5xx": 0.03},
    },
}

CHUNK_SIZES = [CHUNK_SIZE]  # set from --chunk-size
_log_lock = threading.Lock()


def log(message: str) -> None:
    with _log_lock:
        print(f"[reliability {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- emulator


class FaultyEmulator:
    """``tryon emulator --fast-mode`` with a fault plan given as ``--fault`` options."""

    def __init__(self, tmp: Path, env: dict[str, str], name: str, provider: str, faults: dict):
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [PY, "-m", "flows.cli", "emulator", "--port", str(self.port), "--fast-mode"]
        argv += ["--seed", str(SEED), "--fault", f"{provider}.latency_s={LATENCY_S}"]
        for field, value in faults.items():
            argv += ["--fault", f"{provider}.{field}={json.dumps(value)}"]
        self.argv = argv[2:]
        self.proc = procs.spawn(argv, env=env, cwd=REPO, log=tmp / f"emulator-{name}.log")
        self.control = EmulatorControl(self.url)
        procs.wait_http_ok(self.control.stats_url, timeout_s=60, proc=self.proc)

    def stop(self) -> None:
        self.control.close()
        procs.stop(self.proc)


# ---------------------------------------------------------------------------------- the flow


def flow_argv(manifest: Path, lake: Path, provider: str) -> list[str]:
    argv = [PY, "-m", "bench.drive_flow", str(manifest), str(lake), "--provider", provider]
    return [*argv, "--max-in-flight", str(IN_FLIGHT), "--chunk-size", str(CHUNK_SIZES[0])]


def flow_env(ctx: dict[str, Any], emulator: FaultyEmulator, provider: str) -> dict[str, str]:
    return {**ctx["flow_env"], f"TRYON_{provider.upper()}_BASE_URL": emulator.url}


def run_flow(
    ctx: dict[str, Any], emulator: FaultyEmulator, provider: str, lake: Path, name: str
) -> dict[str, Any]:
    """One run of the flow to its end; its BENCH_RESULT (summary figures) and wall time."""
    t0 = time.perf_counter()
    log(f"{name}: flow on {provider}")
    result, _ = run_child(
        flow_argv(ctx["manifest"], lake, provider),
        env=flow_env(ctx, emulator, provider),
        log_path=ctx["tmp"] / f"{name}.log",
        what=name,
    )
    keep = (
        "rows",
        "succeeded",
        "counts",
        "provider_calls",
        "wall_s",
        "run_id",
        "error",
        "fatal_at_unix",
    )
    out = {k: result.get(k) for k in keep}
    out["harness_wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: {out['counts']} in {out['harness_wall_s']} s")
    return out


# ----------------------------------------------------------------------------------- figures


def metadata(lake: Path) -> pl.DataFrame:
    """The committed metadata dataset, as a reader sees it."""
    if not any((lake / "metadata").rglob("*.parquet")):
        return pl.DataFrame()
    return pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()


def row_figures(frame: pl.DataFrame, rows_total: int) -> dict[str, Any]:
    """Rows done, failed for good, duplicates: from the committed metadata."""
    tryon = frame.filter(pl.col("stage") == "tryon") if frame.height else frame
    # Raw: (row, stage) pairs with more than one committed record. The product keeps a failed
    # or skipped record as history when a later run does the row (README, "Reruns never pay
    # twice"), so after such a rerun those count here; the same outcome twice never should.
    dupes = (
        frame.group_by("row_id", "stage").len().filter(pl.col("len") > 1) if frame.height else frame
    )
    same_outcome = (
        frame.group_by("row_id", "stage", "status").len().filter(pl.col("len") > 1)
        if frame.height
        else frame
    )
    if not tryon.height:
        return {
            "rows_total": rows_total,
            "rows_done": 0,
            "duplicate_row_stage_records": 0,
            "duplicate_row_stage_outcomes": 0,
        }
    # A row's outcome: succeeded if any committed record says so (there must be one record).
    done = tryon.filter(pl.col("status") == "succeeded")["row_id"].unique()
    not_done = tryon.filter(~pl.col("row_id").is_in(done.implode()))
    permanent = not_done.filter(pl.col("error_kind") == "permanent")
    status = Counter(tryon["status"].to_list())
    codes = Counter(
        f"{r['status']}:{r['error_kind']}:{r['error_code']}"
        for r in not_done.select("status", "error_kind", "error_code").iter_rows(named=True)
    )
    return {
        "rows_total": rows_total,
        "rows_recorded": tryon["row_id"].n_unique(),
        "rows_done": done.len(),
        "rows_failed_permanently": permanent["row_id"].n_unique(),
        "rows_not_done_by_outcome": dict(sorted(codes.items())),
        "records_by_status": dict(sorted(status.items())),
        "records_reused_from_an_earlier_run": tryon["reused_from_run"].drop_nulls().len(),
        "duplicate_row_stage_records": dupes.height,
        "duplicate_row_stage_outcomes": same_outcome.height,
        "duplicate_succeeded_records": same_outcome.filter(pl.col("status") == "succeeded").height
        if same_outcome.height
        else 0,
    }


def call_figures(calls: list[EmulatorCall], provider: str) -> dict[str, Any]:
    """Provider calls from the emulator's log, by route, status and injected fault."""
    ours = [c for c in calls if c.provider == provider]
    by_route: dict[str, Any] = {}
    for route in sorted({c.route for c in ours}):
        these = [c for c in ours if c.route == route]
        by_route[route] = {
            "calls": len(these),
            "by_status": dict(sorted(Counter(str(c.status) for c in these).items())),
            "injected_faults": dict(sorted(Counter(c.fault for c in these if c.fault).items())),
        }
    downloads = [c for c in calls if c.provider is None]
    return {
        "provider_calls": len(ours),
        "injected_fault_calls": sum(1 for c in ours if c.fault),
        "by_route": by_route,
        "result_downloads": len(downloads),
        "result_downloads_not_200": sum(1 for c in downloads if c.status != 200),
    }


def sync_accounting(
    calls: list[EmulatorCall], rows_done: int, fatal_status: int | None = None
) -> dict[str, Any]:
    """Sync provider: every done row needs one successful call; every injected fault (and the
    credit-exhausted answers to calls already sent) explains one more. The rest is extra."""
    ours = [c for c in calls if c.provider == "changeclothes"]
    ok = sum(1 for c in ours if c.status == 200 and not c.fault)
    faults = sum(1 for c in ours if c.fault)
    fatal_calls, after, detail = fatal_split(ours, fatal_status)
    explained = rows_done + faults + len(fatal_calls)
    return {
        "provider_calls": len(ours),
        "needed_one_per_done_row": rows_done,
        "injected_fault_calls": faults,
        "fatal_answers_to_calls_sent_before_it": len(fatal_calls),
        "successful_calls": ok,
        "successful_calls_beyond_one_per_done_row": ok - rows_done,
        "extra_calls_not_explained_by_injected_faults": len(ours) - explained,
        **(
            {
                "calls_after_fatal_error": after,
                "calls_after_fatal_error_beyond_100ms": sum(
                    1 for d in detail if d["arrived_ms_after_first_fatal_answer"] > 100
                ),
                "calls_after_fatal_error_detail": detail,
            }
            if fatal_status is not None
            else {}
        ),
    }


def fatal_split(
    ours: list[EmulatorCall], fatal_status: int | None
) -> tuple[list[EmulatorCall], int, list[dict[str, Any]]]:
    """Calls answered with the fatal status that arrived before the first such answer left
    the emulator; the count of calls of any kind that arrived after it; and, for those, how
    long after it they arrived (the emulator logs an answer as it hands it to the server: the
    client reads it a little later)."""
    if fatal_status is None:
        return [], 0, []
    fatal = [c for c in ours if c.status == fatal_status]
    if not fatal:
        return [], 0, []
    first = min(fatal, key=lambda c: c.answered_s)
    after = [c for c in ours if c.arrived_s > first.answered_s]
    before = [c for c in fatal if c.arrived_s <= first.answered_s]
    detail = [
        {
            "arrived_ms_after_first_fatal_answer": round(
                1000 * (c.arrived_s - first.answered_s), 3
            ),
            "status": c.status,
            "fault": c.fault,
        }
        for c in after
    ]
    return before, len(after), detail


def async_accounting(calls: list[EmulatorCall], stats: EmulatorStats) -> dict[str, Any]:
    """Async provider: one accepted submission per distinct content (row of distinct work);
    injected faults on submissions explain one more each; a new submission after a job that
    ended failed is a new try (reruns only). Polls are reported, not judged."""
    ours = [c for c in calls if c.provider == "hidream"]
    submits = [c for c in ours if c.route == SUBMIT]
    polls = [c for c in ours if c.route == POLL]
    jobs = stats.job_contents
    submit_faults = sum(1 for c in submits if c.fault)
    explained = jobs.distinct_contents + submit_faults + jobs.resubmitted_after_failure
    return {
        "provider_calls": len(ours),
        "submissions": len(submits),
        "accepted_jobs": jobs.submissions,
        "distinct_job_contents": jobs.distinct_contents,
        "needed_submissions_one_per_content": jobs.distinct_contents,
        "injected_faults_on_submissions": submit_faults,
        "resubmitted_after_a_failed_job": jobs.resubmitted_after_failure,
        "accepted_jobs_resubmitted": jobs.resubmitted_accepted,
        "max_submissions_per_content": jobs.max_submissions_per_content,
        "jobs_failed_by_the_fault_plan": jobs.failing,
        "extra_submissions_not_explained_by_injected_faults": len(submits) - explained,
        "polls": len(polls),
        "injected_faults_on_polls": sum(1 for c in polls if c.fault),
        "polls_per_accepted_job": round(len(polls) / max(1, jobs.submissions), 2),
        "provider_errors": stats.provider("hidream").errors,
    }


def headline(
    rows: dict[str, Any],
    recoverable: int,
    extra_calls: int,
    resubmitted: int | None,
    after_fatal: int | None,
    rerun: str | None,
    after_fatal_100ms: int | None = None,
    *,
    after_first_fatal_answer: int | None = None,
    accepted_in_flight_at_kill: int | None = None,
) -> dict[str, Any]:
    done = rows["rows_done"]
    return {
        "rows_total": rows["rows_total"],
        "rows_done": done,
        "rows_recoverable": recoverable,
        "pct_recoverable_done": round(100.0 * done / recoverable, 2) if recoverable else None,
        "duplicate_row_stage_records": rows["duplicate_row_stage_records"],
        "duplicate_row_stage_outcomes": rows["duplicate_row_stage_outcomes"],
        "extra_calls_not_explained_by_injected_faults": extra_calls,
        "accepted_jobs_resubmitted": resubmitted,
        "accepted_in_flight_at_kill_resubmitted": accepted_in_flight_at_kill,
        "calls_after_fatal_error": after_fatal,
        "calls_answered_after_the_first_fatal_answer": after_first_fatal_answer,
        "calls_after_fatal_error_beyond_100ms": after_fatal_100ms,
        "rerun": rerun,
    }


# --------------------------------------------------------------------------------- scenarios


def start_emulator(ctx: dict[str, Any], name: str) -> FaultyEmulator:
    spec = SCENARIO_FAULTS[name]
    return FaultyEmulator(ctx["tmp"], ctx["env"], name, spec["provider"], spec["faults"])


def run_to_the_end(
    ctx: dict[str, Any], emulator: FaultyEmulator, provider: str, name: str
) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """The scenario's flow run, and one rerun if rows that could succeed did not (a transient
    failure outlived its attempts): the runs, the row figures, the rerun's note."""
    lake, rows_total = ctx["tmp"] / f"lake-{name}", ctx["rows"]
    runs = [run_flow(ctx, emulator, provider, lake, name)]
    rows = row_figures(metadata(lake), rows_total)
    if rows["rows_done"] >= rows_total - rows["rows_failed_permanently"]:
        return runs, rows, None
    runs.append(run_flow(ctx, emulator, provider, lake, f"{name}-rerun"))
    return runs, row_figures(metadata(lake), rows_total), "rerun of unfinished rows"


def sync_faults(ctx: dict[str, Any]) -> dict[str, Any]:
    name, rows_total = "sync_faults", ctx["rows"]
    emulator = start_emulator(ctx, name)
    try:
        runs, rows, rerun = run_to_the_end(ctx, emulator, "changeclothes", name)
        calls = emulator.control.calls().calls
        accounting = sync_accounting(calls, rows["rows_done"])
        return {
            "headline": headline(
                rows,
                rows_total - rows["rows_failed_permanently"],
                accounting["extra_calls_not_explained_by_injected_faults"],
                None,
                None,
                rerun,
            ),
            "provider": "changeclothes",
            "emulator_argv": emulator.argv,
            "runs": runs,
            "rows": rows,
            "calls": accounting,
            "call_log": call_figures(calls, "changeclothes"),
            "emulator_errors": emulator.control.stats().provider("changeclothes").errors,
        }
    finally:
        emulator.stop()


def async_faults(ctx: dict[str, Any]) -> dict[str, Any]:
    name, rows_total = "async_faults", ctx["rows"]
    emulator = start_emulator(ctx, name)
    try:
        runs, rows, rerun = run_to_the_end(ctx, emulator, "hidream", name)
        stats, calls = emulator.control.stats(), emulator.control.calls().calls
        accounting = async_accounting(calls, stats)
        # Permanently failed by design: the jobs the fault plan failed (emulator) must be the
        # rows recorded as failed for good (metadata), no more.
        by_design = accounting["jobs_failed_by_the_fault_plan"]
        checks = {
            "rows_failed_permanently_equal_jobs_failed_by_plan": rows["rows_failed_permanently"]
            == by_design
        }
        return {
            "headline": headline(
                rows,
                rows_total - by_design,
                accounting["extra_submissions_not_explained_by_injected_faults"],
                accounting["accepted_jobs_resubmitted"],
                None,
                rerun,
            ),
            "provider": "hidream",
            "emulator_argv": emulator.argv,
            "runs": runs,
            "rows": rows,
            "calls": accounting,
            "call_log": call_figures(calls, "hidream"),
            "checks": checks,
        }
    finally:
        emulator.stop()


def credits(ctx: dict[str, Any]) -> dict[str, Any]:
    name, rows_total = "credits", ctx["rows"]
    spec = SCENARIO_FAULTS[name]
    emulator = start_emulator(ctx, name)
    try:
        lake = ctx["tmp"] / f"lake-{name}"
        first = run_flow(ctx, emulator, "changeclothes", lake, name)
        frame1 = metadata(lake)
        rows1 = row_figures(frame1, rows_total)
        log1 = emulator.control.calls()
        calls1 = log1.calls
        acc1 = sync_accounting(calls1, rows1["rows_done"], fatal_status=402)
        # The must-show figure: calls that reached the provider after the run had learnt of
        # the fatal error (the flow records when: RunSummary.fatal_at). Calls the emulator
        # answered with the fatal code a few ms after its first such answer were sent before
        # that answer reached the flow: reported beside it.
        learnt = first.get("fatal_at_unix")
        acc1["calls_after_the_run_learnt_of_the_fatal_error"] = (
            sum(
                1
                for c in calls1
                if c.provider == "changeclothes" and log1.clock0_unix + c.arrived_s > learnt
            )
            if learnt is not None
            else None
        )
        if learnt is not None:
            fatal = [c for c in calls1 if c.provider == "changeclothes" and c.status == 402]
            first_answer = log1.clock0_unix + min(c.answered_s for c in fatal) if fatal else None
            acc1["run_learnt_ms_after_first_fatal_answer"] = (
                round(1000 * (learnt - first_answer), 3) if first_answer else None
            )
            acc1["arrived_ms_after_the_run_learnt"] = sorted(
                round(1000 * (log1.clock0_unix + c.arrived_s - learnt), 3)
                for c in calls1
                if c.provider == "changeclothes" and log1.clock0_unix + c.arrived_s > learnt
            )
        tryon1 = frame1.filter(pl.col("stage") == "tryon")
        skipped = tryon1.filter(pl.col("status") == "skipped")
        refused_rows = tryon1.filter(
            (pl.col("status") == "failed") & (pl.col("error_kind") == "fatal")
        )
        not_attempted = {
            "skipped_records": skipped.height,
            "skipped_with_attempts_0": skipped.filter(pl.col("attempts") == 0).height,
            "skipped_error_kinds": sorted(set(skipped["error_kind"].drop_nulls().to_list())),
            "skipped_error_codes": sorted(set(skipped["error_code"].drop_nulls().to_list())),
            "skipped_message_example": skipped["error_message"].head(1).to_list(),
            "rows_refused_by_the_fatal_answer": refused_rows.height,
            # Every row either made calls (succeeded, or was refused) or is recorded skipped.
            "rows_that_reached_the_provider": acc1["successful_calls"]
            + sum(1 for c in calls1 if c.provider == "changeclothes" and c.status == 402),
        }
        not_attempted["skipped_equals_rows_that_never_reached_the_provider"] = (
            not_attempted["skipped_records"]
            == rows_total - not_attempted["rows_that_reached_the_provider"]
        )
        # Top the account up and rerun the same manifest into the same lake.
        seq = calls1[-1].seq if calls1 else -1
        emulator.control.set_faults("changeclothes", credits=None)
        log(f"{name}: credits topped up; rerun")
        second = run_flow(ctx, emulator, "changeclothes", lake, f"{name}-rerun")
        rows2 = row_figures(metadata(lake), rows_total)
        calls2 = emulator.control.calls(since=seq).calls
        acc2 = sync_accounting(calls2, rows2["rows_done"] - rows1["rows_done"])
        rerun_calls = acc2["provider_calls"]
        return {
            "headline": headline(
                rows2,
                rows_total,
                acc1["extra_calls_not_explained_by_injected_faults"]
                + acc2["extra_calls_not_explained_by_injected_faults"],
                None,
                acc1["calls_after_the_run_learnt_of_the_fatal_error"],
                "credits topped up, then a rerun: 100% needs it (run 1 stops at the fatal error)",
                acc1["calls_after_fatal_error_beyond_100ms"],
                after_first_fatal_answer=acc1["calls_after_fatal_error"],
            ),
            "provider": "changeclothes",
            "credits": spec["faults"]["credits"],
            "emulator_argv": emulator.argv,
            "first_run": {
                **first,
                "rows": rows1,
                "calls": acc1,
                "not_attempted": not_attempted,
                "call_log": call_figures(calls1, "changeclothes"),
            },
            "rerun": {
                **second,
                "rows": rows2,
                "calls": acc2,
                "rows_left_by_the_first_run": rows_total - rows1["rows_done"],
                "calls_for_rows_finished_by_the_first_run": rerun_calls
                - (rows_total - rows1["rows_done"]),
            },
        }
    finally:
        emulator.stop()


def _count_json(folder: Path) -> int:
    """Ledger entries under ``folder`` (sharded in sub-folders by key prefix)."""
    return sum(1 for _ in folder.rglob("*.json")) if folder.exists() else 0


def _ledger_job_ids(lake: Path) -> set[str]:
    ids = set()
    for path in (lake / "jobs").rglob("*.json"):
        try:
            ids.add(json.loads(path.read_text())["job_id"])
        except (OSError, ValueError, KeyError):
            continue  # being written or removed right now
    return ids


def sigkill(ctx: dict[str, Any]) -> dict[str, Any]:
    name, rows_total = "sigkill", ctx["rows"]
    emulator = start_emulator(ctx, name)
    kill_at_done = rows_total // 4
    try:
        lake = ctx["tmp"] / f"lake-{name}"
        argv = flow_argv(ctx["manifest"], lake, "hidream")
        env = flow_env(ctx, emulator, "hidream")
        log(f"{name}: flow on hidream, SIGKILL once {kill_at_done} rows are done")
        t0 = time.perf_counter()
        proc = procs.spawn(argv, env=env, cwd=REPO, log=ctx["tmp"] / f"{name}-killed.log")
        try:
            deadline = time.monotonic() + 600
            while not (
                _count_json(lake / "work") >= kill_at_done and _count_json(lake / "jobs") >= 5
            ):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name}: the run ended before it could be killed")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: no progress to kill in the middle of")
                time.sleep(0.25)
            kill_s = emulator.control.clock_s()  # the kill, on the emulator's call-log clock
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            procs.stop(proc)
        killed_after_s = round(time.perf_counter() - t0, 1)
        time.sleep(1.0)  # calls the dead process had sent are answered by now
        pending_jobs = _ledger_job_ids(lake)
        at_kill = {
            "killed_after_s": killed_after_s,
            "ledger_done_entries": _count_json(lake / "work"),
            "ledger_accepted_jobs": _count_json(lake / "jobs"),
            "runs_committed": len(list((lake / "runs").glob("*/_COMMITTED"))),
            "committed_metadata_files": len(list((lake / "metadata").rglob("*.parquet"))),
            "emulator_accepted_jobs": emulator.control.stats().job_contents.submissions,
        }
        log(f"{name}: killed: {at_kill}; rerun (which releases the dead run's lease as it starts)")
        second = run_flow(ctx, emulator, "hidream", lake, f"{name}-rerun")
        frame = metadata(lake)
        rows = row_figures(frame, rows_total)
        stats, calls = emulator.control.stats(), emulator.control.calls().calls
        accounting = async_accounting(calls, stats)
        recoverable = rows_total - accounting["jobs_failed_by_the_fault_plan"]
        tryon = frame.filter(pl.col("stage") == "tryon")
        resumed = tryon.filter(pl.col("request_id").is_in(sorted(pending_jobs)))
        # Submissions the emulator accepted (job created) whose answer had not left it when
        # the flow was killed: the flow never learnt those task ids, so nothing could resume
        # them. (The emulator creates the job, then answers at the end of its latency.)
        killed_submits = [
            c for c in calls if c.route == SUBMIT and c.arrived_s <= kill_s < c.answered_s
        ]
        at_kill["submissions_in_flight"] = len(killed_submits)
        at_kill["submissions_in_flight_accepted"] = sum(
            1 for c in killed_submits if c.status == 200 and not c.fault
        )
        at_kill["jobs_accepted_not_finished_in_ledger"] = len(pending_jobs)
        resumption = {
            # The dead run's accepted, unfinished jobs: each polled to its end by the rerun and
            # recorded under its original job id (no second submission).
            "jobs_pending_at_kill": len(pending_jobs),
            "rows_recorded_with_a_pending_job_id": resumed.height,
            "of_which_succeeded": resumed.filter(pl.col("status") == "succeeded").height,
            "rows_done_by_the_killed_run_adopted_by_the_rerun": rows[
                "records_reused_from_an_earlier_run"
            ],
        }
        return {
            "headline": headline(
                rows,
                recoverable,
                # The submissions in flight at the kill are explained by the kill (below).
                accounting["extra_submissions_not_explained_by_injected_faults"]
                - at_kill["submissions_in_flight_accepted"],
                # Jobs whose acceptance had reached the run (it had their ids), submitted
                # again. A submission accepted while its answer was still in flight at the
                # kill is necessarily submitted again (the run never had its id, and HiDream
                # documents no idempotency key): reported beside it.
                accounting["accepted_jobs_resubmitted"] - at_kill["submissions_in_flight_accepted"],
                None,
                "SIGKILLed run, then a rerun of the same manifest into the same lake: "
                "100% needs the rerun",
                accepted_in_flight_at_kill=at_kill["submissions_in_flight_accepted"],
            ),
            "provider": "hidream",
            "emulator_argv": emulator.argv,
            "at_kill": at_kill,
            "rerun": second,
            "resumption": resumption,
            "rows": rows,
            "calls": accounting,
            "call_log": call_figures(calls, "hidream"),
        }
    finally:
        emulator.stop()


SCENARIOS = {
    "sync_faults": sync_faults,
    "async_faults": async_faults,
    "credits": credits,
    "sigkill": sigkill,
}


# -------------------------------------------------------------------------------------- main


def verdicts(scenarios: dict[str, Any]) -> dict[str, bool]:
    heads = [s["headline"] for s in scenarios.values() if "headline" in s]
    ok = len(heads) == len(SCENARIOS)
    return {
        "all_recoverable_rows_done": ok and all(h["pct_recoverable_done"] == 100.0 for h in heads),
        "no_duplicate_outcomes": ok and all(h["duplicate_row_stage_outcomes"] == 0 for h in heads),
        # Not a verdict: a rerun keeps the earlier run's failed/skipped records as history
        # beside its own (README, "Reruns never pay twice"); no outcome is ever recorded twice.
        "no_accepted_job_resubmitted": ok
        and all(not h["accepted_jobs_resubmitted"] for h in heads),
        # No call reached the provider after the run had learnt of the fatal error.
        "no_call_after_fatal_error": ok
        and scenarios["credits"]["headline"]["calls_after_fatal_error"] == 0,
        # Allowing 100 ms for that answer to reach the flow and be read there.
        "no_call_after_fatal_error_beyond_100ms": ok
        and scenarios["credits"]["headline"]["calls_after_fatal_error_beyond_100ms"] == 0,
        "no_unexplained_extra_calls": ok
        and all(h["extra_calls_not_explained_by_injected_faults"] == 0 for h in heads),
    }


def table(scenarios: dict[str, Any]) -> str:
    cols = [
        ("rows_total", "rows"),
        ("rows_done", "done"),
        ("rows_recoverable", "recoverable"),
        ("pct_recoverable_done", "% rec. done"),
        ("duplicate_row_stage_outcomes", "dupes (same outcome)"),
        ("duplicate_row_stage_records", "(row,stage) >1 record"),
        ("extra_calls_not_explained_by_injected_faults", "extra calls"),
        ("accepted_jobs_resubmitted", "jobs resubmitted"),
        ("accepted_in_flight_at_kill_resubmitted", "in flight at kill, resubmitted"),
        ("calls_after_fatal_error", "calls after fatal"),
    ]
    lines = ["scenario      " + " | ".join(label for _, label in cols)]
    for name, result in scenarios.items():
        head = result.get("headline")
        if head is None:
            lines.append(f"{name:<13} ERROR {result.get('error', '')[:200]}")
            continue
        cells = ["-" if head[key] is None else str(head[key]) for key, _ in cols]
        lines.append(f"{name:<13} " + " | ".join(cells))
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="default: bench/results/reliability.json")
    parser.add_argument("--keep-tmp", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="some scenarios")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one scenario at a time (default: the changeclothes and hidream scenarios run "
        "side by side, two lanes, each its own emulator, lake and global limit)",
    )
    args = parser.parse_args(argv)
    CHUNK_SIZES[0] = args.chunk_size
    full = args.rows == 1000 and not args.only and args.chunk_size == CHUNK_SIZE
    # Credits for 30% of the rows: the fatal error comes mid-run.
    SCENARIO_FAULTS["credits"]["faults"]["credits"] = max(1, 3 * args.rows // 10)
    if args.out is None:  # a partial run never replaces the committed figures
        folder = REPO / "bench" / "results" if full else Path(tempfile.gettempdir())
        args.out = folder / ("reliability.json" if full else "tryon-reliability-partial.json")

    started = datetime.now(UTC)
    git_at_start, code_at_start = git_state(), code_digest()
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="tryon-reliability-"))
    log(f"work dir {tmp}")
    base_env = child_env(drop=("CHANGECLOTHES_API_KEY", "HIDREAM_API_KEY"))
    server: PrefectServer | None = None
    scenarios: dict[str, Any] = {}
    try:
        log("generating inputs")
        people, garments = data.make_inputs(tmp / "inputs")
        manifest = data.write_manifest(tmp / "inputs" / "manifest.csv", people, garments, args.rows)
        log("starting the Prefect server")
        server = PrefectServer(tmp, base_env)
        log(f"Prefect server ready after {server.ready_s:.1f} s")
        ctx: dict[str, Any] = {
            "tmp": tmp,
            "env": base_env,
            "rows": args.rows,
            "manifest": manifest,
            "flow_env": {
                **base_env,
                "PREFECT_API_URL": server.api_url,
                "PREFECT_HOME": str(server.home),
                "TRYON_LEASE_DURATION_S": str(LEASE_DURATION_S),
                # The keys the emulators (started from base_env) accept.
                **accepted_keys(base_env),
            },
        }
        wanted = args.only or list(SCENARIOS)
        lanes = [
            [n for n in ("sync_faults", "credits") if n in wanted],
            [n for n in ("async_faults", "sigkill") if n in wanted],
        ]
        if args.sequential:
            lanes = [[n for lane in lanes for n in lane]]

        def run_lane(names: list[str]) -> None:
            for scenario in names:
                t0 = time.perf_counter()
                try:
                    scenarios[scenario] = SCENARIOS[scenario](ctx)
                except Exception as exc:  # recorded: the other scenarios still count
                    log(f"{scenario}: FAILED: {exc}")
                    scenarios[scenario] = {"error": f"{type(exc).__name__}: {exc}"}
                scenarios[scenario]["scenario_wall_s"] = round(time.perf_counter() - t0, 1)
                log(f"{scenario}: finished in {scenarios[scenario]['scenario_wall_s']} s")

        with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
            list(pool.map(run_lane, [lane for lane in lanes if lane]))
    finally:
        clean_up(tmp, keep=args.keep_tmp, children=(server,), say=log)

    ordered = {name: scenarios[name] for name in SCENARIOS if name in scenarios}
    report: dict[str, Any] = {
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_facts(),
        "git": {"at_start": git_at_start, "at_end": git_state()},
        "code_digest": {"at_start": code_at_start, "at_end": code_digest()},
        "setup": {
            "rows": args.rows,
            "manifest": "bench/data.py write_manifest: distinct work per row (own description)",
            "max_in_flight": IN_FLIGHT,
            "chunk_size": args.chunk_size,
            "max_attempts": 4,
            "emulator_latency_s": LATENCY_S,
            "emulator_seed": SEED,
            "client_timeouts_s": CLIENT_TIMEOUT_S,
            "emulator_hang_s": HANG_S,
            "lease_duration_s": LEASE_DURATION_S,
            "faults": SCENARIO_FAULTS,
            "side_by_side": not args.sequential,
        },
        "headline": {name: s.get("headline") for name, s in ordered.items()},
        "verdicts": verdicts(ordered),
        "scenarios": ordered,
        "harness_wall_s": round(time.perf_counter() - t_start, 1),
    }
    report["code_changed_during_run"] = code_at_start != report["code_digest"]["at_end"]
    if report["code_changed_during_run"]:
        log("WARNING: the product code changed during the run")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out} in {report['harness_wall_s']} s")
    print(table(ordered))
    print(json.dumps(report["verdicts"]))
    return 0 if all(report["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
