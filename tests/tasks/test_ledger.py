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
    fields: dict[str, object] = {
        "status": Status.SUCCEEDED,
        "output_uri": "/lake/outputs/x.webp",
        **extra,
    }
    return RowRecord(
        run_id=run_id,
        row_id=row_id,
        row_index=0,
        provider="changeclothes",
        **fields,  # type: ignore[arg-type]
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


# -- lookups through the run's snapshot: a listing and the committed metadata ---------------


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ledger entry the lake is asked for (a GET each on an object store)."""
    seen: list[str] = []
    original = Lake.aread_bytes

    async def aread_bytes(self: Lake, path: str) -> bytes:
        seen.append(path)
        return await original(self, path)

    monkeypatch.setattr(Lake, "aread_bytes", aread_bytes)
    return seen


def committed_run(lake: Lake, run_id: str, key: str, row_id: str, **extra: object) -> RowRecord:
    """A run that did ``key``'s work for ``row_id``, its metadata committed."""
    done = record(run_id, row_id, work_key=key, **extra)
    lake.write_metadata(run_id, "part-a", [done])
    lake.commit_run(run_id, {})
    return done


async def test_work_committed_runs_recorded_is_answered_without_reading_it(
    tmp_path: Path, reads: list[str]
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="a")
    await WorkLedger(lake, "run-1").mark_done(key, record("run-1", "row-a", work_key=key))
    committed_run(lake, "run-1", key, "row-a", output_sha256="ab" * 32)

    ledger = WorkLedger(lake, "run-2")
    entry = await ledger.done(key)
    assert entry is not None and entry.produced_by == "run-1"
    assert entry.record.output_sha256 == "ab" * 32 and entry.record.work_key == key
    assert await ledger.recorded_elsewhere(entry, "row-a") == "run-1"
    assert await ledger.recorded_elsewhere(entry, "row-b") is None  # same work, another row
    # Nothing was read per key: the listing and the committed metadata answered.
    assert reads == []
    assert ledger.snapshot.stats["committed_records"] == 1


async def test_a_key_the_listing_lacks_is_not_done_and_costs_no_read(
    tmp_path: Path, reads: list[str]
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="late")
    ledger = WorkLedger(lake, "run-1")
    assert await ledger.done(key) is None
    assert await ledger.job(key) is None
    # Another run writes it after this run listed: not seen (two runs at once may both do
    # a row, as documented), while this run's own writes are.
    await WorkLedger(lake, "run-2").mark_done(key, record("run-2", "row-a"))
    assert await ledger.done(key) is None
    assert reads == []
    mine = work_key(stage="tryon", person="mine")
    await ledger.mark_done(mine, record("run-1", "row-b"))
    entry = await ledger.done(mine)
    assert entry is not None and entry.produced_by == "run-1"
    # A chunk in another process does not trust a listing: it reads.
    other_process = WorkLedger(lake, "run-1-elsewhere", listing=False)
    found = await other_process.done(key)
    assert found is not None and found.produced_by == "run-2"


async def test_a_crashed_runs_work_is_read_and_adopted(tmp_path: Path, reads: list[str]) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="crashed")
    await WorkLedger(lake, "run-1").mark_done(key, record("run-1", "row-a"))
    # run-1 staged and even published a part, but was killed before its marker.
    lake.write_metadata("run-1", "part-a", [record("run-1", "row-a", work_key=key)])
    lake.commit_run("run-1", {})
    Path(lake.commit_marker("run-1")).unlink()

    ledger = WorkLedger(lake, "run-2")
    entry = await ledger.done(key)
    assert entry is not None and not entry.committed and entry.produced_by == "run-1"
    assert len(reads) == 1  # listed, not in committed metadata: read from work/
    assert await ledger.recorded_elsewhere(entry, "row-a") is None
    await ledger.adopt(entry, "row-a")
    lake.write_metadata("run-2", "part-a", [record("run-2", "row-a", work_key=key)])
    lake.commit_run("run-2", {})
    third = WorkLedger(lake, "run-3")
    entry = await third.done(key)
    assert entry is not None and entry.committed
    assert await third.recorded_elsewhere(entry, "row-a") == "run-2"


async def test_failed_records_are_not_done_work(tmp_path: Path, reads: list[str]) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="failed")
    committed_run(lake, "run-1", key, "row-a", status=Status.FAILED, output_uri=None)
    assert await WorkLedger(lake, "run-2").done(key) is None  # not in work/ either
    # run-3 did it and crashed: its entry, not run-1's failed record, answers.
    await WorkLedger(lake, "run-3").mark_done(key, record("run-3", "row-a", work_key=key))
    entry = await WorkLedger(lake, "run-4").done(key)
    assert entry is not None and entry.produced_by == "run-3" and not entry.committed
    assert entry.record.status == Status.SUCCEEDED and len(reads) == 1


async def test_a_job_is_deleted_only_when_there_is_one(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="job")
    deletes: list[str] = []
    original = Lake.aremove_if_exists

    async def count(self: Lake, path: str) -> None:
        deletes.append(path)
        await original(self, path)

    ledger = WorkLedger(lake, "run-1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Lake, "aremove_if_exists", count)
        await ledger.forget_job(key)  # a synchronous provider's row: no job, no delete
        assert deletes == []
        await ledger.record_job(key, "hidream", "task-1")
        await ledger.forget_job(key)
        assert len(deletes) == 1
        # A job an earlier run left behind is listed, resumed and then forgotten.
        await WorkLedger(lake, "run-2").record_job(key, "hidream", "task-2")
        later = WorkLedger(lake, "run-3")
        job = await later.job(key)
        assert job is not None and job.job_id == "task-2"
        await later.forget_job(key)
        assert len(deletes) == 2 and await WorkLedger(lake, "run-4").job(key) is None


async def test_committed_work_adopted_for_another_row_keeps_its_whole_record(
    tmp_path: Path, reads: list[str]
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="tryon", person="shared")
    done = record("run-1", "row-a", work_key=key, prompt="a prompt", total_ms=12.5)
    await WorkLedger(lake, "run-1").mark_done(key, done)
    committed_run(lake, "run-1", key, "row-a", prompt="a prompt", total_ms=12.5)

    ledger = WorkLedger(lake, "run-2")
    entry = await ledger.done(key)
    assert entry is not None and entry.partial and reads == []
    assert await ledger.recorded_elsewhere(entry, "row-b") is None
    await ledger.adopt(entry, "row-b")  # reads the whole record first: one GET
    assert len(reads) == 1
    stored = json.loads(Path(lake.path("work", key[:2], f"{key}.json")).read_text())
    assert stored["record"]["prompt"] == "a prompt" and stored["record"]["total_ms"] == 12.5
    assert stored["recorded"] == {"row-a": "run-1", "row-b": "run-2"}


async def test_an_invalid_row_without_id_is_found_in_committed_metadata(
    tmp_path: Path, reads: list[str]
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    key = work_key(stage="invalid", row_index=3)
    finding = RowRecord(
        run_id="run-1",
        row_id=None,
        row_index=3,
        provider="changeclothes",
        status=Status.INVALID,
        work_key=key,
    )
    await WorkLedger(lake, "run-1").mark_done(key, finding.model_copy(update={"row_id": "#3"}))
    lake.write_metadata("run-1", "part-invalid", [finding])
    lake.commit_run("run-1", {})
    ledger = WorkLedger(lake, "run-2")
    entry = await ledger.done(key)
    assert entry is not None and entry.committed and reads == []
    assert await ledger.recorded_elsewhere(entry, "#3") == "run-1"
