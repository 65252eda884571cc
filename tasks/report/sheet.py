"""The contact sheet's image: a grid of each row's thumbnails and status, drawn with Pillow.

Prefect-free. ``SheetLayout`` is the grid's geometry; ``SheetImage`` draws the title, the header
and then one band per row as the rows' cells arrive, and encodes the whole as JPEG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from io import BytesIO
from typing import Final

from PIL import Image, ImageDraw, ImageFont

from schemas.results import Status
from tasks.report.records import MESSAGE_CHARS, SheetRow, route_note, stage_entries
from tasks.report.thumbnails import DEFAULT_THUMB_PX, Cell

__all__ = ["IMAGE_COLUMNS", "PLACEHOLDER_RGB", "SheetImage", "SheetLayout"]

PLACEHOLDER_RGB: Final = (214, 214, 214)
IMAGE_COLUMNS: Final = ("person", "garment", "coarse", "refined")

_STATUS_RGB: Final = {
    Status.SUCCEEDED: (30, 130, 60),
    Status.FAILED: (200, 40, 40),
    Status.SKIPPED: (200, 120, 0),
    Status.INVALID: (130, 60, 160),
}
_TEXT_RGB: Final = (34, 34, 34)
_MUTED_RGB: Final = (90, 90, 90)
_HEADER_RGB: Final = (228, 228, 228)
_STRIPE_RGB: Final = (246, 246, 246)
_FONT_PX: Final = 12
# Text and flat colour survive quality 85 legibly; see SheetImage.to_jpeg.
_JPEG_QUALITY: Final = 85

_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True, slots=True)
class SheetLayout:
    """Geometry of the sheet image: a title band, a header band, then one band per row."""

    thumb_px: int = DEFAULT_THUMB_PX
    refined: bool = False
    pad: int = 6
    status_width: int = 380
    title_height: int = 44
    header_height: int = 22
    # Compared providers (their tracks), each with its own result column(s) after the
    # primary track's; the primary's columns are then labelled ``primary_label``.
    compared: tuple[str, ...] = ()
    primary_label: str = ""
    score_lines: int = 0  # scorecard lines added to the title band
    line_px: int = 18  # a text line of the sheet's font

    @property
    def columns(self) -> tuple[str, ...]:
        """Column keys: inputs, the primary track's result(s), then each compared track's."""
        own = IMAGE_COLUMNS if self.refined else IMAGE_COLUMNS[:3]
        results = own[2:]
        return own + tuple(f"{column}:{track}" for track in self.compared for column in results)

    @property
    def labels(self) -> tuple[str, ...]:
        """Column headings: the keys, unless tracks are compared: then each result column is
        named after its track's provider(s)."""
        if not self.compared:
            return self.columns
        labels = []
        for column in self.columns:
            stage, _, track = column.partition(":")
            if stage not in ("coarse", "refined"):
                labels.append(column)
                continue
            name = track or self.primary_label or "coarse"
            labels.append(name if stage == "coarse" else f"{name} refined")
        return tuple(labels)

    @property
    def title_band(self) -> int:
        return self.title_height + self.score_lines * self.line_px

    @property
    def header_band(self) -> int:
        # Provider names rarely fit a thumbnail's width: a second line when they are headings.
        return self.header_height + (self.line_px if self.compared else 0)

    @property
    def cell(self) -> int:
        return self.thumb_px + 2 * self.pad

    @property
    def row_height(self) -> int:
        return self.cell

    @property
    def top(self) -> int:
        return self.title_band + self.header_band

    @property
    def width(self) -> int:
        return len(self.columns) * self.cell + self.status_width

    def height(self, rows: int) -> int:
        return self.top + rows * self.row_height

    def thumb_box(self, row: int, column: str) -> tuple[int, int, int, int]:
        """The (left, top, right, bottom) box a thumbnail of ``row`` (0-based drawn row) fills."""
        x = self.columns.index(column) * self.cell + self.pad
        y = self.top + row * self.row_height + self.pad
        return (x, y, x + self.thumb_px, y + self.thumb_px)


class SheetImage:
    """The grid for ``rows`` rows, drawn a row at a time so only the canvas stays in memory."""

    def __init__(
        self,
        layout: SheetLayout,
        rows: int,
        *,
        title: str,
        extent: str,
        score: Sequence[str] = (),
    ) -> None:
        """``score``: the scorecard's lines, drawn under the title (``layout.score_lines``
        of them at most)."""
        self.layout = layout
        self._canvas = Image.new("RGB", (layout.width, layout.height(rows)), "white")
        self._draw = ImageDraw.Draw(self._canvas)
        self._font = _font()
        _draw_title(self._draw, layout, self._font, title, extent, score)
        _draw_header(self._draw, layout, self._font)

    def draw_row(self, drawn: int, row: SheetRow, cells: Sequence[Cell]) -> None:
        """Draw ``row`` as the ``drawn``-th band (0-based), one cell per layout column."""
        _draw_row(self._canvas, self._draw, self.layout, self._font, drawn, row, cells)

    def to_jpeg(self) -> bytes:
        """The sheet as JPEG. CPU-bound: run it in a thread.

        JPEG rather than PNG: a 100-row sheet (800 x 14,066 px) of photo thumbnails takes Pillow
        ~22 ms and 1.6 MB, where a PNG took 3.5x as long on two cores (14x on one) for 3.5-4.7x
        the bytes. No optimize pass: it triples the time for ~4% fewer bytes.
        """
        buffer = BytesIO()
        self._canvas.save(buffer, "JPEG", quality=_JPEG_QUALITY, optimize=False)
        return buffer.getvalue()


@cache
def _font() -> _Font:
    # Pillow's bundled default: FreeType when available, else a bitmap font (latin-1 only).
    return ImageFont.load_default(size=_FONT_PX)


def _line_height(font: _Font) -> int:
    return int(font.getbbox("Ag")[3]) + 3


def _drawable(text: str, font: _Font) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def _wrap(text: str, font: _Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words break anywhere; ``...`` if cut."""
    lines: list[str] = []
    current = ""
    for word in _drawable(text, font).split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while len(current) > 1 and font.getlength(current) > width:
            cut = len(current) - 1
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _draw_title(
    draw: ImageDraw.ImageDraw,
    layout: SheetLayout,
    font: _Font,
    title: str,
    extent: str,
    score: Sequence[str],
) -> None:
    width = layout.width - 2 * layout.pad
    line_h = _line_height(font)
    y = layout.pad
    for text, colour in ((title, _TEXT_RGB), (extent, _MUTED_RGB)):
        for line in _wrap(text, font, width, 1):
            draw.text((layout.pad, y), line, fill=colour, font=font)
            y += line_h
    y = layout.title_height  # the scorecard's own lines, below the band of today's two
    for text in score[: layout.score_lines]:
        for line in _wrap(text, font, width, 1):
            draw.text((layout.pad, y), line, fill=_TEXT_RGB, font=font)
            y += layout.line_px


def _draw_header(draw: ImageDraw.ImageDraw, layout: SheetLayout, font: _Font) -> None:
    y0 = layout.title_band
    draw.rectangle((0, y0, layout.width - 1, y0 + layout.header_band - 1), fill=_HEADER_RGB)
    labels = [*layout.labels, "row / status"]
    lines = 2 if layout.compared else 1
    for index, label in enumerate(labels):
        x = index * layout.cell + layout.pad
        room = layout.cell - layout.pad if index < len(layout.columns) else layout.status_width
        for offset, line in enumerate(_wrap(label, font, room, lines)):
            draw.text((x, y0 + 4 + offset * layout.line_px), line, fill=_TEXT_RGB, font=font)


def _draw_row(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    layout: SheetLayout,
    font: _Font,
    drawn: int,
    row: SheetRow,
    cells: Sequence[Cell],
) -> None:
    y0 = layout.top + drawn * layout.row_height
    if drawn % 2:
        draw.rectangle((0, y0, layout.width - 1, y0 + layout.row_height - 1), fill=_STRIPE_RGB)
    # A status bar down the left edge: failures stand out when scrolling a long sheet.
    draw.rectangle((0, y0, 3, y0 + layout.row_height - 1), fill=_STATUS_RGB[row.status])
    line_h = _line_height(font)
    for column, cell in zip(layout.columns, cells, strict=True):
        left, top, right, bottom = layout.thumb_box(drawn, column)
        if cell.thumb is not None:
            x = left + (layout.thumb_px - cell.thumb.width) // 2
            y = top + (layout.thumb_px - cell.thumb.height) // 2
            canvas.paste(cell.thumb, (x, y))
            continue
        canvas.paste(
            _placeholder(cell.note, (right - left, bottom - top), layout.thumb_px), (left, top)
        )

    x = len(layout.columns) * layout.cell + layout.pad
    width = layout.status_width - 2 * layout.pad
    y = y0 + layout.pad
    room = (layout.row_height - 2 * layout.pad) // line_h  # lines left in this row's band
    for text, colour in _status_lines(row, layout):
        if room <= 0:
            break
        for line in _wrap(text, font, width, room):
            draw.text((x, y), line, fill=colour, font=font)
            y += line_h
            room -= 1


@lru_cache(maxsize=256)
def _placeholder(note: str, size: tuple[int, int], thumb_px: int) -> Image.Image:
    """A placeholder cell with its note, drawn once per distinct note: a long sheet repeats
    a few ("not read: done by an earlier run"), and text is most of a sheet's drawing."""
    font = _font()
    tile = Image.new("RGB", size, PLACEHOLDER_RGB)
    draw = ImageDraw.Draw(tile)
    line_h = _line_height(font)
    lines = _wrap(note, font, thumb_px - 8, 4)
    y = (thumb_px - line_h * len(lines)) // 2
    for line in lines:
        x = (thumb_px - int(font.getlength(line))) // 2
        draw.text((x, y), line, fill=_MUTED_RGB, font=font)
        y += line_h
    return tile


def _status_lines(row: SheetRow, layout: SheetLayout) -> list[tuple[str, tuple[int, int, int]]]:
    lines = [(f"#{row.row_index + 1}  {row.row_id or '(no id)'}", _TEXT_RGB)]
    entries = stage_entries(row, refined=layout.refined, compared=layout.compared)
    messages = []
    for label, record in entries:
        if record is None:
            lines.append((f"{label}: not run", _MUTED_RGB))
            continue
        text = f"{label}: {record.status} ({record.provider})"
        if record.error_code:
            text += f" {record.error_code}"
        if route := route_note(record):
            text += f", {route}"
        if record.already_recorded or record.reused_from_run:
            text += (
                ", already done earlier"
                if record.status == Status.SUCCEEDED
                else ", recorded earlier"
            )
        lines.append((text, _STATUS_RGB[record.status]))
        if record.error_message:
            # Several try-ons of one stage (a chain, a comparison): say whose message it is.
            who = f" ({record.provider})" if len(entries) > (2 if layout.refined else 1) else ""
            messages.append(f"{label}{who}: {record.error_message[:MESSAGE_CHARS]}")
    lines.extend((message, _MUTED_RGB) for message in messages)
    return lines
