"""The scorecard's figures from hand-built records, and committed runs read back from a lake."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from schemas.results import RowRecord, Status, records_to_frame
from tasks.lake import Lake
from tasks.scorecard import (
    SCORECARD_SCHEMA,
    filter_records,
    format_codes,
    parse_time,
    read_committed,
    records_frame,
    run_scorecard,
    scorecard,
    scorecard_bytes,
    scorecard_flat,
    scorecard_rows,
    scorecard_text_rows,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NEW_COLUMNS = ("track", "fallback_from", "fallback_to", "coarse_provider")


def rec(index: int, provider: str, status: Status | str, **fields: Any) -> RowRecord:
    return RowRecord.model_validate(
        {
            "run_id": "run-a",
            "row_id": f"r{index}",
            "row_index": index,
            "provider": provider,
            "status": status,
            "category": "upper_body",
            **fields,
        }
    )


def by_provider(frame: pl.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["provider"], row["stage"]): row for row in frame.iter_rows(named=True)}


def mixed_run() -> list[RowRecord]:
    """changeclothes: five called rows (one moderated, fell back to hidream; two timed out),
    an invalid row and a reused one; hidream: the fallback and a compared row; one refine."""
    ms = {"attempts": 1}
    return [
        rec(0, "changeclothes", Status.SUCCEEDED, provider_ms=100.0, **ms),
        rec(1, "changeclothes", Status.SUCCEEDED, provider_ms=200.0, attempts=3),
        rec(
            2,
            "changeclothes",
            Status.FAILED,
            error_code="MODERATED",
            provider_ms=300.0,
            fallback_to="hidream",
            **ms,
        ),
        rec(2, "hidream", Status.SUCCEEDED, fallback_from="changeclothes", provider_ms=5.0, **ms),
        rec(3, "changeclothes", Status.FAILED, error_code="TIMEOUT", provider_ms=400.0, **ms),
        rec(4, "changeclothes", Status.FAILED, error_code="TIMEOUT", provider_ms=1000.0, **ms),
        rec(5, "changeclothes", Status.FAILED, error_code=None, attempts=0),  # no call made
        rec(6, "changeclothes", Status.INVALID, error_code="INVALID_ROW"),
        # Reused from a crashed run: done, no call, but its time is the old call's.
        rec(7, "changeclothes", Status.SUCCEEDED, provider_ms=9999.0, reused_from_run="run-0"),
        # A call went out but its time is unknown: counted in attempts, not in percentiles.
        rec(8, "changeclothes", Status.SKIPPED, error_code="NO_CREDITS", attempts=1),
        rec(0, "hidream", Status.SUCCEEDED, track="hidream", provider_ms=15.0, **ms),
        rec(0, "ailab", Status.FAILED, stage="refine", error_code="MODERATED", attempts=2),
    ]


def test_figures_per_provider_and_stage() -> None:
    score = scorecard(records_frame(mixed_run()))

    assert [(r["provider"], r["stage"]) for r in score.iter_rows(named=True)] == [
        ("changeclothes", "tryon"),
        ("hidream", "tryon"),
        ("ailab", "refine"),
    ]  # try-on first, then by provider
    cc = by_provider(score)[("changeclothes", "tryon")]
    assert {k: cc[k] for k in ("rows", "records", "succeeded", "failed", "skipped", "invalid")} == {
        "rows": 9,
        "records": 9,
        "succeeded": 3,
        "failed": 4,  # the record that fell back is a failure of changeclothes
        "skipped": 1,
        "invalid": 1,
    }
    # Most frequent first; the code-less failure is kept (null).
    assert cc["failed_by_code"] == [
        {"code": "TIMEOUT", "count": 2},
        {"code": "MODERATED", "count": 1},
        {"code": None, "count": 1},
    ]
    assert cc["attempts"] == 1 + 3 + 1 + 1 + 1 + 1
    # Over the five calls with a time: 100, 200, 300, 400, 1000 (not the reused 9999).
    called = [100.0, 200.0, 300.0, 400.0, 1000.0]
    assert cc["provider_ms_p50"] == pytest.approx(300.0)
    assert cc["provider_ms_p95"] == pytest.approx(np.percentile(called, 95))  # 880
    assert cc["provider_ms_p95"] == pytest.approx(880.0)
    assert (cc["fallbacks_out"], cc["fallbacks_in"]) == (1, 0)

    hd = by_provider(score)[("hidream", "tryon")]
    # Row 0 (compared) and row 2 (the fallback): two rows, both succeeded.
    assert (hd["rows"], hd["records"], hd["succeeded"], hd["failed"]) == (2, 2, 2, 0)
    assert (hd["fallbacks_out"], hd["fallbacks_in"]) == (0, 1)
    assert (hd["provider_ms_p50"], hd["provider_ms_p95"]) == pytest.approx((10.0, 14.5))
    assert hd["failed_by_code"] == []

    refine = by_provider(score)[("ailab", "refine")]
    assert (refine["failed"], refine["attempts"]) == (1, 2)
    assert refine["provider_ms_p50"] is None and refine["provider_ms_p95"] is None


def test_a_provider_meeting_a_row_twice_counts_one_row_two_records() -> None:
    records = [
        rec(0, "a", Status.FAILED, error_code="X", fallback_to="b", attempts=1, provider_ms=1.0),
        rec(0, "b", Status.SUCCEEDED, fallback_from="a", attempts=1, provider_ms=2.0),
        rec(0, "b", Status.FAILED, track="b", error_code="Y", attempts=1, provider_ms=3.0),
    ]
    b = by_provider(scorecard(records_frame(records)))[("b", "tryon")]
    assert (b["rows"], b["records"], b["succeeded"], b["failed"]) == (1, 2, 1, 1)
    assert format_codes(b["failed_by_code"]) == "Y 1"


def test_rows_are_per_run_and_by_run_splits_them() -> None:
    first = [rec(0, "p", Status.SUCCEEDED), rec(1, "p", Status.FAILED, error_code="X")]
    second = [r.model_copy(update={"run_id": "run-b"}) for r in first]
    frame = records_frame(first + second)

    together = scorecard(frame)
    assert together.height == 1 and "run_id" not in together.columns
    assert together.row(0, named=True)["rows"] == 4  # the same indexes in two runs
    split = scorecard(frame.lazy(), by_run=True)
    assert split["run_id"].to_list() == ["run-a", "run-b"]
    assert split["rows"].to_list() == [2, 2]
    assert split["failed_by_code"].to_list() == [[{"code": "X", "count": 1}]] * 2


def test_no_records_give_an_empty_typed_frame() -> None:
    empty = scorecard(records_frame([]))
    assert empty.height == 0
    assert dict(empty.schema) == {k: v for k, v in SCORECARD_SCHEMA.items() if k != "run_id"}
    assert dict(scorecard(records_to_frame([]).lazy(), by_run=True).schema) == SCORECARD_SCHEMA
    assert scorecard_flat(empty).schema["failed_by_code"] == pl.String()
    assert scorecard_rows(empty) == []


def test_records_an_earlier_run_holds_are_not_this_runs() -> None:
    done = rec(0, "p", Status.SUCCEEDED, attempts=1, provider_ms=50.0)
    held = rec(1, "p", Status.SUCCEEDED, attempts=1, provider_ms=70.0)
    held.mark_already_recorded()

    row = run_scorecard([done, held]).row(0, named=True)
    assert (row["rows"], row["attempts"], row["provider_ms_p95"]) == (1, 1, 50.0)
    assert records_frame([done, held], include_already_recorded=True).height == 2


def test_old_frames_without_the_new_columns_still_score() -> None:
    old = records_frame(mixed_run()).drop(NEW_COLUMNS)
    score = by_provider(scorecard(old))
    assert score[("changeclothes", "tryon")]["failed"] == 4
    assert score[("changeclothes", "tryon")]["fallbacks_out"] == 0  # nothing says so
    assert score[("hidream", "tryon")]["fallbacks_in"] == 0


def test_text_forms_and_the_parquet_round_trip() -> None:
    score = scorecard(records_frame(mixed_run()))
    cc = scorecard_rows(score)[0]
    assert cc["failed_by_code"] == "TIMEOUT 2, MODERATED 1, no code 1"
    assert scorecard_flat(score)["failed_by_code"].to_list() == [
        "TIMEOUT 2, MODERATED 1, no code 1",
        "",
        "MODERATED 1",
    ]
    back = pl.read_parquet(BytesIO(scorecard_bytes(score)))
    assert back.equals(score) and back.schema == score.schema


def test_filters_by_run_category_and_time() -> None:
    def at(minutes: int) -> datetime:
        return T0 + timedelta(minutes=minutes)

    records = [
        rec(0, "p", Status.SUCCEEDED, started_at=at(0)),
        rec(1, "p", Status.SUCCEEDED, started_at=at(30), category="dresses"),
        rec(2, "p", Status.INVALID),  # never started: takes its run's start
        rec(0, "p", Status.FAILED, run_id="run-b", started_at=at(120), error_code="X"),
        rec(1, "p", Status.INVALID, run_id="run-b"),  # run-b's start: its started.json
        rec(0, "p", Status.INVALID, run_id="run-c"),  # no start known at all: never in a window
    ]
    frame = records_frame(records)
    starts = {"run-b": at(-630)}

    def indexes(**filters: Any) -> list[tuple[str, int]]:
        kept = filter_records(frame, run_starts=starts, **filters).collect()
        return sorted(zip(kept["run_id"], kept["row_index"], strict=True))

    assert indexes(runs=["run-b"]) == [("run-b", 0), ("run-b", 1)]
    assert indexes(categories=["dresses"]) == [("run-a", 1)]
    assert indexes(since=at(0), until=at(30)) == [("run-a", 0), ("run-a", 2)]
    assert indexes(since=at(60)) == [("run-b", 0)]
    # A naive time is UTC; the run's start from started.json dates run-b's invalid row.
    assert indexes(until=datetime(2026, 3, 1, 2, 0)) == [("run-b", 1)]
    assert parse_time("2026-03-01T12:00") == T0
    assert parse_time("2026-03-01T14:00+02:00") == T0
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        parse_time("yesterday", "--since")


# ------------------------------------------------------------------------- a lake's runs


def commit(lake: Lake, run_id: str, records: list[RowRecord], **start: datetime) -> None:
    lake.write_metadata(run_id, "part-00000", records)
    if start:
        lake.write_json(lake.path("runs", run_id, "started.json"), {"started_at": start["at"]})
    lake.commit_run(run_id, {"run_id": run_id})


def test_committed_runs_are_read_back_old_parts_included(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    commit(lake, "run-a", mixed_run(), at=T0)
    # A run committed before the new columns existed: its part lacks them.
    old = records_frame([rec(0, "changeclothes", Status.FAILED, error_code="X", attempts=2)])
    folder = tmp_path / "lake" / "metadata" / "run_id=run-old"
    folder.mkdir(parents=True)
    old.drop(NEW_COLUMNS).write_parquet(folder / "part-00000.parquet")
    lake.fs.pipe_file(lake.commit_marker("run-old"), json.dumps({}).encode())
    # Published but never committed (a crash between copy and marker): not read.
    lake.write_metadata("run-half", "part-00000", [rec(0, "changeclothes", Status.SUCCEEDED)])
    half = lake.path("metadata", "run_id=run-half", "part-00000.parquet")
    lake.fs.copy(lake.run_path("run-half", "parts", "part-00000.parquet"), half)

    found = read_committed(lake)
    assert found.runs == ("run-a", "run-old")
    assert (found.skipped, found.not_committed) == (("run-half",), ())
    assert found.run_starts == {"run-a": T0}
    assert found.records.filter(pl.col("run_id") == "run-old")["track"].to_list() == [None]

    cc = by_provider(scorecard(found.records))[("changeclothes", "tryon")]
    assert (cc["rows"], cc["failed"], cc["attempts"]) == (10, 5, 10)
    assert format_codes(cc["failed_by_code"]) == "TIMEOUT 2, MODERATED 1, X 1, no code 1"

    asked = read_committed(lake, runs=["run-old", "nope", "../x"])
    assert asked.runs == ("run-old",) and asked.not_committed == ("nope", "../x")
    assert asked.records["run_id"].unique().to_list() == ["run-old"]
    assert read_committed(Lake.open(str(tmp_path / "empty"))).records.height == 0


def test_cost_adds_up_per_provider_and_is_unknown_when_a_price_was() -> None:
    records = [
        rec(0, "changeclothes", Status.SUCCEEDED, cost=0.1, attempts=1),
        rec(1, "changeclothes", Status.FAILED, cost=0.0, attempts=1),  # not charged
        rec(2, "changeclothes", Status.SUCCEEDED, cost=0.1, attempts=1),
        rec(0, "hidream", Status.SUCCEEDED, cost=None, attempts=1),  # price unknown
        rec(1, "hidream", Status.SUCCEEDED, cost=0.04, attempts=1),
    ]
    card = by_provider(run_scorecard(records))
    assert card[("changeclothes", "tryon")]["cost"] == pytest.approx(0.2)
    assert card[("hidream", "tryon")]["cost"] is None
    text = {row["provider"]: row["cost"] for row in scorecard_text_rows(run_scorecard(records))}
    assert text == {"changeclothes": "0.2", "hidream": "-"}
