"""FASHN end to end: `tryon run --provider fashn` through its entry points, and in-process runs
against the session's Prefect server and a real emulator on loopback: with the refiner, in a
comparison with a seed provider, as a fallback's source and target, and the balance check.

FASHN is registered by entry points only (pyproject.toml). The CLI test lays out a
distribution's metadata holding exactly those entry points (as tests/providers/
test_out_of_tree.py does) and runs the CLI in a fresh process; the in-process tests register
the same spec and emulator module for this process (``tests.providers.sites.installed``), a
no-op once the installed metadata has them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorConfig, EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, tryon_batch
from flows.preflight import RunNotStarted
from tests.flows.conftest import REPO
from tests.flows.test_batch import read_metadata, sample_rows, write_manifest
from tests.providers.sites import installed

pytestmark = pytest.mark.e2e

FA, HD, CC = "fashn", "hidream", "changeclothes"
FA_RUN = "POST /v1/run"
HD_SUBMIT = "POST /api-pub/ec/v3/image/vton/async"
CC_SUBMIT = "POST /api/openapi/change-clothes"
REFINE = "POST /api/portrait/enhance/try-on-clothes-refiner"


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    """The flow tests' emulator, serving FASHN's routes too (registered as if installed)."""
    with installed(FA):
        server = EmulatorServer.start(EmulatorConfig())
        try:
            yield server
        finally:
            server.stop()


def quick_jobs(emulator: EmulatorServer, *providers: str) -> None:
    for provider in providers:
        emulator.control.set_faults(provider, job_queued_s=0, job_running_s=0.1)


def tryon_records(lake: Path) -> pl.DataFrame:
    return read_metadata(lake).filter(pl.col("stage") == "tryon").sort("row_index", "started_at")


# -- the CLI, FASHN found through its entry points ---------------------------------------------


def entry_point_site(site: Path) -> None:
    """``site`` holds a distribution's metadata with the project's ``fashn`` entry points (read
    from pyproject.toml) and no code: the code is this checkout's, on PYTHONPATH after it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = site / "tryon_flows_fashn_entry_points-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tryon-flows-fashn-entry-points\nVersion: 0\n"
    )
    lines: list[str] = []
    for group in ("tryon_flows.providers", "tryon_flows.emulator"):
        target = project["entry-points"][group][FA]
        lines += [f"[{group}]", f"{FA} = {target}", ""]
    (info / "entry_points.txt").write_text("\n".join(lines))


def tryon_cli(*args: str, cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process against this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRYON_")}
    env.pop("FASHN_API_KEY", None)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    argv = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


async def test_tryon_run_provider_fashn_with_the_refiner_from_the_command_line(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    entry_point_site(site)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    lake = tmp_path / "lake"
    args = ["run", str(manifest), "--provider", FA, "--emulator", "--lake", str(lake)]
    args += ["--refine", "--refine-gender", "woman", "--no-progress"]

    done = await asyncio.to_thread(tryon_cli, *args, cwd=tmp_path, site=site)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "3 succeeded / 0 failed" in done.stdout, done.stdout[-2000:]
    records = read_metadata(lake)
    tryons = records.filter(pl.col("stage") == "tryon")
    assert set(tryons["provider"]) == {FA} and set(tryons["status"]) == {"succeeded"}
    refined = records.filter(pl.col("stage") == "refine")
    assert refined.height == 3 and set(refined["status"]) == {"succeeded"}
    assert set(refined["coarse_provider"]) == {FA}
    for uri in records["output_uri"]:
        assert Path(uri).is_file()


# -- in-process runs ----------------------------------------------------------------------------


async def test_fashn_with_the_refiner(use_emulator: EmulatorServer, tmp_path: Path) -> None:
    quick_jobs(use_emulator, FA, "ailab")
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(4))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest), lake=str(lake), provider=FA, refine=True, refine_gender="woman"
    )

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 4}
    assert use_emulator.control.posts(FA_RUN) == 4 and use_emulator.control.posts(REFINE) == 4
    records = read_metadata(lake)
    refined = records.filter(pl.col("stage") == "refine")
    assert set(refined["coarse_provider"]) == {FA} and set(refined["status"]) == {"succeeded"}
    stats = use_emulator.control.stats().provider(FA)
    assert stats.max_in_flight <= 6 and not stats.errors  # within its limits: no 429

    use_emulator.control.reset()
    again = await tryon_batch(params)
    assert again.provider_calls == 0 and use_emulator.control.posts() == 0


async def test_fashn_compared_with_a_seed_provider(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator, FA, HD)
    rows = sample_rows(4)
    rows[1]["category"] = "dresses"
    rows[2]["category"] = "lower_body"
    manifest = write_manifest(tmp_path / "m.csv", rows)
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), provider=HD, compare=[FA])

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 4}
    assert summary.compare_counts == {FA: {"succeeded": 4}}
    assert use_emulator.control.posts(FA_RUN) == 4 and use_emulator.control.posts(HD_SUBMIT) == 4
    records = tryon_records(lake)
    assert records.group_by("track", "provider").len().sort("track").rows() == [
        (FA, FA, 4),
        ("primary", HD, 4),
    ]
    page = (lake / "runs" / summary.run_id / "contact_sheet.html").read_text()
    assert f"<th>{FA}</th>" in page


async def test_fashn_falls_back_and_is_fallen_back_to(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator, FA, HD)
    # FASHN's moderation refuses the first row (a provider's refusal: the next may take it).
    use_emulator.control.set_faults(FA, forced_codes=["failed:ContentModerationError"])
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest),
        lake=str(lake),
        provider=FA,
        fallback=[HD],
        limits={"max_in_flight": 1},
    )

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 3} and summary.fell_back == 1
    records = tryon_records(lake)
    left = records.filter(pl.col("fallback_to").is_not_null())
    assert left["error_code"].to_list() == ["ContentModerationError"]
    assert left["provider"].to_list() == [FA] and left["fallback_to"].to_list() == [HD]
    assert use_emulator.control.posts(HD_SUBMIT) == 1

    # And FASHN as the fallback of a seed provider that fails every call.
    use_emulator.control.reset(faults=True)
    quick_jobs(use_emulator, FA)
    use_emulator.control.set_faults(CC, error_rate_5xx=1.0)
    params = BatchParams(
        manifest=str(manifest), lake=str(tmp_path / "lake2"), fallback=[FA], max_attempts=2
    )
    summary = await tryon_batch(params)
    assert summary.counts == {"succeeded": 3} and summary.fell_back == 3
    came = tryon_records(tmp_path / "lake2").filter(pl.col("fallback_from").is_not_null())
    assert came.height == 3 and set(came["provider"]) == {FA}
    assert use_emulator.control.posts(FA_RUN) == 3 and use_emulator.control.posts(CC_SUBMIT) == 6


async def test_a_run_fashn_s_credits_cannot_pay_does_not_start(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    """GET /v1/credits is read before anything is sent: 1 credit a try-on."""
    quick_jobs(use_emulator, FA)
    use_emulator.control.set_faults(FA, credits=2)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), provider=FA)
    with pytest.raises(RunNotStarted, match=r"fashn has 2 credits and this run needs 3"):
        await tryon_batch(params)
    assert use_emulator.control.posts() == 0 and not lake.exists()

    use_emulator.control.set_faults(FA, credits=3)
    assert (await tryon_batch(params)).counts == {"succeeded": 3}
    assert use_emulator.control.posts(FA_RUN) == 3


async def test_out_of_credits_half_way_stops_fashn_at_once(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Credits spent elsewhere after the check: OutOfCredits is run-fatal, no call after it."""
    quick_jobs(use_emulator, FA)
    use_emulator.control.set_faults(FA, forced_codes=["failed:PoseError", "OutOfCredits"])
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(4))
    params = BatchParams(
        manifest=str(manifest),
        lake=str(tmp_path / "lake"),
        provider=FA,
        limits={"max_in_flight": 1},
    )
    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(params)
    summary = caught.value.summary
    assert "OutOfCredits" in (summary.fatal_error or "")
    records = tryon_records(tmp_path / "lake")
    # One row's own failure (the prediction), one run-fatal answer, whichever row came first.
    failed = records.filter(pl.col("status") == "failed")
    assert sorted(failed["error_code"]) == ["OutOfCredits", "PoseError"]
    assert failed.filter(pl.col("error_code") == "PoseError")["error_kind"][0] == "permanent"
    assert records.filter(pl.col("status") == "skipped").height == 2
    assert use_emulator.control.posts(FA_RUN) == 2  # none after the fatal answer
