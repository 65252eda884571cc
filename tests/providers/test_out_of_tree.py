"""A provider from another distribution, found only through the entry-point groups.

``out_of_tree/`` is such a distribution (``acme-tryon``): a client, a ``ProviderSpec`` and an
emulator module, registered in its ``pyproject.toml`` under ``tryon_flows.providers`` and
``tryon_flows.emulator``. The test installs it the way an installer lays a distribution out
(the package beside a ``.dist-info`` holding its ``entry_points.txt``), offline, and runs the
CLI as a user would: nothing in this repository names it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from tests.flows.conftest import REPO, SAMPLE_MANIFEST
from tests.local_server import local_home

pytestmark = pytest.mark.e2e

DISTRIBUTION = Path(__file__).parent / "out_of_tree"
MARK_RGB = (255, 0, 255)  # what ACME's emulated endpoint paints across a result's top


def install(site: Path) -> None:
    """``acme-tryon`` into ``site`` as an installer lays it out (no build, no network)."""
    project = tomllib.loads((DISTRIBUTION / "pyproject.toml").read_text())["project"]
    shutil.copytree(DISTRIBUTION / "acme_tryon", site / "acme_tryon")
    info = site / f"acme_tryon-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A user's shell: no PREFECT_API_URL, so the CLI starts the local Prefect server of this
    Prefect home (stopped when the test ends)."""
    with local_home(tmp_path / "prefect-home") as local:
        local.env.pop("ACME_API_KEY", None)
        yield local.env


def tryon(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_provider_registered_only_by_entry_points_runs_end_to_end(
    env: dict[str, str], tmp_path: Path
) -> None:
    manifest = tmp_path / "manifest.csv"
    rows = pl.read_csv(SAMPLE_MANIFEST).filter(
        pl.col("garment_image").is_not_null() & (pl.col("category") != "shoes")
    )
    images = SAMPLE_MANIFEST.parent
    rows.with_columns(
        pl.concat_str(pl.lit(f"{images}/"), pl.col(c)).alias(c)
        for c in ("person_image", "garment_image")
    ).write_csv(manifest)
    lake = tmp_path / "lake"
    args = ("run", str(manifest), "--provider", "acme", "--emulator", "--lake", str(lake))

    # Not installed: the name means nothing.
    unknown = tryon(*args, "--no-progress", env=env, cwd=tmp_path)
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "unknown provider 'acme'" in unknown.stdout + unknown.stderr

    site = tmp_path / "site"
    install(site)
    env = {**env, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = tryon(*args, "--no-progress", env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]

    frame = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    assert frame.height == rows.height
    assert set(frame["provider"]) == {"acme"}
    assert set(frame["status"]) == {"succeeded"}
    for uri in frame["output_uri"]:
        with Image.open(uri) as result:
            top = result.convert("RGB").getpixel((result.width // 2, 2))
        assert top == MARK_RGB  # answered by ACME's own route, not another provider's
