"""The fal queue end to end: ``tryon run --provider fal`` (FASHN v1.6 on fal) and
``fal_kolors``, with the refiner, compared with a seed provider and as a fallback, against the
emulator, on the session's Prefect server; and the CLI finding both only through entry points.

fal is registered by entry points only (pyproject.toml). Until the shared environment is
reinstalled from this checkout, its installed metadata does not name them: the in-process runs
then put the specs and the emulator routes where the entry points would (``registered``), and
the CLI run installs the entry points beside the project as an installer lays them out."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from emulator import fal as fal_emulator
from emulator.server import EmulatorConfig, EmulatorServer
from flows.batch import BatchParams, tryon_batch
from providers import registry
from providers.fal import SPECS
from tests.flows.conftest import REPO
from tests.flows.test_batch import read_metadata, sample_rows, write_manifest
from tests.providers.sites import plugin_served

pytestmark = pytest.mark.e2e

FAL, KOLORS, HD, CC = "fal", "fal_kolors", "hidream", "changeclothes"
FAL_SUBMIT = "POST /fal-ai/fashn/tryon/v1.6"
KOLORS_SUBMIT = "POST /fal-ai/kling/v1-5/kolors-virtual-try-on"
HD_SUBMIT = "POST /api-pub/ec/v3/image/vton/async"
CC_SUBMIT = "POST /api/openapi/change-clothes"
REFINE_SUBMIT = "POST /api/portrait/enhance/try-on-clothes-refiner"


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    """fal's specs among the providers, as ``registry.discover`` finds them once installed."""
    with pytest.MonkeyPatch.context() as patch:
        for spec in SPECS:
            if spec.name not in registry.PROVIDERS:
                patch.setitem(registry.PROVIDERS, spec.name, spec)
        with plugin_served(fal_emulator.EMULATED):
            yield


@pytest.fixture(scope="module")
def emulator(registered: None) -> Iterator[EmulatorServer]:
    """The flow tests' emulator, serving fal's routes too."""
    server = EmulatorServer.start(EmulatorConfig())
    yield server
    server.stop()


def quick_jobs(emulator: EmulatorServer, *providers: str) -> None:
    for name in providers:
        emulator.control.set_faults(name, job_queued_s=0, job_running_s=0.05)


def tryon_records(lake: Path) -> pl.DataFrame:
    return read_metadata(lake).filter(pl.col("stage") == "tryon").sort("row_index", "track")


async def test_fal_with_the_refiner_and_a_rerun_that_pays_nothing(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator, FAL, "ailab")
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(4))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest), lake=str(lake), provider=FAL, refine=True, refine_gender="woman"
    )

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 4} and summary.refine_counts == {"succeeded": 4}
    assert use_emulator.control.posts(FAL_SUBMIT) == 4
    assert use_emulator.control.posts(REFINE_SUBMIT) == 4
    meta = read_metadata(lake)
    coarse = meta.filter(stage="tryon")
    assert set(coarse["provider"]) == {FAL} and set(coarse["status"]) == {"succeeded"}
    assert coarse["request_id"].null_count() == 0
    refined = meta.filter(stage="refine")
    assert set(refined["coarse_provider"]) == {FAL} and set(refined["status"]) == {"succeeded"}
    for uri in coarse["output_uri"]:
        with Image.open(uri) as image:
            image.load()
    # Priced from fal's published $0.075 for FASHN v1.6, plus the refiner's.
    assert summary.cost is not None and summary.cost > 4 * 0.075

    use_emulator.control.reset()
    again = await tryon_batch(params)
    assert use_emulator.control.posts() == 0 and again.provider_calls == 0


async def test_fal_compared_with_a_seed_provider_and_kolors(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator, FAL, HD)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    lake = tmp_path / "lake"
    params = BatchParams(manifest=str(manifest), lake=str(lake), provider=FAL, compare=[HD, KOLORS])

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 3}
    assert summary.compare_counts == {HD: {"succeeded": 3}, KOLORS: {"succeeded": 3}}
    assert use_emulator.control.posts(FAL_SUBMIT) == 3
    assert use_emulator.control.posts(KOLORS_SUBMIT) == 3
    assert use_emulator.control.posts(HD_SUBMIT) == 3
    tracks = tryon_records(lake).group_by("track", "provider").len().sort("track")
    assert tracks.rows() == [(KOLORS, KOLORS, 3), (HD, HD, 3), ("primary", FAL, 3)]
    page = (lake / "runs" / summary.run_id / "contact_sheet.html").read_text()
    assert f"<th>{FAL}</th>" in page and f"<th>{KOLORS}</th>" in page


async def test_fal_takes_the_rows_a_seed_provider_cannot_pay_for(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator, FAL)
    use_emulator.control.set_faults(CC, credits=2)  # two calls succeed, then no credits
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(5))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest), lake=str(lake), fallback=[FAL], limits={"max_in_flight": 1}
    )

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 5} and summary.fell_back == 3
    assert use_emulator.control.posts(CC_SUBMIT) == 3  # two paid, one refused
    assert use_emulator.control.posts(FAL_SUBMIT) == 3
    came = tryon_records(lake).filter(pl.col("fallback_from").is_not_null())
    assert came.height == 3 and set(came["provider"]) == {FAL}
    assert set(came["status"]) == {"succeeded"} and set(came["fallback_from"]) == {CC}


async def test_a_fal_row_refused_by_moderation_falls_back_to_a_seed_provider(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick_jobs(use_emulator, FAL, HD)
    use_emulator.control.set_faults(FAL, forced_codes=["job:content_policy_violation"])
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(2))
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest),
        lake=str(lake),
        provider=FAL,
        fallback=[HD],
        limits={"max_in_flight": 1},
    )

    summary = await tryon_batch(params)

    assert summary.counts == {"succeeded": 2} and summary.fell_back == 1
    records = tryon_records(lake)
    refused = records.filter(pl.col("fallback_to") == HD)
    assert refused["error_code"].to_list() == ["CONTENT_POLICY_VIOLATION"]
    assert refused["provider"].to_list() == [FAL] and refused["cost"].to_list() == [0.0]


# -- the CLI, finding fal through entry points only -------------------------------------------


def install_entry_points(site: Path) -> None:
    """This checkout's fal entry points in ``site``, as an installer lays out a distribution
    (a ``.dist-info`` with ``entry_points.txt``): only if the installed metadata lacks them."""
    if any(e.name == FAL for e in entry_points(group="tryon_flows.providers")):
        return
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = site / "tryon_flows_fal_plugin-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tryon-flows-fal-plugin\nVersion: 0\n"
    )
    lines = []
    for group in ("tryon_flows.providers", "tryon_flows.emulator"):
        lines.append(f"[{group}]")
        lines += [
            f"{name} = {target}"
            for name, target in project["entry-points"][group].items()
            if name.startswith(FAL)
        ]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))


def test_tryon_run_provider_fal_from_the_command_line(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    site = tmp_path / "site"
    site.mkdir()
    install_entry_points(site)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRYON_")}
    env.pop("FAL_KEY", None)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    args = [sys.executable, "-m", "flows.cli", "run", str(manifest), "--emulator", "--no-progress"]
    args += ["--lake", str(tmp_path / "lake"), "--provider", FAL, "--compare", KOLORS]
    args += ["--refine", "--refine-gender", "woman"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "3 succeeded / 0 failed / 0 invalid of 3 rows" in done.stdout, output[-3000:]
    meta = pl.scan_parquet(f"{tmp_path}/lake/metadata/**/*.parquet").collect()
    tryon = meta.filter(stage="tryon")
    assert sorted(set(tryon["provider"])) == [FAL, KOLORS]
    assert set(tryon["status"]) == {"succeeded"}
    assert set(meta.filter(stage="refine")["status"]) == {"succeeded"}
