"""`tryon scorecard LAKE`: committed runs' figures per provider and stage, filtered."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from flows import cli
from flows.cli import app
from schemas.results import RowRecord, Status
from tasks.lake import Lake
from tests.s3server import S3Server

DAY1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)


@pytest.fixture(autouse=True)
def _on_the_session_prefect_server() -> None:
    """The command reads the lake alone: no Prefect server (this overrides the folder's)."""


def rec(run_id: str, index: int, provider: str, status: Status, **fields: Any) -> RowRecord:
    return RowRecord.model_validate(
        {
            "run_id": run_id,
            "row_id": f"r{index}",
            "row_index": index,
            "provider": provider,
            "status": status,
            "category": "upper_body",
            **fields,
        }
    )


def build_lake(lake: Lake) -> None:
    """run-1 (day 1): row 0 succeeded; row 1 (a dress) moderated, fell back to hidream; row 2
    invalid (never started). run-2 (day 2): row 0 timed out on changeclothes, compared on
    hidream. run-3 published its metadata but never committed."""
    at = {"started_at": DAY1}
    run1 = [
        rec("run-1", 0, "changeclothes", Status.SUCCEEDED, attempts=1, provider_ms=100.0, **at),
        rec(
            "run-1",
            1,
            "changeclothes",
            Status.FAILED,
            category="dresses",
            error_code="MODERATED",
            fallback_to="hidream",
            attempts=1,
            provider_ms=300.0,
            **at,
        ),
        rec(
            "run-1",
            1,
            "hidream",
            Status.SUCCEEDED,
            category="dresses",
            fallback_from="changeclothes",
            attempts=2,
            provider_ms=1000.0,
            **at,
        ),
        rec("run-1", 2, "changeclothes", Status.INVALID, error_code="INVALID_ROW"),
    ]
    at = {"started_at": DAY2}
    run2 = [
        rec("run-2", 0, "changeclothes", Status.FAILED, error_code="TIMEOUT", attempts=4, **at),
        rec("run-2", 0, "hidream", Status.SUCCEEDED, track="hidream", attempts=1, **at),
    ]
    for run_id, records, started in (("run-1", run1, DAY1), ("run-2", run2, DAY2)):
        lake.write_metadata(run_id, "part-00000", records)
        lake.write_json(lake.run_path(run_id, "started.json"), {"started_at": started})
        lake.commit_run(run_id, {"run_id": run_id})
    lake.write_metadata("run-3", "part-00000", run2)
    lake.fs.copy(
        lake.run_path("run-3", "parts", "part-00000.parquet"),
        lake.path("metadata", "run_id=run-3", "part-00000.parquet"),
    )


@pytest.fixture
def lake_dir(tmp_path: Path) -> str:
    build_lake(Lake.open(str(tmp_path / "lake")))
    return str(tmp_path / "lake")


def scorecard(*args: str, width: int = 250) -> Result:
    """The command as on a terminal ``width`` columns wide (its own Console: another test may
    have sized the module's)."""
    original, cli.out = cli.out, Console(soft_wrap=True, width=width)
    try:
        return CliRunner().invoke(app, ["scorecard", *args])
    finally:
        cli.out = original


def figures(result: Result) -> dict[tuple[str, str], dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return {(r["provider"], r["stage"]): r for r in json.loads(result.stdout)}


def test_every_committed_run_by_default_as_a_table(lake_dir: str) -> None:
    result = scorecard(lake_dir)

    assert result.exit_code == 0, result.output
    assert f"Scorecard: 2 committed run(s) in {lake_dir}" in result.stdout
    lines = result.stdout.splitlines()
    heading = next(line for line in lines if "provider" in line)
    # Columns zero in every row, and records (the same as rows here), are left out.
    assert heading.split() == [
        "provider", "stage", "rows", "ok", "failed", "codes", "invalid", "calls",
        "p50", "ms", "p95", "ms", "fb", "out", "fb", "in",
    ]  # fmt: skip
    # changeclothes over both runs: 4 rows, 1 succeeded, 2 failed, 1 invalid, 6 calls.
    changeclothes = next(line for line in lines if "changeclothes" in line).split()
    assert changeclothes == [
        "changeclothes", "tryon", "4", "1", "2", "MODERATED", "1,", "TIMEOUT", "1", "1", "6",
        "200", "290", "1", "0",
    ]  # fmt: skip
    assert "left out, published but not committed: run-3" in result.stderr
    # A terminal too narrow for the table: names and numbers are still never cut in two.
    words = scorecard(lake_dir, width=60).stdout.split()
    assert {"changeclothes", "MODERATED", "1000"} <= set(words)


def test_json_figures_of_one_run(lake_dir: str) -> None:
    score = figures(scorecard(lake_dir, "--run", "run-1", "--format", "json"))

    assert score[("changeclothes", "tryon")] == {
        "provider": "changeclothes", "stage": "tryon", "rows": 3, "records": 3,
        "succeeded": 1, "failed": 1, "skipped": 0, "invalid": 1,
        "failed_by_code": [{"code": "MODERATED", "count": 1}], "attempts": 2,
        "provider_ms_p50": 200.0, "provider_ms_p95": 290.0,
        "fallbacks_out": 1, "fallbacks_in": 0, "cost": None,
    }  # fmt: skip
    hidream = score[("hidream", "tryon")]
    assert (hidream["rows"], hidream["succeeded"], hidream["fallbacks_in"]) == (1, 1, 1)


def test_time_and_category_filters(lake_dir: str) -> None:
    day2 = figures(scorecard(lake_dir, "--since", "2026-03-02", "--format", "json"))
    assert day2[("changeclothes", "tryon")]["failed_by_code"] == [{"code": "TIMEOUT", "count": 1}]
    assert day2[("hidream", "tryon")]["fallbacks_in"] == 0  # run-2's hidream was compared

    # Until day 2 (naive: UTC): run-1 only, its invalid row dated by the run's start.
    day1 = figures(scorecard(lake_dir, "--until", "2026-03-02T00:00", "--format", "json"))
    assert day1[("changeclothes", "tryon")]["invalid"] == 1
    assert day1[("changeclothes", "tryon")]["rows"] == 3

    dresses = scorecard(lake_dir, "--category", "dresses", "--format", "csv")
    assert dresses.exit_code == 0, dresses.output
    lines = dresses.stdout.splitlines()
    assert lines[0].startswith("provider,stage,rows,records,succeeded,failed,skipped,invalid,")
    assert lines[1].startswith("changeclothes,tryon,1,1,0,1,0,0,MODERATED 1,1,300.0,300.0,1,0")
    assert lines[2].startswith('hidream,tryon,1,1,1,0,0,0,"",2,1000.0,1000.0,0,1')
    assert len(lines) == 3


def test_by_run_splits_the_figures(lake_dir: str) -> None:
    result = scorecard(lake_dir, "--by-run", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = [(r["run_id"], r["provider"], r["rows"]) for r in json.loads(result.stdout)]
    assert rows == [
        ("run-1", "changeclothes", 3),
        ("run-1", "hidream", 1),
        ("run-2", "changeclothes", 1),
        ("run-2", "hidream", 1),
    ]


def test_a_run_not_committed_or_a_bad_option_says_so(lake_dir: str, tmp_path: Path) -> None:
    missing = scorecard(lake_dir, "--run", "run-1", "--run", "run-3", "--format", "json")
    assert missing.exit_code == 1
    assert f"not a committed run in {lake_dir}: run-3" in missing.stderr
    assert {r["provider"] for r in json.loads(missing.stdout)} == {"changeclothes", "hidream"}

    bad = scorecard(lake_dir, "--since", "last tuesday")
    assert bad.exit_code == 2 and "--since 'last tuesday'" in bad.stderr
    assert scorecard(lake_dir, "--format", "xml").exit_code == 2
    assert scorecard(lake_dir, "--storage-option", "novalue").exit_code == 2

    empty = scorecard(str(tmp_path / "no-lake"), "--format", "csv")
    assert empty.exit_code == 0 and empty.stdout.startswith("provider,stage,rows,")
    assert len(empty.stdout.splitlines()) == 1


def test_an_s3_lake_through_storage_options(s3_server: S3Server) -> None:
    uri = s3_server.uri("scorecard-lake")
    build_lake(Lake.open(uri, storage_options=s3_server.storage_options))
    region = json.dumps({"region_name": s3_server.region})

    score = figures(
        scorecard(
            uri,
            "--storage-option",
            f"endpoint_url={s3_server.endpoint_url}",
            "--storage-option",
            f"client_kwargs={region}",
            "--format",
            "json",
        )
    )
    assert score[("changeclothes", "tryon")]["rows"] == 4
    assert score[("hidream", "tryon")]["attempts"] == 3
