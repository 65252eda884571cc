"""A run's contact sheet: every row's images and status, as an image and as an HTML page.

Prefect-free. ``build_contact_sheet`` turns a run's records (both stages) into a JPEG grid
(``sheet``) and a self-contained HTML page (``page``) with the same rows; nothing is fetched
(``thumbnails``). ``write_contact_sheet`` puts both beside the run in its lake.

The page's size stays bounded because only the first ``max_image_rows`` rows carry images
(about 20 KB a row at 128 px); later rows are listed as text, up to ``max_listed_rows``. The
image shows the same rows with images, so its memory is bounded by the same cap.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

import polars as pl

from schemas.manifest import is_safe_id
from schemas.results import PRIMARY_TRACK, RowRecord, Stage, Status
from tasks.lake import Lake, LakePathError
from tasks.report.page import PageRow, earlier_note, page_row, render_page
from tasks.report.records import SheetRow, group_rows, read_run_records
from tasks.report.sheet import SheetImage, SheetLayout
from tasks.report.thumbnails import (
    DEFAULT_MAX_IMAGE_ROWS,
    DEFAULT_THUMB_PX,
    CellReader,
    OutputReader,
    ThumbnailBank,
    cell_specs,
    lake_output_reader,
)
from tasks.scorecard import (
    records_frame,
    score_line,
    scorecard,
    scorecard_rows,
    scorecard_text_rows,
)

__all__ = [
    "CONTACT_SHEET_HTML",
    "CONTACT_SHEET_JPEG",
    "DEFAULT_MAX_LISTED_ROWS",
    "ContactSheet",
    "ContactSheetUris",
    "build_contact_sheet",
    "write_contact_sheet",
]

CONTACT_SHEET_HTML: Final = "contact_sheet.html"
CONTACT_SHEET_JPEG: Final = "contact_sheet.jpg"
DEFAULT_MAX_LISTED_ROWS: Final = 20_000
_ROWS_PER_BATCH: Final = 8
_MAX_SCORE_LINES: Final = 8  # on the image; the HTML page has the whole scorecard


@dataclass(frozen=True, slots=True)
class ContactSheet:
    html: str
    jpeg: bytes
    layout: SheetLayout
    rows: int  # manifest rows in the run
    rows_with_images: int  # rows drawn in the image and shown with images in the HTML
    rows_listed: int  # rows in the HTML (with or without images)


@dataclass(frozen=True, slots=True)
class ContactSheetUris:
    html: str
    jpeg: str


async def build_contact_sheet(
    records: Iterable[RowRecord],
    *,
    bank: ThumbnailBank | None = None,
    read_output: OutputReader | None = None,
    run_id: str | None = None,
    thumb_px: int = DEFAULT_THUMB_PX,
    max_image_rows: int = DEFAULT_MAX_IMAGE_ROWS,
    max_listed_rows: int = DEFAULT_MAX_LISTED_ROWS,
    refined: bool | None = None,
    manifest_rows: int | None = None,
    prompts: Mapping[int, str] | None = None,
    score: pl.DataFrame | None = None,
) -> ContactSheet:
    """The contact sheet of a run's records (both stages, every track), rows in manifest order.

    Nothing is fetched. ``bank``: thumbnails made during the run from bytes it held, the only
    source of input images; an input it lacks is a placeholder saying why. ``read_output``:
    reads back an output the bank lacks from the run's lake (``lake_output_reader``); without
    one such outputs are placeholders too.
    Rows are drawn a few at a time (a row's cells concurrently), so memory holds the image's
    canvas, at most ``max_image_rows`` high, and a few thumbnails.
    ``refined``: show the refined column; by default, when any record is a refine record.
    ``manifest_rows``: the manifest's row count, so rows missing from ``records`` are noted.
    ``prompts``: prompt rows' texts by row index (the records do not hold them), shown where
    the garment image would be. ``score``: the run's scorecard (``tasks.scorecard``), shown
    above the rows; by default computed from ``records``.
    When providers were compared, each compared provider's track has its own result
    column(s) after the row's own provider's (or providers', when routed or fallen back).
    """
    records = list(records)
    if score is None:
        score = scorecard(records_frame(records))
    score = score.drop("run_id", strict=False)  # the sheet is one run's
    rows = group_rows(records)
    if prompts:
        rows = [replace(row, prompt=prompts.get(row.row_index)) for row in rows]
    if refined is None:
        refined = any(row.refine is not None for row in rows)
    if run_id is None:
        run_id = next((r.tryon.run_id for r in rows if r.tryon is not None), "")
    score_rows = scorecard_rows(score)
    score_lines = _score_lines(score_rows)
    compared = tuple(sorted({t.name for r in rows for t in r.tracks} - {PRIMARY_TRACK}))
    layout = SheetLayout(
        thumb_px=thumb_px,
        refined=refined,
        compared=compared,
        primary_label=_primary_label(rows) if compared else "",
        score_lines=len(score_lines),
    )
    image_rows = rows[: max(0, max_image_rows)]
    listed = max(len(image_rows), min(len(rows), max_listed_rows))
    headline = _headline(rows)
    extent = _extent_note(len(rows), len(image_rows), listed, manifest_rows)
    image = SheetImage(
        layout,
        len(image_rows),
        title=f"Run {run_id}: {headline}",
        extent=extent,
        score=score_lines,
    )

    if bank is not None:
        await bank.settle()
    reader = CellReader(bank, read_output, thumb_px)
    page_rows: list[PageRow] = []
    # A few rows' cells at a time: thumbnails decode in threads (both cores), memory stays small.
    for start in range(0, len(image_rows), _ROWS_PER_BATCH):
        batch = image_rows[start : start + _ROWS_PER_BATCH]
        batch_cells = await asyncio.gather(
            *(
                asyncio.gather(*(reader.cell(spec) for spec in cell_specs(row, layout.columns)))
                for row in batch
            )
        )
        for offset, (row, cells) in enumerate(zip(batch, batch_cells, strict=True)):
            image.draw_row(start + offset, row, cells)
            page_rows.append(page_row(row, layout, cells))
    page_rows.extend(page_row(row, layout, None) for row in rows[len(image_rows) : listed])

    jpeg = await asyncio.to_thread(image.to_jpeg)
    earlier = any(r.already_recorded for r in records)
    html = render_page(
        run_id=run_id,
        headline=headline,
        extent=extent,
        layout=layout,
        rows=page_rows,
        scorecard=scorecard_text_rows(score),
        # Rows an earlier run recorded are on the sheet but cost this run nothing.
        scorecard_note="this run's records; rows earlier runs recorded are not counted"
        if earlier
        else "",
    )
    return ContactSheet(
        html=html,
        jpeg=jpeg,
        layout=layout,
        rows=len(rows),
        rows_with_images=len(image_rows),
        rows_listed=listed,
    )


def _primary_label(rows: Sequence[SheetRow]) -> str:
    """The provider(s) whose try-on outcomes fill the primary track's column, most rows
    first: one unless rows were routed or fell back ("changeclothes / hidream")."""
    finals = [r.tryon for r in rows if r.tryon is not None]
    counts = Counter(r.provider for r in finals if r.status != Status.INVALID) or Counter(
        r.provider for r in finals
    )
    return " / ".join(name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _score_lines(score_rows: Sequence[Mapping[str, object]]) -> list[str]:
    """The scorecard on the image, a line per provider and stage, when the run used more than
    one try-on provider (compared, routed, fallen back); with one, the headline says it all
    and the image keeps its plain title."""
    tryon_providers = {r["provider"] for r in score_rows if r["stage"] == str(Stage.TRYON)}
    if len(tryon_providers) < 2:
        return []
    lines = [score_line(row) for row in score_rows]
    if len(lines) > _MAX_SCORE_LINES:
        more = len(lines) - _MAX_SCORE_LINES + 1
        lines = [*lines[: _MAX_SCORE_LINES - 1], f"... and {more} more in {CONTACT_SHEET_HTML}"]
    return lines


def _headline(rows: Sequence[SheetRow]) -> str:
    def tally(records: Iterable[RowRecord | None]) -> str:
        present = [r for r in records if r is not None]
        counts = Counter(r.status for r in present)
        text = ", ".join(f"{counts[s]} {s}" for s in Status if counts[s]) or "none"
        earlier = sum(bool(earlier_note(r)) for r in present)
        return f"{text} ({earlier} from earlier runs)" if earlier else text

    text = f"{len(rows)} rows; try-on: {tally(r.tryon for r in rows)}"
    if any(r.refine is not None for r in rows):
        text += f"; refine: {tally(r.refine for r in rows)}"
    return text


def _extent_note(total: int, with_images: int, listed: int, manifest_rows: int | None) -> str:
    if total == 0:
        note = "no rows recorded for this run"
    elif with_images == total:
        note = f"all {total} rows shown"
    else:
        note = f"images for the first {with_images} of {total} rows (limit)"
        if listed < total:
            note += f"; {listed} rows listed in the HTML; every row is in the run's metadata"
        else:
            note += "; every row is listed in contact_sheet.html and the run's metadata"
    if manifest_rows is not None and manifest_rows > total:
        note += f"; {manifest_rows - total} of the manifest's {manifest_rows} rows have no record"
    return note


async def write_contact_sheet(
    lake: Lake,
    run_id: str,
    records: Iterable[RowRecord] | None = None,
    *,
    bank: ThumbnailBank | None = None,
    thumb_px: int = DEFAULT_THUMB_PX,
    max_image_rows: int = DEFAULT_MAX_IMAGE_ROWS,
    max_listed_rows: int = DEFAULT_MAX_LISTED_ROWS,
    manifest_rows: int | None = None,
    prompts: Mapping[int, str] | None = None,
    score: pl.DataFrame | None = None,
) -> ContactSheetUris:
    """Build the run's contact sheet and write ``runs/<run_id>/contact_sheet.{html,jpg}``.

    ``records``: the run's records; by default ``read_run_records`` reads them back.
    ``bank``: the thumbnails the run made of what it held. Inputs come from it alone; outputs
    it lacks (rows an earlier run did, or past its rows) are read back from this lake.
    Nothing is fetched: no input is read again, so no fetch limit or guard applies here.
    """
    if not is_safe_id(run_id):
        raise LakePathError(f"run id {run_id!r} is unsafe for a path")
    if records is None:
        records = await asyncio.to_thread(read_run_records, lake, run_id)
    sheet = await build_contact_sheet(
        records,
        bank=bank,
        read_output=lake_output_reader(lake),
        run_id=run_id,
        thumb_px=thumb_px,
        max_image_rows=max_image_rows,
        max_listed_rows=max_listed_rows,
        manifest_rows=manifest_rows,
        prompts=prompts,
        score=score,
    )
    jpeg_uri = await lake.awrite_bytes(lake.path("runs", run_id, CONTACT_SHEET_JPEG), sheet.jpeg)
    html_uri = await lake.awrite_bytes(
        lake.path("runs", run_id, CONTACT_SHEET_HTML), sheet.html.encode("utf-8")
    )
    return ContactSheetUris(html=html_uri, jpeg=jpeg_uri)
