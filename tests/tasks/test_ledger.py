"""The work ledger and the lake's commit protocol, on a local lake."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from schemas.results import RowRecord, Status
from tasks.lake import Lake, LakePathError
from tasks.ledger import WorkLedger, work_key


def record(run_id: str, row_id: str, **extra: object) -> RowRecord:
    return RowRecord(
        run_id=run_id,
        row_id=row_id,
        row_index=0,
        provider="changeclothes",
        status=Status.SUCCEEDED,
        output_uri="/lake/outputs/x.webp",
        **extra,  # type: ignore[arg-type]
    )


def test_work_key_is_stable_and_tells_parameters_apart() -> None:
    a = work_key(stage="tryon", provider="p", person="1", garment="2", prompt=None)
    assert a == work_key(garment="2", person="1", provider="p", stage="tryon", prompt=None)
    assert a != work_key(stage="tryon", provider="p", person="1", garment="2", prompt="")
    assert a != work_key(stage="tryon", provider="q", person="1", garment="2", prompt=None)
    assert len(a) == 64 and int(a, 16) >= 0


async def test_done_work_is_recorded_once_across_committed_runs(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="a")
    first = WorkLedger(lake, "run-1")
    assert await first.done(key) is None
    await first.mark_done(key, record("run-1", "row-a"))

    second = WorkLedger(lake, "run-2")
    entry = await second.done(key)
    assert entry is not None and entry.produced_by == "run-1"
    assert entry.record.output_uri == "/lake/outputs/x.webp"
    # run-1 never committed (it crashed): run-2 must record the row itself...
    assert await second.recorded_elsewhere(entry, "row-a") is None
    await second.adopt(entry, "row-a")
    lake.commit_run("run-2", {})
    # ...and once run-2 committed, a third run writes nothing for it.
    third = WorkLedger(lake, "run-3")
    entry = await third.done(key)
    assert entry is not None
    assert await third.recorded_elsewhere(entry, "row-a") == "run-2"
    # The same work asked for under another row id is still recorded for that row.
    assert await third.recorded_elsewhere(entry, "row-b") is None


async def test_the_same_run_retried_records_its_rows_again(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="a")
    ledger = WorkLedger(lake, "run-1")
    await ledger.mark_done(key, record("run-1", "row-a"))
    lake.commit_run("run-1", {})
    entry = await WorkLedger(lake, "run-1").done(key)
    assert entry is not None
    assert await WorkLedger(lake, "run-1").recorded_elsewhere(entry, "row-a") is None


async def test_a_torn_ledger_entry_is_no_entry(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="torn")
    ledger = WorkLedger(lake, "run-1")
    await ledger.mark_done(key, record("run-1", "row-a"))
    path = Path(lake.path("work", key[:2], f"{key}.json"))
    path.write_text(path.read_text()[:20])  # a crash mid-write
    assert await ledger.done(key) is None


async def test_accepted_jobs_are_kept_until_forgotten(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="job")
    ledger = WorkLedger(lake, "run-1")
    assert await ledger.job(key) is None
    await ledger.record_job(key, "hidream", "task-42")
    job = await WorkLedger(lake, "run-2").job(key)
    assert job is not None and (job.provider, job.job_id, job.run_id) == (
        "hidream",
        "task-42",
        "run-1",
    )
    await ledger.forget_job(key)
    await ledger.forget_job(key)  # twice is fine
    assert await ledger.job(key) is None


async def test_ledger_refuses_keys_that_are_not_digests(tmp_path: Path) -> None:
    ledger = WorkLedger(Lake.open(str(tmp_path / "lake")), "run-1")
    with pytest.raises(ValueError, match="not a work key"):
        await ledger.done("../../etc/passwd")


def test_commit_publishes_parts_and_marker_last(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    lake.write_metadata("run-1", "part-a", [record("run-1", "row-a")])
    lake.write_metadata("run-1", "part-b", [record("run-1", "row-b")])
    glob = f"{tmp_path}/lake/metadata/**/*.parquet"
    assert not list((tmp_path / "lake").glob("metadata/**/*.parquet"))  # staged, not visible
    assert not lake.is_committed("run-1")

    lake.commit_run("run-1", {"note": "first"})
    assert lake.is_committed("run-1")
    assert sorted(pl.scan_parquet(glob).collect()["row_id"]) == ["row-a", "row-b"]
    marker = json.loads(Path(lake.commit_marker("run-1")).read_text())
    assert marker["parts"] == ["part-a.parquet", "part-b.parquet"]

    # A retry of the same run that no longer has part-b replaces, never duplicates.
    Path(lake.run_path("run-1", "parts", "part-b.parquet")).unlink()
    lake.write_metadata("run-1", "part-a", [record("run-1", "row-a", attempts=2)])
    lake.commit_run("run-1", {"note": "retry"})
    frame = pl.scan_parquet(glob).collect()
    assert frame["row_id"].to_list() == ["row-a"] and frame["attempts"].to_list() == [2]
    assert json.loads(Path(lake.commit_marker("run-1")).read_text())["note"] == "retry"


def test_outputs_are_named_by_content_only(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    digest = "ab" * 32
    assert lake.output_path(digest, "webp").endswith(f"outputs/{digest}.webp")
    for bad_digest, ext in (("../x", "png"), ("ab" * 31, "png"), (digest, "png/../../x")):
        with pytest.raises(LakePathError):
            lake.output_path(bad_digest, ext)
    with pytest.raises(LakePathError):
        lake.read_uri("/etc/passwd")
