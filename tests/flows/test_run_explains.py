"""A run that ends with rows not done says why in the terminal; rows the refiner cannot take
do not fail a run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchParams, tryon_batch
from tests.flows.conftest import REPO, SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e


def tryon(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`tryon` in a fresh process against this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRYON_")}
    env |= {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_a_run_whose_rows_all_fail_says_why(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):  # there, but not images: each row fails as its inputs are decoded
        (photos / f"person-{i}.jpg").write_bytes(b"not a photo")
        (photos / f"garment-{i}.jpg").write_bytes(b"not a photo")
    rows = [
        {
            "id": f"r{i}",
            "person_image": f"photos/person-{i}.jpg",
            "garment_image": f"photos/garment-{i}.jpg",
            "category": "upper_body",
        }
        for i in range(3)
    ]
    rows.append({**rows[0], "id": "shoes", "category": "shoes"})
    pl.DataFrame(rows).write_csv(tmp_path / "m.csv")

    done = await asyncio.to_thread(
        tryon, "run", "m.csv", "--emulator", "--lake", "lake", "--no-progress", cwd=tmp_path
    )

    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "0 succeeded / 3 failed / 1 invalid of 4 rows" in out
    lines = out.splitlines()
    why = lines.index("Why rows did not succeed (top error codes, one example each):")
    fetch, invalid = lines[why + 1], lines[why + 2]
    assert re.fullmatch(r"  3 × DECODE_FAILED  \(input image\) .*(person|garment).*", fetch), fetch
    assert "not a photo" not in out  # a file's content never reaches the terminal
    assert invalid.startswith("  1 × INVALID_ROW  (manifest) unknown category 'shoes'"), invalid
    (run_dir,) = (tmp_path / "lake" / "runs").iterdir()
    sheet = run_dir / "contact_sheet.html"
    assert lines[-2] == f"Contact sheet (every row, with its message): {sheet}"
    assert lines[-1].startswith("Prefect UI: http") and lines[-1].endswith(run_dir.name)
    assert sheet.is_file()
    # The terminal gets the explanation, not the flow's traceback...
    assert "Traceback" not in done.stderr and "BatchIncomplete(" not in done.stderr
    # ...and chunk log lines read as text.
    assert "chunk changeclothes/0: try-on 3 failed" in done.stderr
    # The flow run still ends Failed in Prefect (a scheduler or the UI can retry it).
    from prefect import get_client

    async with get_client() as client:
        flow_run = await client.read_flow_run(uuid.UUID(run_dir.name))
    assert flow_run.state is not None and flow_run.state.is_failed()
    # And the summary keeps the same explanation for later readers.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(e["code"], e["count"]) for e in summary["top_errors"]] == [
        ("DECODE_FAILED", 3),
        ("INVALID_ROW", 1),
    ]


async def test_rows_the_refiner_cannot_take_leave_the_run_completed(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Decision: a prompt or lower_body row under --refine is recorded as refine ``skipped``
    (``REFINE_NOT_APPLICABLE``) and is not a failure: exit status 0, flow run Completed."""
    use_emulator.control.set_faults("ailab", job_queued_s=0, job_running_s=0)
    images = SAMPLE_MANIFEST.parent / "images"
    person = str(images / "person_ana.jpg")
    rows = [
        {"id": "top", "garment_image": str(images / "garment_red_tee.jpg"),
         "category": "upper_body", "prompt": ""},
        {"id": "bottom", "garment_image": str(images / "garment_chinos.jpg"),
         "category": "lower_body", "prompt": ""},
        {"id": "prompt", "garment_image": "", "category": "",
         "prompt": "Help the model change into a blue striped shirt."},
    ]  # fmt: skip
    manifest = tmp_path / "m.csv"
    pl.DataFrame([{**row, "person_image": person, "gender": "woman"} for row in rows]).write_csv(
        manifest
    )

    summary = await tryon_batch(
        BatchParams(manifest=str(manifest), lake=str(tmp_path / "lake"), refine=True)
    )
    assert summary.counts == {"succeeded": 3}
    assert summary.refine_counts == {"succeeded": 1, "skipped": 2}
    assert summary.exit_code == 0 and summary.unfinished == 0
    assert summary.top_errors == []
