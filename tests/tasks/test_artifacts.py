"""Run artifacts published from inside flow runs, read back through the Prefect API."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
import pytest
from PIL import Image
from prefect import flow, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import Artifact
from prefect.client.schemas.sorting import ArtifactSort
from prefect.runtime import flow_run

from schemas.results import ErrorKind, RowRecord, Stage, Status
from tasks.artifacts import (
    PROGRESS_KEY,
    REPORT_KEY,
    SCORECARD_KEY,
    SUMMARY_TABLE_KEY,
    ProgressTee,
    RunProgressArtifact,
    RunReport,
    artifact_key,
    publish_run_outputs,
    render_report_markdown,
    scorecard_table,
    summary_table,
)
from tasks.lake import Lake
from tasks.report import count_statuses, group_failures
from tasks.scorecard import run_scorecard

HOSTILE_ID = "<script>alert(1)</script>"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Summary:
    """Stands in for ``schemas.summary.RunSummary`` (``RunFacts``)."""

    run_id: str
    total_rows: int
    results_uri: str
    metadata_uri: str
    summary_uri: str
    duration_s: float
    fatal_error: str | None = None
    currency: str | None = None
    cost: float | None = None
    budget: float | None = None


def record(index: int, row_id: str, status: Status, **fields: Any) -> RowRecord:
    return RowRecord.model_validate(
        {
            "run_id": "run-a",
            "row_id": row_id,
            "row_index": index,
            "provider": "changeclothes",
            "status": status,
            **fields,
        }
    )


def sample_records(lake: Lake) -> list[RowRecord]:
    buffer = BytesIO()
    Image.new("RGB", (40, 60), (20, 200, 40)).save(buffer, "PNG")
    output = lake.write_bytes(lake.path("outputs", "ok.png"), buffer.getvalue())
    refine: dict[str, Any] = {"stage": Stage.REFINE, "provider": "ailab"}
    rejected: dict[str, Any] = {
        "error_kind": ErrorKind.PERMANENT,
        "error_code": "IMAGE_REJECTED",
    }
    return [
        record(0, "ok-1", Status.SUCCEEDED, output_uri=output),
        record(1, "ok-2", Status.SUCCEEDED, output_uri=output),
        record(0, "ok-1", Status.SUCCEEDED, output_uri=output, **refine),
        record(
            1,
            "ok-2",
            Status.FAILED,
            error_kind=ErrorKind.PERMANENT,
            error_code="MODERATED",
            error_message="no | way",
            **refine,
        ),
        record(
            2,
            HOSTILE_ID,
            Status.INVALID,
            error_kind=ErrorKind.INVALID,
            error_code="INVALID_ROW",
            error_message="id unsafe for a path",
        ),
        record(3, "bad-1", Status.FAILED, error_message="<b>too small</b>", **rejected),
        record(4, "bad-2", Status.FAILED, error_message="too small", **rejected),
    ]


async def artifacts_of(flow_run_id: UUID) -> dict[str, Artifact]:
    """The flow run's artifacts by key (the latest version of each)."""
    # The request ``PrefectClient.read_artifacts`` makes, minus the nulls it sends for omitted
    # filters: Prefect's server under fastapi >= 0.151 rejects them (422), and an empty
    # task-run filter instead would match only artifacts made inside tasks.
    body = {
        "artifacts": ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
        ).model_dump(mode="json", exclude_unset=True),
        "sort": ArtifactSort.CREATED_DESC.value,
        "limit": 50,
    }
    async with get_client() as client:
        response = await client.request("POST", "/artifacts/filter", json=body)
    found = Artifact.model_validate_list(response.json())
    latest: dict[str, Artifact] = {}
    for artifact in found:
        latest.setdefault(artifact.key or "", artifact)
    return latest


def current_flow_run_id() -> UUID:
    run_id = flow_run.get_id()
    assert run_id is not None
    return UUID(run_id)


# ---------------------------------------------------------------------------- pure parts


def test_artifact_keys_are_valid_prefect_keys() -> None:
    assert artifact_key("Try-on Run_Summary: 2026/01") == "try-on-run-summary-2026-01"
    for key in (SUMMARY_TABLE_KEY, REPORT_KEY, PROGRESS_KEY, SCORECARD_KEY):
        assert artifact_key(key) == key
    with pytest.raises(ValueError):
        artifact_key("!!!")


def test_summary_table_has_a_row_per_provider_and_stage(tmp_path: Path) -> None:
    table = summary_table(count_statuses(sample_records(Lake.open(str(tmp_path)))))
    assert table == [
        {"provider": "ailab", "stage": "refine", "succeeded": 1, "failed": 1, "invalid": 0,
         "skipped": 0, "total": 2},
        {"provider": "changeclothes", "stage": "tryon", "succeeded": 2, "failed": 2,
         "invalid": 1, "skipped": 0, "total": 5},
    ]  # fmt: skip


def test_report_markdown_escapes_untrusted_text(tmp_path: Path) -> None:
    records = sample_records(Lake.open(str(tmp_path)))
    markdown = render_report_markdown(
        RunReport(
            run_id="run-a",
            total_rows=5,
            counts=count_statuses(records),
            failures=group_failures(records),
            results_uri="/lake/outputs",
            metadata_uri="/lake/metadata/**/*.parquet",
        )
    )
    assert "<script>" not in markdown and "<b>" not in markdown
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in markdown
    # The pipe in a provider's message must not add a table column.
    moderated = next(line for line in markdown.splitlines() if "MODERATED" in line)
    assert moderated.replace("\\|", "").count("|") == 8
    assert "| `IMAGE_REJECTED` | permanent | 2 | `bad-1`, `bad-2` |" in markdown


def test_report_markdown_states_the_cost_and_budget(tmp_path: Path) -> None:
    records = sample_records(Lake.open(str(tmp_path)))
    base = {
        "run_id": "run-a",
        "total_rows": 5,
        "counts": count_statuses(records),
        "failures": [],
        "results_uri": "/lake/outputs",
        "metadata_uri": "/lake/metadata/**/*.parquet",
    }
    spent = render_report_markdown(RunReport(**base, currency="USD", cost=0.45, budget=1.0))
    assert "Cost: 0.45 USD of a 1 USD budget." in spent
    unknown = render_report_markdown(RunReport(**base, currency="EUR"))
    assert "Cost: unknown (a provider's price is unknown)." in unknown
    assert "Cost" not in render_report_markdown(RunReport(**base))


def test_scorecard_table_escapes_codes_and_keeps_numbers(tmp_path: Path) -> None:
    records = sample_records(Lake.open(str(tmp_path)))
    records.append(record(5, "odd", Status.FAILED, error_code="A|B", attempts=2, provider_ms=10.0))
    rows = scorecard_table(run_scorecard(records))
    table = {(row["provider"], row["stage"]): row for row in rows}
    tryon = table[("changeclothes", "tryon")]
    assert tryon["failed_by_code"] == "IMAGE\\_REJECTED 2, A\\|B 1"
    assert (tryon["rows"], tryon["failed"], tryon["invalid"], tryon["attempts"]) == (6, 3, 1, 2)
    assert tryon["provider_ms_p50"] == 10.0
    assert table[("ailab", "refine")]["failed_by_code"] == "MODERATED 1"


# ----------------------------------------------------------------------- through Prefect


async def test_run_outputs_are_published_and_read_back(
    prefect_server: None, tmp_path: Path
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    records = sample_records(lake)
    summary = Summary(
        run_id="run-a",
        total_rows=5,
        results_uri=lake.full_uri(lake.path("outputs")),
        metadata_uri=lake.metadata_glob(),
        summary_uri=lake.full_uri(lake.path("runs", "run-a", "summary.json")),
        duration_s=2.5,
    )

    @flow
    async def finished_run() -> UUID:
        async with RunProgressArtifact() as progress:
            progress.started(5)
            for done in records[:5]:
                progress.row_done(done)
        await publish_run_outputs(lake, summary, records=records)
        return current_flow_run_id()

    flow_run_id = await finished_run()
    found = await artifacts_of(flow_run_id)

    assert set(found) == {SUMMARY_TABLE_KEY, REPORT_KEY, PROGRESS_KEY, SCORECARD_KEY}
    kinds = [found[k].type for k in (SUMMARY_TABLE_KEY, REPORT_KEY, PROGRESS_KEY, SCORECARD_KEY)]
    assert kinds == ["table", "markdown", "progress", "table"]
    assert found[PROGRESS_KEY].data == 100.0
    table = json.loads(found[SUMMARY_TABLE_KEY].data)
    assert {(r["provider"], r["stage"]): r["total"] for r in table} == {
        ("ailab", "refine"): 2,
        ("changeclothes", "tryon"): 5,
    }
    # The scorecard: a row per provider and stage, as written beside the run in the lake.
    score = {(r["provider"], r["stage"]): r for r in json.loads(found[SCORECARD_KEY].data)}
    assert set(score) == {("ailab", "refine"), ("changeclothes", "tryon")}
    assert score[("changeclothes", "tryon")] | {"failed_by_code": None} == {
        "provider": "changeclothes", "stage": "tryon", "rows": 5, "records": 5,
        "succeeded": 2, "failed": 2, "skipped": 0, "invalid": 1, "failed_by_code": None,
        "attempts": 0, "provider_ms_p50": None, "provider_ms_p95": None,
        "fallbacks_out": 0, "fallbacks_in": 0, "cost": None,
    }  # fmt: skip
    assert score[("changeclothes", "tryon")]["failed_by_code"] == "IMAGE\\_REJECTED 2"
    assert score[("ailab", "refine")]["failed_by_code"] == "MODERATED 1"
    written = lake.run_path("run-a", "scorecard.parquet")
    assert pl.read_parquet(written).equals(run_scorecard(records))
    assert pl.read_parquet(written)["run_id"].to_list() == ["run-a", "run-a"]  # names its run
    markdown = found[REPORT_KEY].data
    assert "# Try-on run `run-a`" in markdown
    assert f"- Scorecard: `{written}` (per provider and stage)" in markdown
    sheet_html = lake.full_uri(lake.path("runs", "run-a", "contact_sheet.html"))
    assert f"Contact sheet: `{sheet_html}`" in markdown
    assert f"`{summary.metadata_uri}`" in markdown
    assert (
        "**5 rows.** tryon: 2 succeeded, 2 failed, 1 invalid. refine: 1 succeeded, 1 failed."
        in markdown
    )
    assert "`IMAGE_REJECTED`" in markdown and HOSTILE_ID not in markdown
    # ...and the contact sheet the report points at is in the lake, with every row.
    page = Path(sheet_html).read_text(encoding="utf-8")
    assert page.count("<tr class='row-") == 5


async def test_progress_is_throttled_and_ends_at_100(prefect_server: None) -> None:
    clock = FakeClock()
    seen: list[str] = []

    class Recorder:
        def started(self, total: int) -> None:
            seen.append(f"started {total}")

        def row_done(self, record: RowRecord) -> None:
            seen.append(str(record.row_id))

    @flow
    async def long_run() -> tuple[UUID, list[float], list[float]]:
        row = record(0, "r", Status.SUCCEEDED)
        read_back: list[float] = []
        async with RunProgressArtifact(clock=clock) as progress:
            assert progress.artifact_id is not None
            sink = ProgressTee(None, Recorder(), progress)
            sink.started(1000)
            clock.now += 10
            for _ in range(5):  # 0.5 %: under the step, however long it took
                sink.row_done(row)
            await progress.wait_sent()
            assert progress.sent == []
            for _ in range(5):  # 1 %: due
                sink.row_done(row)
            await progress.wait_sent()
            assert progress.sent == [1.0]
            for _ in range(200):  # 21 %, but within the same second: held back
                sink.row_done(row)
            await progress.wait_sent()
            assert progress.sent == [1.0]
            clock.now += 1.0
            sink.row_done(row)  # a second later: sends where the run is
            await progress.wait_sent()
            assert progress.sent == [1.0, 21.1]
            found = await artifacts_of(current_flow_run_id())
            read_back.append(float(found[PROGRESS_KEY].data))
            # Rows finishing on another thread are counted on the flow's loop.
            await asyncio.to_thread(lambda: [progress.row_done(row) for _ in range(10)])
            await asyncio.sleep(0)
            assert progress.done == 221
        return current_flow_run_id(), progress.sent, read_back

    flow_run_id, sent, read_back = await long_run()

    assert read_back == [21.1]
    assert sent == [1.0, 21.1, 100.0]
    assert seen[:2] == ["started 1000", "r"] and len(seen) == 212
    assert (await artifacts_of(flow_run_id))[PROGRESS_KEY].data == 100.0


async def test_a_burst_of_rows_sends_few_updates(prefect_server: None) -> None:
    @flow
    async def burst() -> list[float]:
        row = record(0, "r", Status.SUCCEEDED)
        async with RunProgressArtifact() as progress:
            progress.started(5000)
            for _ in range(5000):
                progress.row_done(row)
        return progress.sent

    # Real clock: the burst takes well under the 1 s interval, so only the final value.
    assert await burst() == [100.0]


async def test_progress_stops_where_a_failed_run_stopped(prefect_server: None) -> None:
    progress = RunProgressArtifact(clock=FakeClock())

    @flow
    async def crashing() -> None:
        async with progress:
            progress.started(4)
            progress.row_done(record(0, "r", Status.SUCCEEDED))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await crashing()
    assert progress.sent == [25.0]


async def test_update_sets_progress_from_any_thread(prefect_server: None) -> None:
    clock = FakeClock()

    @flow
    async def direct() -> list[float]:
        async with RunProgressArtifact(clock=clock) as progress:
            clock.now += 5
            await asyncio.to_thread(progress.update, 50, 200)
            await asyncio.sleep(0)
            await progress.wait_sent()
            assert progress.sent == [25.0]
        return progress.sent

    assert await direct() == [25.0, 100.0]
