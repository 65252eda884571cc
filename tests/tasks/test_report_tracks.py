"""Contact sheets of runs with several providers: compared tracks, routes and fallback chains.

Synthetic records over real output files in a temporary lake (no Prefect, nothing fetched).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from schemas.results import ErrorKind, RowRecord, Stage, Status
from tasks.lake import Lake
from tasks.report import (
    PLACEHOLDER_RGB,
    ContactSheet,
    build_contact_sheet,
    group_rows,
    lake_output_reader,
)
from tests.tasks.test_report import GREEN, MAGENTA, YELLOW, close, parse, png_bytes

RUN_ID = "run-m"
CYAN, ORANGE = (0, 200, 220), (240, 140, 0)
T0 = datetime(2026, 3, 1, tzinfo=UTC)


class Records:
    """Records of one run whose outputs are solid-colour images in a lake."""

    def __init__(self, root: Path) -> None:
        self.lake = Lake.open(str(root / "lake"))
        self.records: list[RowRecord] = []

    def add(
        self,
        index: int,
        provider: str,
        status: Status,
        colour: tuple[int, int, int] | None = None,
        **fields: Any,
    ) -> RowRecord:
        if colour is not None:
            name = f"{index}-{provider}-{fields.get('track', 'p')}-{fields.get('stage', 't')}"
            fields["output_uri"] = self.lake.write_bytes(
                self.lake.path("outputs", f"{name}.png"), png_bytes(colour)
            )
        record = RowRecord.model_validate(
            {
                "run_id": RUN_ID,
                "row_id": f"row-{index}",
                "row_index": index,
                "provider": provider,
                "status": status,
                "category": "upper_body",
                "started_at": T0 + timedelta(seconds=len(self.records)),
                **fields,
            }
        )
        self.records.append(record)
        return record

    async def sheet(self, **options: Any) -> ContactSheet:
        return await build_contact_sheet(
            self.records, read_output=lake_output_reader(self.lake), **options
        )


def fell_back(fx: Records, index: int, colour: tuple[int, int, int]) -> None:
    """changeclothes moderated the row; hidream, its fallback, did it."""
    fx.add(
        index,
        "changeclothes",
        Status.FAILED,
        error_kind=ErrorKind.PERMANENT,
        error_code="MODERATED",
        error_message="moderated by changeclothes",
        fallback_to="hidream",
        attempts=1,
        provider_ms=200.0,
    )
    fx.add(
        index,
        "hidream",
        Status.SUCCEEDED,
        colour,
        fallback_from="changeclothes",
        attempts=1,
        provider_ms=900.0,
    )


@pytest.fixture
def compared(tmp_path: Path) -> Records:
    """Three rows, each also sent to hidream (compare): row 0 both succeed; row 1 changeclothes
    fell back to hidream in its own track, and the compared hidream failed; row 2 invalid (not
    compared: only valid rows are)."""
    fx = Records(tmp_path)
    fx.add(0, "changeclothes", Status.SUCCEEDED, GREEN, attempts=1, provider_ms=300.0)
    fx.add(0, "hidream", Status.SUCCEEDED, YELLOW, track="hidream", attempts=1, provider_ms=800.0)
    fell_back(fx, 1, MAGENTA)
    fx.add(
        1,
        "hidream",
        Status.FAILED,
        track="hidream",
        error_kind=ErrorKind.TRANSIENT,
        error_code="TIMEOUT",
        attempts=4,
        provider_ms=40_000.0,
    )
    fx.add(2, "changeclothes", Status.INVALID, error_code="INVALID_ROW")
    return fx


async def test_compared_providers_get_a_column_each(compared: Records) -> None:
    sheet = await compared.sheet()
    plain = await build_contact_sheet(
        [r for r in compared.records if r.track == "primary"],
        read_output=lake_output_reader(compared.lake),
    )
    layout = sheet.layout

    assert layout.compared == ("hidream",)
    assert layout.columns == ("person", "garment", "coarse", "coarse:hidream")
    # The primary column is named after the providers of its outcomes (most rows first).
    assert layout.labels == ("person", "garment", "changeclothes / hidream", "hidream")
    grid = Image.open(BytesIO(sheet.jpeg))
    assert grid.width == Image.open(BytesIO(plain.jpeg)).width + layout.cell
    assert grid.size == (4 * layout.cell + layout.status_width, layout.top + 3 * layout.row_height)

    def centre(row: int, column: str) -> tuple[int, ...]:
        left, top, right, bottom = layout.thumb_box(row, column)
        return grid.getpixel(((left + right) // 2, (top + bottom) // 2))

    assert close(centre(0, "coarse"), GREEN) and close(centre(0, "coarse:hidream"), YELLOW)
    # Row 1: the primary column shows the fallback's result; the compared call failed.
    assert close(centre(1, "coarse"), MAGENTA)
    assert not close(centre(1, "coarse:hidream"), YELLOW)
    left, top, _, _ = layout.thumb_box(1, "coarse:hidream")
    assert close(grid.getpixel((left + 2, top + 2)), PLACEHOLDER_RGB)

    page = parse(sheet)
    headings = sheet.html.split("<tbody>")[0].rsplit("<thead>", 1)[1]
    assert "<th>changeclothes / hidream</th><th>hidream</th><th>status</th>" in headings
    cells = {row[1]: row for row in page.rows}
    assert cells["row-1"][5] == "failed: TIMEOUT"
    assert cells["row-2"][2:6] == ["invalid row"] * 4
    status = cells["row-1"][-1]
    # Every attempt in order, then the compared track.
    order = [
        "try-on failed · changeclothes",
        "MODERATED",
        "fell back to hidream",
        "moderated by changeclothes",
        "try-on succeeded · hidream",
        "from changeclothes",
        "compare try-on failed · hidream · 4 attempt(s)",
        "TIMEOUT",
    ]
    positions = [status.find(text) for text in order]
    assert -1 not in positions and positions == sorted(positions), status
    assert "compare try-on succeeded · hidream" in cells["row-0"][-1]
    assert "compare try-on not run" in cells["row-2"][-1]
    # A compared failure colours the row: it did not succeed everywhere.
    assert [row.status for row in group_rows(compared.records)] == [
        Status.SUCCEEDED,
        Status.FAILED,
        Status.INVALID,
    ]


async def test_the_scorecard_heads_the_page_and_the_image(compared: Records) -> None:
    sheet = await compared.sheet()

    top = sheet.html.split("<tbody>")[0]
    assert "<caption>Scorecard by provider and stage" in top
    # changeclothes: 3 rows, 1 succeeded, 1 failed (MODERATED), 1 invalid, 2 calls, 1 out.
    assert (
        "<td class='name'>changeclothes</td><td class='name'>tryon</td><td>3</td><td>3</td>"
        "<td>1</td><td>1</td><td class='name'>MODERATED 1</td><td>0</td><td>1</td><td>2</td>"
        "<td>250</td><td>295</td><td>1</td><td>0</td>"
    ) in top
    # hidream: 2 rows (0 compared; 1 as the fallback and compared): 3 records.
    assert (
        "<td class='name'>hidream</td><td class='name'>tryon</td><td>2</td><td>3</td>"
        "<td>2</td><td>1</td><td class='name'>TIMEOUT 1</td>"
    ) in top
    # On the image, under the title: a line per provider, so the band grows by two lines.
    assert sheet.layout.score_lines == 2
    assert sheet.layout.title_band == 44 + 2 * sheet.layout.line_px
    grid = Image.open(BytesIO(sheet.jpeg)).convert("L")
    band = grid.crop((0, 44, grid.width, sheet.layout.title_band))
    assert min(band.getdata()) < 100  # text was drawn there


async def test_a_fallback_chain_without_comparison_keeps_three_columns(tmp_path: Path) -> None:
    fx = Records(tmp_path)
    fx.add(0, "changeclothes", Status.SUCCEEDED, GREEN, attempts=1, provider_ms=100.0)
    fell_back(fx, 1, CYAN)
    # Recorded in another order than the row went: the links decide the order.
    fx.records.reverse()
    sheet = await fx.sheet()
    layout = sheet.layout

    assert layout.columns == ("person", "garment", "coarse") and layout.compared == ()
    assert layout.labels == layout.columns
    grid = Image.open(BytesIO(sheet.jpeg))
    left, top, right, bottom = layout.thumb_box(1, "coarse")
    assert close(grid.getpixel(((left + right) // 2, (top + bottom) // 2)), CYAN)
    assert grid.height == layout.top + 2 * layout.row_height
    assert layout.top == 44 + 2 * layout.line_px + 22  # two try-on providers: two score lines

    (row,) = [r for r in group_rows(fx.records) if r.row_index == 1]
    assert row.primary is not None
    assert [r.provider for r in row.primary.tryons] == ["changeclothes", "hidream"]
    assert row.tryon is row.primary.tryons[-1] and row.status == Status.SUCCEEDED
    status = {cells[1]: cells[-1] for cells in parse(sheet).rows}["row-1"]
    first, second = status.find("fell back to hidream"), status.find("from changeclothes")
    assert 0 < first < second
    # The headline counts rows by their outcome: row 1 succeeded, by its fallback.
    assert "<p>2 rows; try-on: 2 succeeded</p>" in sheet.html


async def test_routed_rows_with_refine_get_a_refined_column_per_track(tmp_path: Path) -> None:
    fx = Records(tmp_path)
    refine: dict[str, Any] = {"stage": Stage.REFINE}
    # Routed: rows 0 and 1 to changeclothes, row 2 to hidream; every row compared on fitroom.
    for index, provider in enumerate(("changeclothes", "changeclothes", "hidream")):
        fx.add(index, provider, Status.SUCCEEDED, GREEN)
        fx.add(index, "ailab", Status.SUCCEEDED, MAGENTA, coarse_provider=provider, **refine)
        fx.add(index, "fitroom", Status.SUCCEEDED, ORANGE, track="fitroom")
    fx.add(0, "ailab", Status.SUCCEEDED, CYAN, track="fitroom", coarse_provider="fitroom", **refine)
    sheet = await fx.sheet()
    layout = sheet.layout

    assert layout.columns == (
        "person",
        "garment",
        "coarse",
        "refined",
        "coarse:fitroom",
        "refined:fitroom",
    )
    assert layout.labels[2:] == (
        "changeclothes / hidream",
        "changeclothes / hidream refined",
        "fitroom",
        "fitroom refined",
    )
    grid = Image.open(BytesIO(sheet.jpeg))
    assert grid.width == 6 * layout.cell + layout.status_width

    def centre(row: int, column: str) -> tuple[int, ...]:
        left, top, right, bottom = layout.thumb_box(row, column)
        return grid.getpixel(((left + right) // 2, (top + bottom) // 2))

    assert close(centre(0, "refined"), MAGENTA)
    assert close(centre(0, "coarse:fitroom"), ORANGE)
    assert close(centre(0, "refined:fitroom"), CYAN)
    assert close(centre(1, "coarse:fitroom"), ORANGE)
    assert not close(centre(1, "refined:fitroom"), CYAN)  # not refined on that track
    cells = {row[1]: row for row in parse(sheet).rows}
    assert cells["row-1"][7] == "not run"
    assert "compare refine not run" in cells["row-1"][-1]


async def test_the_scorecard_table_escapes_what_providers_say(tmp_path: Path) -> None:
    fx = Records(tmp_path)
    fx.add(0, "changeclothes", Status.FAILED, error_code="<b>BAD</b>", attempts=1)
    sheet = await fx.sheet()
    assert "<b>BAD" not in sheet.html
    assert "<td class='name'>&lt;b&gt;BAD&lt;/b&gt; 1</td>" in sheet.html
    # One provider, no comparison: the image keeps its plain title band.
    assert (sheet.layout.score_lines, sheet.layout.top) == (0, 44 + 22)
