"""`tryon validate --provider P --refine` reports exactly the invalid rows `tryon run --provider
P --refine` records: the same rows, numbered alike, with the same reasons."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import flows.cli
from emulator.server import EmulatorServer
from flows.batch import BatchParams, tryon_batch
from tests.flows.conftest import SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e

PERSON, GARMENT, LOWER = (
    "images/person_ana.jpg",
    "images/garment_red_tee.jpg",
    "images/garment_chinos.jpg",
)
GOOD = {
    "person_image": PERSON,
    "garment_image": GARMENT,
    "category": "upper_body",
    "gender": "woman",
}
# Every kind of problem, each on its own row, between rows that run. With --provider hidream
# --refine: hidream has no prompt endpoint and takes lower garments; ChangeClothes and AILab
# take no lower garment; the refiner needs a gender for top garments.
ROWS: list[dict[str, str | None]] = [
    {"id": "good-1", **GOOD},
    {"id": "shoes", **GOOD, "category": "shoes"},
    {"id": "twice", **GOOD},
    {"id": "twice", **GOOD},
    {"id": "../escape", **GOOD},
    {"id": None, **GOOD},
    {"id": "ftp", **GOOD, "person_image": "ftp://files.example/p.jpg"},
    {"id": "chain", **GOOD, "garment_image": "simplecache::https://cdn.example/g.jpg"},
    {"id": "malformed", **GOOD, "person_image": "http:/cdn.example/p.jpg"},
    {"id": "control", **GOOD, "person_image": "images/person\tana.jpg"},
    {"id": "data", **GOOD, "garment_image": "data:text/plain;base64,aGk="},
    {"id": "robot", **GOOD, "gender": "robot"},
    {"id": "acme", **GOOD, "provider": "acme"},
    {
        "id": "lower-alone",
        **GOOD,
        "garment_image": None,
        "category": None,
        "prompt": "x",
        "lower_garment_image": LOWER,
    },
    {"id": "no-person", **GOOD, "person_image": None},
    {"id": "nothing", **GOOD, "garment_image": None, "category": None},
    {"id": "nul", **GOOD, "garment_description": "a\x00b"},
    {"id": "missing-file", **GOOD, "person_image": "images/nobody.jpg"},
    {"id": "a-directory", **GOOD, "garment_image": "images"},
    {"id": "prompt-row", **GOOD, "garment_image": None, "category": None, "prompt": "a coat"},
    {"id": "no-gender", **GOOD, "gender": None},
    {"id": "cc-lower", **GOOD, "provider": "changeclothes", "lower_garment_image": LOWER},
    {"id": "ailab-lower", **GOOD, "provider": "ailab", "lower_garment_image": LOWER},
    {
        "id": "good-lower-body",
        **GOOD,
        "garment_image": LOWER,
        "category": "lower_body",
        "gender": None,
    },  # the refiner skips it: no gender needed
    {"id": "good-hidream-lower", **GOOD, "lower_garment_image": LOWER},
    {
        "id": "good-cc-prompt",
        **GOOD,
        "provider": "changeclothes",
        "garment_image": None,
        "category": None,
        "prompt": "a blue shirt",
    },
]
LINE = re.compile(r"^row (\d+) \((?:id '[^']*'|no id)\): (.*)$")


def write_manifest(tmp_path: Path) -> Path:
    shutil.copytree(SAMPLE_MANIFEST.parent / "images", tmp_path / "images")
    columns = dict.fromkeys(k for row in ROWS for k in row)
    frame = pl.DataFrame([{c: row.get(c) for c in columns} for row in ROWS])
    frame.write_csv(tmp_path / "manifest.csv")
    return tmp_path / "manifest.csv"


async def test_validate_reports_exactly_the_rows_a_run_records_invalid(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    quick = {"job_queued_s": 0.0, "job_running_s": 0.0}
    use_emulator.control.set_faults({"hidream": quick, "ailab": quick})
    manifest = write_manifest(tmp_path)

    checked = CliRunner().invoke(
        flows.cli.app, ["validate", str(manifest), "--provider", "hidream", "--refine"]
    )
    assert checked.exit_code == flows.cli.EXIT_ROWS, checked.output
    lines = checked.output.splitlines()
    found = [LINE.match(line) for line in lines]
    reported = {(int(m.group(1)), m.group(2)) for m in found if m}
    assert lines[len(reported)] == f"{len(ROWS)} rows: 4 valid, {len(ROWS) - 4} invalid"

    summary = await tryon_batch(
        BatchParams(
            manifest=str(manifest), lake=str(tmp_path / "lake"), provider="hidream", refine=True
        )
    )
    meta = pl.scan_parquet(f"{tmp_path}/lake/metadata/**/*.parquet").collect()
    invalid = meta.filter(pl.col("status") == "invalid")
    # Row numbers: the metadata's row_index counts from 0, people (and validate) from 1.
    recorded = {
        (i + 1, message) for i, message in invalid.select("row_index", "error_message").rows()
    }
    assert reported == recorded
    assert summary.counts["invalid"] == len(recorded) == len(ROWS) - 4
    assert set(meta.filter(pl.col("status") != "invalid")["row_id"]) == {
        row["id"] for row in ROWS if str(row["id"]).startswith("good-")
    }
    # Not vacuous: every kind of problem is among them, the providers' and the files' too.
    messages = " | ".join(message for _, message in reported)
    for kind in (
        "unknown category",
        "duplicate id",
        "unsafe for a path",
        "missing value in column 'id'",
        "not allowed",
        "malformed http URL",
        "control character",
        "not a base64 image",
        "invalid gender",
        "unknown provider",
        "lower_garment_image is set but garment_image is missing",
        "missing value in column 'person_image'",
        "garment_image or prompt is required",
        "NUL byte",
        "no such file in column 'person_image'",
        "a directory, not a file",
        "provider 'hidream' needs garment_image",
        "refine needs gender",
        "provider 'changeclothes' does not take lower_garment_image",
        "provider 'ailab' does not take lower_garment_image",
    ):
        assert kind in messages, kind
