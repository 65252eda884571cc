"""A run's summary explains itself: why rows did not succeed, and what the exit status is."""

from __future__ import annotations

from schemas.results import ErrorKind, RowRecord, Stage, Status
from schemas.summary import ErrorCount, RunSummary
from tasks.error_counts import count_errors, error_source, top_errors
from tasks.tryon import describe_counts


def record(
    index: int,
    status: Status,
    code: str | None = None,
    message: str | None = None,
    *,
    stage: Stage = Stage.TRYON,
    kind: ErrorKind | None = ErrorKind.PERMANENT,
    provider: str = "changeclothes",
) -> RowRecord:
    return RowRecord(
        run_id="r",
        row_id=f"row-{index}",
        row_index=index,
        stage=stage,
        provider=provider,
        status=status,
        error_kind=None if status == Status.SUCCEEDED else kind,
        error_code=code,
        error_message=message,
    )


def test_errors_are_counted_per_stage_and_code_with_the_first_example() -> None:
    records = [
        record(0, Status.SUCCEEDED),
        record(1, Status.FAILED, "FETCH_NOT_FOUND", "a.jpg: no such file"),
        record(2, Status.FAILED, "FETCH_NOT_FOUND", "b.jpg: no such file"),
        record(3, Status.INVALID, "INVALID_ROW", "bad category", kind=ErrorKind.INVALID),
        record(4, Status.FAILED, "30001", "key\nnot accepted", kind=ErrorKind.FATAL),
        # Not failures of the run: the refiner cannot take the row, or the try-on failed first.
        record(5, Status.SKIPPED, "REFINE_NOT_APPLICABLE", "a prompt row", stage=Stage.REFINE),
        record(1, Status.SKIPPED, "NO_COARSE_RESULT", "try-on failed", stage=Stage.REFINE),
        # A run-fatal error kept this one from running: a retry would redo it.
        record(6, Status.SKIPPED, "30002", "no credits", kind=ErrorKind.FATAL),
    ]
    counted = {(e.stage, e.code): e for e in count_errors(records)}
    assert set(counted) == {
        ("tryon", "FETCH_NOT_FOUND"),
        ("tryon", "INVALID_ROW"),
        ("tryon", "30001"),
        ("tryon", "30002"),
    }
    fetch = counted[("tryon", "FETCH_NOT_FOUND")]
    assert (fetch.count, fetch.source, fetch.example, fetch.example_row) == (
        2,
        "input fetch",
        "a.jpg: no such file",
        "row-1",
    )
    assert counted[("tryon", "INVALID_ROW")].source == "manifest"
    assert counted[("tryon", "30001")].source == "changeclothes"
    assert counted[("tryon", "30001")].example == "key not accepted"  # one line
    assert fetch.describe() == "2 × FETCH_NOT_FOUND  (input fetch) a.jpg: no such file"


def test_chunks_merge_largest_first_and_long_examples_are_cut() -> None:
    first = count_errors([record(0, Status.FAILED, "DECODE_FAILED", "x" * 2000)])
    second = count_errors(
        [record(i, Status.FAILED, "FETCH_TIMEOUT", f"slow {i}") for i in range(1, 4)]
        + [record(4, Status.FAILED, "DECODE_FAILED", "other")]
        + [record(5, Status.FAILED, "ERR", "refiner said no", stage=Stage.REFINE, provider="ailab")]
    )
    merged = top_errors([first, second])
    assert [(e.code, e.count) for e in merged] == [
        ("FETCH_TIMEOUT", 3),
        ("DECODE_FAILED", 2),
        ("ERR", 1),
    ]
    assert merged[1].example.startswith("xxx") and len(merged[1].example) == 500
    assert merged[1].source == "input image"
    assert merged[2].source == "refine, ailab"
    assert top_errors([second], limit=1)[0].code == "FETCH_TIMEOUT"
    assert error_source("tryon", "NO_RESULT", "hidream") == "hidream"


def summary(**fields: object) -> RunSummary:
    base: dict[str, object] = {
        "run_id": "r",
        "provider": "changeclothes",
        "lake": "/l",
        "results_uri": "/l/outputs",
        "metadata_uri": "/l/metadata/**/*.parquet",
        "summary_uri": "/l/runs/r/summary.json",
        "total_rows": 3,
        "provider_calls": 3,
        "duration_s": 1.0,
    }
    return RunSummary.model_validate({**base, **fields})


def test_rows_the_refiner_cannot_take_do_not_fail_the_run() -> None:
    """Decision: REFINE_NOT_APPLICABLE (a prompt or lower_body row under --refine) is done,
    not failed: its try-on succeeded and nothing more applies. Exit status 0."""
    done = summary(counts={"succeeded": 3}, refine_counts={"succeeded": 1, "skipped": 2})
    assert done.exit_code == 0
    # Anything that keeps a row from succeeding is 1: failed, invalid, skipped by a fatal
    # error (counted as unfinished), a refine stage that failed (unfinished too).
    assert summary(counts={"succeeded": 2, "failed": 1}, unfinished=1).exit_code == 1
    assert summary(counts={"succeeded": 2, "invalid": 1}).exit_code == 1
    assert summary(counts={"succeeded": 2, "skipped": 1}, unfinished=1).exit_code == 1
    assert summary(counts={"succeeded": 3}, refine_counts={"failed": 1}, unfinished=1).exit_code


def test_summaries_written_before_top_errors_still_read() -> None:
    old = summary(counts={"succeeded": 3}).model_dump(mode="json")
    del old["top_errors"]
    assert RunSummary.model_validate(old).top_errors == []
    with_errors = summary(
        counts={"failed": 3},
        top_errors=[ErrorCount(stage="tryon", code="X", count=3, example="m")],
    )
    assert RunSummary.model_validate_json(with_errors.model_dump_json()) == with_errors


def test_chunk_log_lines_read_as_text() -> None:
    counts = {"tryon": {"succeeded": 8, "failed": 2}, "refine": {"skipped": 8}}
    assert describe_counts(counts) == "try-on 2 failed, 8 succeeded; refine 8 skipped"
    assert describe_counts({}) == "no rows"
