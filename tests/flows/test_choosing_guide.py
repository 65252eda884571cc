"""The README's "Choosing a provider" commands, run as written from a copy of the sample."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
from pathlib import Path

import polars as pl
import pytest

from tests.flows.conftest import REPO
from tests.flows.test_run_explains import tryon

pytestmark = pytest.mark.e2e

GUIDE = re.compile(r"<!-- choosing: cli -->\n```bash\n(?P<script>.*?)```", re.DOTALL)
TRYON = ".venv/bin/tryon "


def guide_commands() -> list[list[str]]:
    script = GUIDE.search((REPO / "README.md").read_text())
    assert script is not None, "the README lost its tagged 'Choosing a provider' block"
    lines = [line for line in script["script"].splitlines() if line.strip()]
    assert all(line.startswith(TRYON) for line in lines), lines
    return [shlex.split(line.removeprefix(TRYON)) for line in lines]


async def test_the_choosing_guide_runs_as_written(tmp_path: Path) -> None:
    shutil.copytree(REPO / "sample", tmp_path / "sample")
    outputs = []
    for args in guide_commands():
        if args[0] == "run":
            args = [*args, "--no-progress"]
        done = await asyncio.to_thread(tryon, *args, cwd=tmp_path)
        # The sample's last row is invalid on purpose: runs exit 1, the scorecard 0.
        assert done.returncode == (1 if args[0] == "run" else 0), done.stderr[-3000:]
        outputs.append(done.stdout)

    meta = pl.scan_parquet(f"{tmp_path}/lake/metadata/**/*.parquet").collect()
    tryon_stage = meta.filter(pl.col("stage") == "tryon")
    compared = tryon_stage.filter(pl.col("track") == "hidream")
    assert compared.height == 8  # every valid row, the prompt row a finished skip
    # The routed run found HiDream's work for the dress done by the comparing run: its record
    # is that run's (the dataset holds each piece of work once); the routed run's report has
    # the row on its primary track.
    report = pl.scan_parquet(f"{tmp_path}/lake/runs/*/report/*.parquet").collect()
    routed = report.filter((pl.col("row_id") == "chi-dress") & (pl.col("track") == "primary"))
    assert "hidream" in routed["provider"].to_list()
    # The scorecard adds the runs up: both providers, with the calls they took.
    assert "changeclothes" in outputs[-1] and "hidream" in outputs[-1]


MONEY = re.compile(r"<!-- money: cli -->\n```bash\n(?P<script>.*?)```", re.DOTALL)


async def test_the_money_guide_plans_as_written(tmp_path: Path) -> None:
    shutil.copytree(REPO / "sample", tmp_path / "sample")
    block = MONEY.search((REPO / "README.md").read_text())
    assert block is not None, "the README lost its tagged Money block"
    (line,) = [line for line in block["script"].splitlines() if line.strip()]
    assert line.startswith(TRYON)
    done = await asyncio.to_thread(tryon, *shlex.split(line.removeprefix(TRYON)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # 8 valid rows at 0.05, and the refiner (published price) on the 5 it applies to.
    assert "Estimate: 13 calls, cost 0.775 USD" in done.stdout
    assert not (tmp_path / "lake").exists()
