"""Run outputs people look at: a contact sheet of every row, and tallies for the run report.

Prefect-free. ``build_contact_sheet`` turns a run's metadata records (both stages) into

* a PNG grid: person | garment | coarse | refined thumbnails and each row's status, and
* a self-contained HTML page with the same rows.

The HTML embeds its thumbnails as ``data:`` URIs rather than referencing files beside it: one
object to open, download or attach, from a local lake or S3 alike, with nothing to keep in
sync. Its size stays bounded because only the first ``max_image_rows`` rows carry images
(about 20 KB a row at 128 px); later rows are listed as text, up to ``max_listed_rows``. The
PNG shows the same rows with images, so its memory is bounded by the same cap.

The sheet never fetches an input: person and garment images are shown only from the bytes
the run itself held (thumbnailed as it went, ``ThumbnailBank``). An input the run never
obtained (a timeout, an HTTP error, an endless body) would cost the same again at the end
and may not be this run's to fetch at all, so its cell is a placeholder naming why. Outputs
are the run's own storage: those not thumbnailed during the run are read back from the lake.

Everything shown comes from the manifest or a provider and is untrusted: the HTML escapes
every string and forbids scripts with a Content-Security-Policy; input URIs go through
``display_uri`` (no credentials, no query strings: presigned signatures stay out).
An image that cannot be read or decoded becomes a grey placeholder naming why; it never
breaks the sheet.
"""

from __future__ import annotations

import asyncio
import base64
import html
import inspect
import posixpath
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from io import BytesIO
from typing import Final

import polars as pl
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from schemas.manifest import is_safe_id
from schemas.results import RowRecord, Stage, Status, records_to_frame
from tasks.images import (
    DEFAULT_ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageInputError,
    display_uri,
)
from tasks.lake import Lake, LakePathError
from tasks.png import encode_rgb_png

__all__ = [
    "CONTACT_SHEET_HTML",
    "CONTACT_SHEET_PNG",
    "DEFAULT_MAX_IMAGE_ROWS",
    "DEFAULT_MAX_LISTED_ROWS",
    "DEFAULT_THUMB_PX",
    "PLACEHOLDER_RGB",
    "ContactSheet",
    "ContactSheetUris",
    "FailureGroup",
    "OutputReader",
    "SheetLayout",
    "SheetRow",
    "StatusCount",
    "ThumbnailBank",
    "build_contact_sheet",
    "count_statuses",
    "group_failures",
    "group_rows",
    "lake_output_reader",
    "make_thumbnail",
    "read_run_records",
    "write_contact_sheet",
    "write_report_records",
]

# Returns the bytes of an output the lake holds, or raises. Never given an input URI.
OutputReader = Callable[[str], Awaitable[bytes] | bytes]

CONTACT_SHEET_HTML: Final = "contact_sheet.html"
CONTACT_SHEET_PNG: Final = "contact_sheet.png"
DEFAULT_THUMB_PX: Final = 128
DEFAULT_MAX_IMAGE_ROWS: Final = 100
DEFAULT_MAX_LISTED_ROWS: Final = 20_000
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
_MESSAGE_CHARS: Final = 300  # error messages are cut here: the metadata has them whole
_JPEG_QUALITY: Final = 80
_INPUT_UNAVAILABLE: Final = "input unavailable"

_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


# --------------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class SheetRow:
    """One manifest row: its try-on record and, when the run refined, its refine record."""

    row_index: int
    tryon: RowRecord | None
    refine: RowRecord | None

    @property
    def row_id(self) -> str | None:
        record = self.tryon or self.refine
        return record.row_id if record else None

    @property
    def status(self) -> Status:
        """The row's worst outcome over its stages, for colouring."""
        statuses = [r.status for r in (self.tryon, self.refine) if r is not None]
        for worst in (Status.INVALID, Status.FAILED, Status.SKIPPED):
            if worst in statuses:
                return worst
        return Status.SUCCEEDED


def group_rows(records: Iterable[RowRecord]) -> list[SheetRow]:
    """Records -> one ``SheetRow`` per manifest row, in manifest order.

    Keyed by ``row_index`` (ids may repeat in a bad manifest). Should a (row, stage) be
    recorded twice, the record that finished last wins.
    """
    by_index: dict[int, dict[Stage, RowRecord]] = {}
    for record in records:
        stages = by_index.setdefault(record.row_index, {})
        held = stages.get(record.stage)
        if held is None or _finished_key(record) >= _finished_key(held):
            stages[record.stage] = record
    return [
        SheetRow(row_index=index, tryon=stages.get(Stage.TRYON), refine=stages.get(Stage.REFINE))
        for index, stages in sorted(by_index.items())
    ]


def _finished_key(record: RowRecord) -> float:
    return record.finished_at.timestamp() if record.finished_at else float("-inf")


def read_run_records(lake: Lake, run_id: str) -> list[RowRecord]:
    """Every record one run reports, read back from the lake (blocking).

    The run's metadata (published once committed, else still staged under the run), plus the
    records kept by ``write_report_records``: rows whose record an earlier committed run's
    metadata already holds, so this run's metadata does not repeat them.
    """
    if lake.is_committed(run_id):
        metadata = lake.path("metadata", f"run_id={run_id}")
    else:
        metadata = lake.path("runs", run_id, "parts")
    return _read_records(lake, metadata) + _read_records(lake, _report_dir(lake, run_id))


def write_report_records(lake: Lake, run_id: str, part: str, records: list[RowRecord]) -> str:
    """Keep records for the run's report that its metadata will not hold (blocking).

    For rows done and recorded by an earlier committed run (``already_recorded``): the
    contact sheet still shows them, the metadata dataset stays free of duplicates.
    """
    if not is_safe_id(part):
        raise LakePathError(f"part name {part!r} is unsafe for a path")
    buffer = BytesIO()
    records_to_frame(records).write_parquet(buffer)
    return lake.write_bytes(
        posixpath.join(_report_dir(lake, run_id), f"{part}.parquet"), buffer.getvalue()
    )


def _report_dir(lake: Lake, run_id: str) -> str:
    if not is_safe_id(run_id):
        raise LakePathError(f"run id {run_id!r} is unsafe for a path")
    return lake.path("runs", run_id, "report")


def _read_records(lake: Lake, folder: str) -> list[RowRecord]:
    records = []
    for file in sorted(lake.fs.glob(folder + "/*.parquet")):
        with lake.fs.open(file, "rb") as handle:
            frame = pl.read_parquet(handle)
        # Only known fields: a part written by an older or newer schema still reads.
        columns = [c for c in frame.columns if c in RowRecord.model_fields]
        records.extend(
            RowRecord.model_validate(row) for row in frame.select(columns).iter_rows(named=True)
        )
    return records


# ------------------------------------------------------------------------------- tallies


@dataclass(frozen=True, slots=True)
class StatusCount:
    provider: str
    stage: str
    status: str
    records: int


def count_statuses(records: Iterable[RowRecord]) -> list[StatusCount]:
    """Records per (provider, stage, status), sorted; one record per row and stage."""
    counts = Counter((r.provider, str(r.stage), str(r.status)) for r in records)
    return [StatusCount(p, stage, status, n) for (p, stage, status), n in sorted(counts.items())]


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Rows that did not succeed, sharing a stage, a status and an error code."""

    stage: str
    status: str
    error_code: str | None
    error_kind: str | None
    records: int
    example_row_ids: tuple[str, ...]
    example_message: str | None


def group_failures(records: Iterable[RowRecord], *, examples: int = 5) -> list[FailureGroup]:
    """Non-succeeded records grouped by (stage, status, error code), largest group first."""
    groups: dict[tuple[str, str, str | None], list[RowRecord]] = {}
    for record in records:
        if record.status != Status.SUCCEEDED:
            key = (str(record.stage), str(record.status), record.error_code)
            groups.setdefault(key, []).append(record)
    result = []
    for (stage, status, code), members in groups.items():
        members.sort(key=lambda r: r.row_index)
        first = members[0]
        result.append(
            FailureGroup(
                stage=stage,
                status=status,
                error_code=code,
                error_kind=str(first.error_kind) if first.error_kind else None,
                records=len(members),
                example_row_ids=tuple(_row_label(r) for r in members[:examples]),
                example_message=next((r.error_message for r in members if r.error_message), None),
            )
        )
    result.sort(key=lambda g: (-g.records, g.stage, g.status, g.error_code or ""))
    return result


def _row_label(record: RowRecord) -> str:
    return record.row_id if record.row_id else f"#{record.row_index + 1}"


# ---------------------------------------------------------------------------- thumbnails


def make_thumbnail(
    data: bytes,
    thumb_px: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: tuple[str, ...] = DEFAULT_ALLOWED_FORMATS,
) -> Image.Image:
    """Decode ``data`` into an upright RGB image fitting ``thumb_px`` x ``thumb_px``.

    The size is checked from the header before anything is decoded; JPEGs decode at reduced
    scale (draft), so a 24-megapixel photo costs milliseconds. CPU-bound: run it in a thread.
    """
    try:
        with Image.open(BytesIO(data)) as im:
            if im.format not in allowed_formats:
                raise ImageInputError("FORMAT_NOT_ALLOWED", f"format {im.format} not allowed")
            if im.width * im.height > max_pixels:
                raise ImageInputError("DECOMPRESSION_BOMB", f"{im.width}x{im.height} pixels")
            im.draft("RGB", (thumb_px, thumb_px))
            upright = ImageOps.exif_transpose(im)
            upright.thumbnail((thumb_px, thumb_px), reducing_gap=2.0)
            return _flatten(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError("DECOMPRESSION_BOMB", "over Pillow's pixel limit") from None
    except UnidentifiedImageError:
        raise ImageInputError("DECODE_FAILED", "not a recognisable image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow plugins raise all four
        raise ImageInputError("DECODE_FAILED", type(exc).__name__) from None


def _flatten(im: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as the inputs are prepared)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _jpeg_data_uri(thumb: Image.Image) -> str:
    buffer = BytesIO()
    thumb.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail_and_uri(data: bytes, thumb_px: int) -> tuple[Image.Image, str]:
    thumb = make_thumbnail(data, thumb_px)
    return thumb, _jpeg_data_uri(thumb)


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ImageInputError):
        return exc.code
    if isinstance(exc, FileNotFoundError):
        return "NOT_FOUND"
    if isinstance(exc, LakePathError):
        return "NOT_IN_LAKE"
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class _CellSpec:
    uri: str | None
    note: str  # the placeholder when there is no image: no uri, or nothing held for it
    output: bool  # a result in the run's lake, which may be read back; inputs never are


@dataclass(frozen=True, slots=True)
class _Cell:
    thumb: Image.Image | None = None
    data_uri: str | None = None
    note: str = ""  # placeholder text when there is no thumbnail
    title: str = ""  # where the image came from (redacted), for the HTML


_ROWS_PER_BATCH = 8
_PENDING: Final = _Cell()  # a bank entry still being made


class _Cells:
    """Each cell's picture without fetching anything: inputs from the bank only (what the run
    held), outputs from the bank or read back from the lake."""

    def __init__(
        self, bank: ThumbnailBank | None, read_output: OutputReader | None, thumb_px: int
    ) -> None:
        self._bank = bank
        self._read_output = read_output
        self._thumb_px = thumb_px
        self._fitted: dict[str, _Cell] = {}  # bank cells shrunk for this sheet, once per URI

    async def cell(self, spec: _CellSpec) -> _Cell:
        if spec.uri is None:
            return _Cell(note=spec.note)
        held = self._bank.get(spec.uri) if self._bank is not None else None
        if held is not None:
            return self._fit(spec.uri, held)
        if not spec.output or self._read_output is None:
            return _Cell(note=spec.note, title=display_uri(spec.uri))
        return await self._read(spec.uri)

    def _fit(self, uri: str, cell: _Cell) -> _Cell:
        """A bank cell made at another size than this sheet's: shrunk (smaller ones are centred),
        since the bytes it came from are gone."""
        if cell.thumb is None or max(cell.thumb.size) <= self._thumb_px:
            return cell
        if (fitted := self._fitted.get(uri)) is None:
            thumb = cell.thumb.copy()
            thumb.thumbnail((self._thumb_px, self._thumb_px), reducing_gap=2.0)
            fitted = _Cell(thumb=thumb, data_uri=_jpeg_data_uri(thumb), title=cell.title)
            self._fitted[uri] = fitted
        return fitted

    async def _read(self, uri: str) -> _Cell:
        assert self._read_output is not None
        title = display_uri(uri)
        try:
            data = self._read_output(uri)
            if inspect.isawaitable(data):
                data = await data
            thumb, data_uri = await asyncio.to_thread(_thumbnail_and_uri, data, self._thumb_px)
        # The reader is injected and may raise anything: a cell shows why, the sheet goes on.
        except Exception as exc:
            return _Cell(note=f"missing output: {_error_code(exc)}", title=title)
        return _Cell(thumb=thumb, data_uri=data_uri, title=title)


class ThumbnailBank:
    """Thumbnails made while the run goes, from bytes the rows already hold (prepared inputs,
    downloaded results), so the contact sheet at the end mostly lays them out. Rows wait on
    providers most of the time: the CPU is free then, and at the end the run waits on nothing
    else. Only rows the sheet shows with images are taken. The bank is the sheet's only source
    of input images: an input never offered here is a placeholder on the sheet, never fetched.
    """

    def __init__(
        self, *, thumb_px: int = DEFAULT_THUMB_PX, max_rows: int = DEFAULT_MAX_IMAGE_ROWS
    ) -> None:
        self.thumb_px = thumb_px
        self.max_rows = max_rows
        self._cells: dict[str, _Cell] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def wants(self, row_index: int, uri: str | None) -> bool:
        return uri is not None and row_index < self.max_rows and uri not in self._cells

    def offer(self, row_index: int, uri: str | None, data: bytes) -> None:
        """Thumbnail ``data`` as ``uri``'s cell in the background (never delays the row)."""
        if uri is None or not self.wants(row_index, uri):
            return
        self._cells[uri] = _PENDING  # one thumbnail per URI however many rows share it
        task = asyncio.get_running_loop().create_task(self._make(uri, data))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _make(self, uri: str, data: bytes) -> None:
        title = display_uri(uri)
        try:
            thumb, data_uri = await asyncio.to_thread(_thumbnail_and_uri, data, self.thumb_px)
        except Exception as exc:  # kept as the cell's note: the sheet has no other source
            self._cells[uri] = _Cell(note=f"unreadable: {_error_code(exc)}", title=title)
            return
        self._cells[uri] = _Cell(thumb=thumb, data_uri=data_uri, title=title)

    def get(self, uri: str) -> _Cell | None:
        """``uri``'s cell: its thumbnail, or why the bytes did not make one; None when nothing
        was offered for it (or it is still being made)."""
        cell = self._cells.get(uri)
        return None if cell is None or cell is _PENDING else cell

    async def settle(self) -> None:
        """Wait for the thumbnails still being made."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def __len__(self) -> int:
        return sum(cell.thumb is not None for cell in self._cells.values())


def _stage_note(record: RowRecord | None, *, absent: str) -> str:
    if record is None:
        return absent
    if record.status == Status.INVALID:
        return "invalid row"
    if record.status == Status.SUCCEEDED:
        return "no output recorded"
    return f"{record.status}: {record.error_code or 'no code'}"


# Codes of an input the run could not get at all (tasks.images.fetch_bytes), as opposed to
# one it got but could not use (DECODE_FAILED, DECOMPRESSION_BOMB...).
_NOT_FETCHED_CODES: Final = frozenset({"BAD_URI", "BAD_DATA_URI", "UNSUPPORTED_SCHEME"})


def _names_input(message: str, uri: str) -> bool:
    """Whether an input error's message is about ``uri``: it starts with the redacted URI, or
    with its host when the fetch guard refused that host."""
    if message.startswith(display_uri(uri) + ":"):
        return True
    try:
        host = urllib.parse.urlsplit(uri).hostname
    except ValueError:
        return False
    return bool(host) and message.lower().startswith(f"host {host} ")


def _input_note(record: RowRecord | None, uri: str) -> str:
    """Why an input the bank does not hold has no picture. The sheet never fetches it: the run
    either never obtained it (the record's error names it) or did not keep it for the sheet."""
    if record is None or record.status == Status.SUCCEEDED or not record.error_code:
        return _INPUT_UNAVAILABLE
    if not _names_input(record.error_message or "", uri):
        return _INPUT_UNAVAILABLE
    code = record.error_code
    fetched = not (code.startswith("FETCH_") or code in _NOT_FETCHED_CODES)
    return f"input {'unusable' if fetched else 'not fetched'}: {code}"


def _cell_specs(row: SheetRow, columns: Sequence[str]) -> list[_CellSpec]:
    tryon = row.tryon
    invalid = tryon is not None and tryon.status == Status.INVALID

    def input_spec(uri: str | None, absent: str) -> _CellSpec:
        if invalid:  # nothing was attempted for the row
            return _CellSpec(uri=None, note="invalid row", output=False)
        if uri is None:
            return _CellSpec(uri=None, note=absent, output=False)
        return _CellSpec(uri=uri, note=_input_note(tryon, uri), output=False)

    specs = {
        "person": input_spec(tryon.person_image if tryon else None, "no image"),
        "garment": input_spec(tryon.garment_image if tryon else None, "no garment image (prompt)"),
    }
    for column, record in (("coarse", tryon), ("refined", row.refine)):
        succeeded = record is not None and record.status == Status.SUCCEEDED
        uri = record.output_uri if succeeded and record else None
        specs[column] = _CellSpec(
            uri=uri,
            note=(
                _stage_note(record, absent="invalid row" if invalid else "not run")
                if uri is None
                else "output not held"
            ),
            output=True,
        )
    return [specs[c] for c in columns]


# --------------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class SheetLayout:
    """Geometry of the PNG grid: a title band, a header band, then one band per row."""

    thumb_px: int = DEFAULT_THUMB_PX
    refined: bool = False
    pad: int = 6
    status_width: int = 380
    title_height: int = 44
    header_height: int = 22

    @property
    def columns(self) -> tuple[str, ...]:
        return IMAGE_COLUMNS if self.refined else IMAGE_COLUMNS[:3]

    @property
    def cell(self) -> int:
        return self.thumb_px + 2 * self.pad

    @property
    def row_height(self) -> int:
        return self.cell

    @property
    def top(self) -> int:
        return self.title_height + self.header_height

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


# ------------------------------------------------------------------------------ the sheet


@dataclass(frozen=True, slots=True)
class ContactSheet:
    html: str
    png: bytes
    layout: SheetLayout
    rows: int  # manifest rows in the run
    rows_with_images: int  # rows drawn in the PNG and shown with images in the HTML
    rows_listed: int  # rows in the HTML (with or without images)


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
) -> ContactSheet:
    """The contact sheet of a run's records (both stages), rows in manifest order.

    Nothing is fetched. ``bank``: thumbnails made during the run from bytes it held, the only
    source of input images; an input it lacks is a placeholder saying why. ``read_output``:
    reads back an output the bank lacks from the run's lake (``lake_output_reader``); without
    one such outputs are placeholders too.
    Rows are drawn a few at a time (a row's cells concurrently), so memory holds the PNG
    canvas, at most ``max_image_rows`` high, and a few thumbnails.
    ``refined``: show the refined column; by default, when any record is a refine record.
    ``manifest_rows``: the manifest's row count, so rows missing from ``records`` are noted.
    """
    rows = group_rows(records)
    if refined is None:
        refined = any(row.refine is not None for row in rows)
    if run_id is None:
        run_id = next((r.tryon.run_id for r in rows if r.tryon is not None), "")
    layout = SheetLayout(thumb_px=thumb_px, refined=refined)
    image_rows = rows[: max(0, max_image_rows)]
    listed = max(len(image_rows), min(len(rows), max_listed_rows))
    headline = _headline(rows)
    extent = _extent_note(len(rows), len(image_rows), listed, manifest_rows)

    canvas = Image.new("RGB", (layout.width, layout.height(len(image_rows))), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    _draw_title(draw, layout, font, f"Run {run_id}: {headline}", extent)
    _draw_header(draw, layout, font)

    if bank is not None:
        await bank.settle()
    cells_of = _Cells(bank, read_output, thumb_px)
    html_rows: list[str] = []
    # A few rows' cells at a time: thumbnails decode in threads (both cores), memory stays small.
    for start in range(0, len(image_rows), _ROWS_PER_BATCH):
        batch = image_rows[start : start + _ROWS_PER_BATCH]
        batch_cells = await asyncio.gather(
            *(
                asyncio.gather(*(cells_of.cell(spec) for spec in _cell_specs(row, layout.columns)))
                for row in batch
            )
        )
        for offset, (row, cells) in enumerate(zip(batch, batch_cells, strict=True)):
            _draw_row(canvas, draw, layout, font, start + offset, row, cells)
            html_rows.append(_html_row(row, layout, cells))
    html_rows.extend(_html_row(row, layout, None) for row in rows[len(image_rows) : listed])

    png = await asyncio.to_thread(_encode_png, canvas)
    page = _html_page(run_id, headline, extent, layout, html_rows)
    return ContactSheet(
        html=page,
        png=png,
        layout=layout,
        rows=len(rows),
        rows_with_images=len(image_rows),
        rows_listed=listed,
    )


def _encode_png(canvas: Image.Image) -> bytes:
    # Level 1 on every core (tasks/png.py): Pillow's writer took ~0.67 s for 100 rows, at the
    # end of the run; level 6 took 4x as long again for ~15% less.
    return encode_rgb_png(canvas, level=1)


def _headline(rows: Sequence[SheetRow]) -> str:
    def tally(records: Iterable[RowRecord | None]) -> str:
        counts = Counter(r.status for r in records if r is not None)
        return ", ".join(f"{counts[s]} {s}" for s in Status if counts[s]) or "none"

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


# ---------------------------------------------------------------------------------- PNG


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
) -> None:
    width = layout.width - 2 * layout.pad
    line_h = _line_height(font)
    y = layout.pad
    for text, colour in ((title, _TEXT_RGB), (extent, _MUTED_RGB)):
        for line in _wrap(text, font, width, 1):
            draw.text((layout.pad, y), line, fill=colour, font=font)
            y += line_h


def _draw_header(draw: ImageDraw.ImageDraw, layout: SheetLayout, font: _Font) -> None:
    y0 = layout.title_height
    draw.rectangle((0, y0, layout.width - 1, y0 + layout.header_height - 1), fill=_HEADER_RGB)
    labels = [*layout.columns, "row / status"]
    for index, label in enumerate(labels):
        x = index * layout.cell + layout.pad
        draw.text((x, y0 + 4), label, fill=_TEXT_RGB, font=font)


def _draw_row(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    layout: SheetLayout,
    font: _Font,
    drawn: int,
    row: SheetRow,
    cells: Sequence[_Cell],
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
        draw.rectangle((left, top, right - 1, bottom - 1), fill=PLACEHOLDER_RGB)
        lines = _wrap(cell.note, font, layout.thumb_px - 8, 4)
        y = top + (layout.thumb_px - line_h * len(lines)) // 2
        for line in lines:
            x = left + (layout.thumb_px - int(font.getlength(line))) // 2
            draw.text((x, y), line, fill=_MUTED_RGB, font=font)
            y += line_h

    x = len(layout.columns) * layout.cell + layout.pad
    width = layout.status_width - 2 * layout.pad
    y = y0 + layout.pad
    room = (layout.row_height - 2 * layout.pad) // line_h  # lines left in this row's band
    for text, colour in _status_lines(row, layout.refined):
        if room <= 0:
            break
        for line in _wrap(text, font, width, room):
            draw.text((x, y), line, fill=colour, font=font)
            y += line_h
            room -= 1


def _status_lines(row: SheetRow, refined: bool) -> list[tuple[str, tuple[int, int, int]]]:
    lines = [(f"#{row.row_index + 1}  {row.row_id or '(no id)'}", _TEXT_RGB)]
    stages = [("try-on", row.tryon)] + ([("refine", row.refine)] if refined else [])
    messages = []
    for label, record in stages:
        if record is None:
            lines.append((f"{label}: not run", _MUTED_RGB))
            continue
        text = f"{label}: {record.status} ({record.provider})"
        if record.error_code:
            text += f" {record.error_code}"
        lines.append((text, _STATUS_RGB[record.status]))
        if record.error_message:
            messages.append(f"{label}: {record.error_message[:_MESSAGE_CHARS]}")
    lines.extend((message, _MUTED_RGB) for message in messages)
    return lines


# --------------------------------------------------------------------------------- HTML


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse}
th,td{border:1px solid #ddd;padding:4px;vertical-align:top}
th{background:#e4e4e4;position:sticky;top:0}
td.img{text-align:center;vertical-align:middle}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;
background:#d6d6d6;color:#555;font-size:12px;overflow-wrap:anywhere}
.na{color:#888;font-size:12px;text-align:center;vertical-align:middle}
.succeeded{color:#1e823c}.failed{color:#c82828}.skipped{color:#c87800}.invalid{color:#823ca0}
tr.row-succeeded td:first-child{border-left:4px solid #1e823c}
tr.row-failed td:first-child{border-left:4px solid #c82828}
tr.row-skipped td:first-child{border-left:4px solid #c87800}
tr.row-invalid td:first-child{border-left:4px solid #823ca0}
.msg{font-size:12px;color:#555;max-width:480px;overflow-wrap:anywhere}
.uri{font:11px monospace;color:#777;overflow-wrap:anywhere;max-width:480px}
.note{color:#555}
"""

# Nothing in the page may load or run anything: an escaped-but-missed string stays inert.
_CSP: Final = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _html_page(
    run_id: str, headline: str, extent: str, layout: SheetLayout, rows: Sequence[str]
) -> str:
    header = "".join(
        f"<th>{_e(label)}</th>" for label in ("#", "row id", *layout.columns, "status")
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        f"<title>Contact sheet: run {_e(run_id)}</title><style>{_CSS}</style></head>\n<body>"
        f"<h1>Contact sheet: run <code>{_e(run_id)}</code></h1>"
        f"<p>{_e(headline)}</p><p class='note'>{_e(extent)}. Generated {_e(generated)}.</p>\n"
        f"<table><thead><tr>{header}</tr></thead><tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table></body></html>\n"
    )


def _html_image(cell: _Cell, column: str, thumb_px: int) -> str:
    if cell.data_uri is not None and cell.thumb is not None:
        return (
            f"<td class='img'><img src='{cell.data_uri}' alt='{_e(column)}' "
            f"title='{_e(cell.title)}' width='{cell.thumb.width}' height='{cell.thumb.height}'>"
            "</td>"
        )
    title = f" title='{_e(cell.title)}'" if cell.title else ""
    return (
        f"<td class='img'><div class='ph' style='width:{thumb_px}px;height:{thumb_px}px'"
        f"{title}>{_e(cell.note)}</div></td>"
    )


def _html_stage(label: str, record: RowRecord | None) -> str:
    if record is None:
        return f"<div><b>{_e(label)}</b> <span class='na'>not run</span></div>"
    parts = [
        f"<div><b>{_e(label)}</b> <span class='{_e(record.status)}'>{_e(record.status)}</span>"
        f" &middot; {_e(record.provider)}"
        + (f" &middot; {record.attempts} attempt(s)" if record.attempts else "")
        + "</div>"
    ]
    if record.error_code or record.error_kind:
        kind = f"{record.error_kind} " if record.error_kind else ""
        parts.append(f"<div><code>{_e(kind)}{_e(record.error_code or '')}</code></div>")
    if record.error_message:
        parts.append(f"<div class='msg'>{_e(record.error_message[:_MESSAGE_CHARS])}</div>")
    if record.output_uri:
        parts.append(f"<div class='uri'>{_e(display_uri(record.output_uri))}</div>")
    return "".join(parts)


def _html_row(row: SheetRow, layout: SheetLayout, cells: Sequence[_Cell] | None) -> str:
    if cells is None:
        images = (
            f"<td class='na' colspan='{len(layout.columns)}'>images only for the first rows</td>"
        )
    else:
        images = "".join(
            _html_image(cell, column, layout.thumb_px)
            for column, cell in zip(layout.columns, cells, strict=True)
        )
    stages = _html_stage("try-on", row.tryon)
    if layout.refined:
        stages += _html_stage("refine", row.refine)
    row_id = row.row_id if row.row_id is not None else "(no id)"
    return (
        f"<tr class='row-{_e(row.status)}'><td>{row.row_index + 1}</td>"
        f"<td><code>{_e(row_id)}</code></td>{images}<td>{stages}</td></tr>"
    )


# --------------------------------------------------------------------------------- lake


@dataclass(frozen=True, slots=True)
class ContactSheetUris:
    html: str
    png: str


def lake_output_reader(lake: Lake) -> OutputReader:
    """Outputs this lake holds, through its own filesystem; any other URI is refused
    (``LakePathError``) before anything is opened: the sheet reads no inputs."""
    inside = lake.uri.rstrip("/") + "/"

    async def read(uri: str) -> bytes:
        if not uri.startswith(inside):
            raise LakePathError(f"{display_uri(uri)} is not in the lake")
        return await asyncio.to_thread(lake.read_uri, uri)

    return read


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
) -> ContactSheetUris:
    """Build the run's contact sheet and write ``runs/<run_id>/contact_sheet.{html,png}``.

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
    )
    png_uri = await lake.awrite_bytes(lake.path("runs", run_id, CONTACT_SHEET_PNG), sheet.png)
    html_uri = await lake.awrite_bytes(
        lake.path("runs", run_id, CONTACT_SHEET_HTML), sheet.html.encode("utf-8")
    )
    return ContactSheetUris(html=html_uri, png=png_uri)
