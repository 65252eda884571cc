"""The contact sheet's HTML page, rendered from an autoescaping Jinja2 template.

Prefect-free. Everything shown comes from the manifest or a provider and is untrusted: it
reaches the page only as template values, which Jinja2 escapes (``autoescape=True``), and the
page forbids scripts and loading anything with a Content-Security-Policy. URIs are shown
through ``display_uri`` (no credentials, no query strings: presigned signatures stay out).

The page embeds its thumbnails as ``data:`` URIs rather than referencing files beside it: one
object to open, download or attach, from a local lake or S3 alike, with nothing to keep in
sync. Rows are turned into plain values (``PageRow``) as they are drawn, so the thumbnails'
pixels need not be kept until the page is rendered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

import jinja2

from schemas.results import RowRecord, Status
from tasks.images import display_uri
from tasks.report.records import SheetRow, route_note, stage_entries
from tasks.report.sheet import SheetLayout
from tasks.report.thumbnails import Cell
from tasks.scorecard import SCORE_HEADINGS

__all__ = ["PageImage", "PageRow", "PageStage", "earlier_note", "page_row", "render_page"]

_TEMPLATE = "contact_sheet.html.j2"


@dataclass(frozen=True, slots=True)
class PageImage:
    """One image cell: a thumbnail (``data_uri``), or a placeholder ``note`` when it is None."""

    column: str
    data_uri: str | None
    width: int
    height: int
    title: str  # where the image came from, redacted; empty when unknown
    note: str


@dataclass(frozen=True, slots=True)
class PageStage:
    """One stage of a row; ``status`` None when the stage did not run for it."""

    label: str
    status: str | None
    provider: str = ""
    attempts: int = 0
    error: str = ""  # "<kind> <code>", either part may be missing
    message: str = ""  # whole: the page wraps it
    output: str = ""  # the output's URI, redacted
    earlier: str = ""  # set when an earlier run had already done (or recorded) this stage
    route: str = ""  # its place in a fallback chain: "from X", "fell back to Y"


@dataclass(frozen=True, slots=True)
class PageRow:
    number: int  # 1-based, as people count manifest rows
    row_id: str
    status: str
    images: tuple[PageImage, ...] | None  # None: a row past those shown with images
    stages: tuple[PageStage, ...]
    prompt: str = ""  # a prompt row's text, whole
    earlier: bool = False  # every stage that ran was already done by an earlier run


def page_row(row: SheetRow, layout: SheetLayout, cells: Sequence[Cell] | None) -> PageRow:
    """``row`` as the page shows it; ``cells`` None for a row listed without images."""
    images: tuple[PageImage, ...] | None = None
    if cells is not None:
        images = tuple(
            _page_image(label, cell) for label, cell in zip(layout.labels, cells, strict=True)
        )
    entries = stage_entries(row, refined=layout.refined, compared=layout.compared)
    stages = [_page_stage(label, record) for label, record in entries]
    ran = [stage for stage in stages if stage.status is not None]
    return PageRow(
        number=row.row_index + 1,
        row_id=row.row_id if row.row_id is not None else "(no id)",
        status=str(row.status),
        images=images,
        stages=tuple(stages),
        prompt=row.prompt or "",
        earlier=bool(ran) and all(stage.earlier for stage in ran),
    )


def render_page(
    *,
    run_id: str,
    headline: str,
    extent: str,
    layout: SheetLayout,
    rows: Sequence[PageRow],
    scorecard: Sequence[Mapping[str, str]] = (),
    scorecard_note: str = "",
) -> str:
    """The whole page: a title, the run's headline and extent, its scorecard (rows of
    ``scorecard_text_rows``), then a table of ``rows``."""
    return _template().render(
        run_id=run_id,
        headline=headline,
        extent=extent,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        columns=layout.labels,
        thumb_px=layout.thumb_px,
        rows=rows,
        score_columns=list(SCORE_HEADINGS.items()),
        scorecard=scorecard,
        scorecard_note=scorecard_note,
    )


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("tasks.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails loudly, not as empty text
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return environment.get_template(_TEMPLATE)


def _page_image(column: str, cell: Cell) -> PageImage:
    if cell.data_uri is not None and cell.thumb is not None:
        width, height = cell.thumb.size
        return PageImage(column, cell.data_uri, width, height, cell.title, note="")
    return PageImage(column, None, 0, 0, cell.title, cell.note)


def _page_stage(label: str, record: RowRecord | None) -> PageStage:
    if record is None:
        return PageStage(label, status=None)
    error = ""
    if record.error_code or record.error_kind:
        kind = f"{record.error_kind} " if record.error_kind else ""
        error = kind + (record.error_code or "")
    return PageStage(
        label,
        status=str(record.status),
        provider=record.provider,
        attempts=record.attempts,
        error=error,
        message=record.error_message or "",
        output=display_uri(record.output_uri) if record.output_uri else "",
        earlier=earlier_note(record),
        route=route_note(record),
    )


def earlier_note(record: RowRecord) -> str:
    """Why this run did no work for the stage: an earlier run had done it (a rerun), or had
    recorded the same outcome; "" when this run did the work."""
    if not (record.already_recorded or record.reused_from_run):
        return ""
    by = f"run {record.reused_from_run}" if record.reused_from_run else "an earlier run"
    if record.status == Status.SUCCEEDED:
        return f"already done by {by}: no new provider call"
    return f"already recorded by {by}"
