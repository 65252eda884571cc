"""Thumbnails for the contact sheet, and each sheet cell's picture, never fetched.

Prefect-free. Person and garment images are shown only from the bytes the run itself held,
thumbnailed as it went (``ThumbnailBank``). An input the run never obtained (a timeout, an
HTTP error, an endless body) would cost the same again at the end and may not be this run's to
fetch at all, so its cell is a placeholder naming why. Outputs are the run's own storage: those
not thumbnailed during the run are read back from the lake (``lake_output_reader``). An image
that cannot be read or decoded becomes a placeholder naming why; it never breaks the sheet.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Final

from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.results import RowRecord, Status
from tasks.images import (
    DEFAULT_ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageInputError,
    display_uri,
)
from tasks.lake import Lake, LakePathError
from tasks.report.records import SheetRow

__all__ = [
    "DEFAULT_MAX_IMAGE_ROWS",
    "DEFAULT_THUMB_PX",
    "Cell",
    "CellReader",
    "CellSpec",
    "OutputReader",
    "ThumbnailBank",
    "cell_specs",
    "lake_output_reader",
    "make_thumbnail",
]

# Returns the bytes of an output the lake holds, or raises. Never given an input URI.
OutputReader = Callable[[str], Awaitable[bytes] | bytes]

DEFAULT_THUMB_PX: Final = 128
DEFAULT_MAX_IMAGE_ROWS: Final = 100
_THUMB_JPEG_QUALITY: Final = 80
_INPUT_UNAVAILABLE: Final = "input unavailable"
_INPUT_NOT_READ: Final = "not read: done by an earlier run"
PROMPT_NOTE_CHARS: Final = 120  # of a prompt in its placeholder; the page shows it whole


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
    thumb.save(buffer, "JPEG", quality=_THUMB_JPEG_QUALITY)
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
class CellSpec:
    """What one cell of a row should show, decided from the records alone."""

    uri: str | None
    note: str  # the placeholder when there is no image: no uri, or nothing held for it
    output: bool  # a result in the run's lake, which may be read back; inputs never are
    title: str = ""  # the placeholder's whole text when its note is cut (a long prompt)


@dataclass(frozen=True, slots=True)
class Cell:
    """One image cell as drawn: a thumbnail and its ``data:`` URI, or a placeholder note."""

    thumb: Image.Image | None = None
    data_uri: str | None = None
    note: str = ""  # placeholder text when there is no thumbnail
    title: str = ""  # where the image came from (redacted), for the HTML


_PENDING: Final = Cell()  # a bank entry still being made


class CellReader:
    """Each cell's picture without fetching anything: inputs from the bank only (what the run
    held), outputs from the bank or read back from the lake."""

    def __init__(
        self, bank: ThumbnailBank | None, read_output: OutputReader | None, thumb_px: int
    ) -> None:
        self._bank = bank
        self._read_output = read_output
        self._thumb_px = thumb_px
        self._fitted: dict[str, Cell] = {}  # bank cells shrunk for this sheet, once per URI

    async def cell(self, spec: CellSpec) -> Cell:
        if spec.uri is None:
            return Cell(note=spec.note, title=spec.title)
        held = self._bank.get(spec.uri) if self._bank is not None else None
        if held is not None:
            return self._fit(spec.uri, held)
        if not spec.output or self._read_output is None:
            return Cell(note=spec.note, title=display_uri(spec.uri))
        return await self._read(spec.uri)

    def _fit(self, uri: str, cell: Cell) -> Cell:
        """A bank cell made at another size than this sheet's: shrunk (smaller ones are centred),
        since the bytes it came from are gone."""
        if cell.thumb is None or max(cell.thumb.size) <= self._thumb_px:
            return cell
        if (fitted := self._fitted.get(uri)) is None:
            thumb = cell.thumb.copy()
            thumb.thumbnail((self._thumb_px, self._thumb_px), reducing_gap=2.0)
            fitted = Cell(thumb=thumb, data_uri=_jpeg_data_uri(thumb), title=cell.title)
            self._fitted[uri] = fitted
        return fitted

    async def _read(self, uri: str) -> Cell:
        assert self._read_output is not None
        title = display_uri(uri)
        try:
            data = self._read_output(uri)
            if inspect.isawaitable(data):
                data = await data
            thumb, data_uri = await asyncio.to_thread(_thumbnail_and_uri, data, self._thumb_px)
        # The reader is injected and may raise anything: a cell shows why, the sheet goes on.
        except Exception as exc:
            return Cell(note=f"missing output: {_error_code(exc)}", title=title)
        return Cell(thumb=thumb, data_uri=data_uri, title=title)


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
        self._cells: dict[str, Cell] = {}
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
            self._cells[uri] = Cell(note=f"unreadable: {_error_code(exc)}", title=title)
            return
        self._cells[uri] = Cell(thumb=thumb, data_uri=data_uri, title=title)

    def get(self, uri: str) -> Cell | None:
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
    if record is not None and record.status == Status.SUCCEEDED and record.reused_from_run:
        return _INPUT_NOT_READ  # recognised from its source: the rerun read no input
    if record is None or record.status == Status.SUCCEEDED or not record.error_code:
        return _INPUT_UNAVAILABLE
    if not _names_input(record.error_message or "", uri):
        return _INPUT_UNAVAILABLE
    code = record.error_code
    fetched = not (code.startswith("FETCH_") or code in _NOT_FETCHED_CODES)
    return f"input {'unusable' if fetched else 'not fetched'}: {code}"


def cell_specs(row: SheetRow, columns: Sequence[str]) -> list[CellSpec]:
    """What each of ``columns`` (``SheetLayout.columns``) shows for ``row``: the inputs, then
    each track's try-on outcome ("coarse", or "coarse:<track>" for a compared provider's) and
    its refine ("refined", "refined:<track>")."""
    tryon = row.tryon
    if tryon is None:  # a row with compared tracks only: their records name the inputs
        tryon = next((t.tryon for t in row.tracks if t.tryon is not None), None)
    invalid = tryon is not None and tryon.status == Status.INVALID

    def input_spec(uri: str | None, absent: str, title: str = "") -> CellSpec:
        if invalid:  # nothing was attempted for the row
            return CellSpec(uri=None, note="invalid row", output=False)
        if uri is None:
            return CellSpec(uri=None, note=absent, output=False, title=title)
        return CellSpec(uri=uri, note=_input_note(tryon, uri), output=False)

    garment = tryon.garment_image if tryon else None
    prompt = " ".join((row.prompt or "").split())
    if garment is None and prompt:  # a prompt row: its text where the garment would be
        garment_spec = input_spec(None, f"prompt: {_cut(prompt, PROMPT_NOTE_CHARS)}", prompt)
    else:
        garment_spec = input_spec(garment, "no garment image (prompt)")
    specs = {
        "person": input_spec(tryon.person_image if tryon else None, "no image"),
        "garment": garment_spec,
    }
    results: list[tuple[str, RowRecord | None]] = [("coarse", row.tryon), ("refined", row.refine)]
    for column in columns:
        stage, _, name = column.partition(":")
        if name:
            track = row.track(name)
            results.append(
                (column, (track.tryon if stage == "coarse" else track.refine) if track else None)
            )
    for column, record in results:
        succeeded = record is not None and record.status == Status.SUCCEEDED
        if succeeded and record is not None and record.reused_from_run:
            # An earlier run's result: its own sheet shows it; this run reads no image for it.
            note = f"done by run {record.reused_from_run[:8]}: see its sheet"
            specs[column] = CellSpec(uri=None, note=note, output=False)
            continue
        uri = record.output_uri if succeeded and record else None
        specs[column] = CellSpec(
            uri=uri,
            note=(
                _stage_note(record, absent="invalid row" if invalid else "not run")
                if uri is None
                else "output not held"
            ),
            output=True,
        )
    return [specs[c] for c in columns]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def lake_output_reader(lake: Lake) -> OutputReader:
    """Outputs this lake holds, through its own filesystem; any other URI is refused
    (``LakePathError``) before anything is opened: the sheet reads no inputs."""
    inside = lake.uri.rstrip("/") + "/"

    async def read(uri: str) -> bytes:
        if not uri.startswith(inside):
            raise LakePathError(f"{display_uri(uri)} is not in the lake")
        return await asyncio.to_thread(lake.read_uri, uri)

    return read
