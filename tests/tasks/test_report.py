"""Contact sheets from synthetic records over real image files in a temporary lake (no Prefect).

The sheet never fetches an input: it shows what the run held (a ``ThumbnailBank``) and reads
only outputs back from the lake. The last tests run real rows against a loopback input server
and the emulator, then count what the sheet asks of that server: nothing.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from emulator.keys import accepted_key
from emulator.server import EmulatorConfig, EmulatorServer
from providers.changeclothes.client import ChangeClothesClient
from schemas.manifest import ManifestRow
from schemas.results import ErrorKind, RowRecord, Stage, Status
from tasks.fetch_guard import inputs_client_for
from tasks.images import PreparedImageCache
from tasks.lake import Lake
from tasks.process import Lane, RetryPolicy, RunContext, process_rows
from tasks.report import (
    PLACEHOLDER_RGB,
    ContactSheet,
    SheetLayout,
    ThumbnailBank,
    build_contact_sheet,
    count_statuses,
    group_failures,
    group_rows,
    lake_output_reader,
    make_thumbnail,
    read_run_records,
    write_contact_sheet,
    write_report_records,
)
from tests.input_server import InputServer

RUN_ID = "run-7"
RED, BLUE, GREEN, MAGENTA, YELLOW = (
    (220, 30, 30),
    (30, 40, 220),
    (20, 200, 40),
    (200, 0, 200),
    (
        230,
        210,
        0,
    ),
)
SCRIPT_ID = "<script>alert('x')</script>"
SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "images"
RUN_FETCH_TIMEOUT_S = 0.3  # the run's --fetch-timeout in the loopback tests
NASTY_MESSAGE = "rejected <img src=x onerror=alert(1)> & 'quoted' | piped"


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (60, 90)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def close(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    """Whether ``pixel`` is ``colour`` as JPEG (the thumbnails and the sheet) gives it back."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


class RunFixture:
    """A lake holding one run's outputs, with its records (the metadata not yet written)."""

    def __init__(self, root: Path) -> None:
        self.lake = Lake.open(str(root / "lake"))
        inputs = root / "inputs"
        inputs.mkdir()
        self.person = inputs / "person.png"
        self.person.write_bytes(png_bytes(RED))
        self.garment = inputs / "garment.png"
        self.garment.write_bytes(png_bytes(BLUE))
        self.corrupt = inputs / "corrupt.jpg"
        self.corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        self.records: list[RowRecord] = []

    async def held(self, *, max_rows: int = 100) -> ThumbnailBank:
        """The bank the run would have filled: the input bytes of every row it prepared (all
        but the invalid one), offered as rows went."""
        bank = ThumbnailBank(max_rows=max_rows)
        for record in self.records:
            if record.status != Status.INVALID and record.stage == Stage.TRYON:
                for uri in (record.person_image, record.garment_image):
                    if uri is not None:
                        bank.offer(record.row_index, uri, Path(uri).read_bytes())
        await bank.settle()
        return bank

    def output(self, row_id: str, stage: Stage, colour: tuple[int, int, int]) -> str:
        return self.lake.write_bytes(self.output_path(row_id, stage), png_bytes(colour))

    def output_path(self, row_id: str, stage: Stage) -> str:
        return self.lake.path("outputs", f"{row_id}-{stage}.png")

    def add(self, row_index: int, row_id: str, status: Status, **fields: object) -> None:
        defaults: dict[str, object] = {
            "person_image": str(self.person),
            "garment_image": str(self.garment),
            "category": "upper_body",
        }
        if status == Status.INVALID:
            defaults = {}
        self.records.append(
            RowRecord.model_validate(
                {
                    "run_id": RUN_ID,
                    "row_id": row_id,
                    "row_index": row_index,
                    "provider": "changeclothes",
                    "status": status,
                    **defaults,
                    **fields,
                }
            )
        )


@pytest.fixture
def run(tmp_path: Path) -> RunFixture:
    """Six rows: refined, invalid (hostile id), failed (corrupt garment), output file missing,
    refine skipped, prompt row (no garment)."""
    fx = RunFixture(tmp_path)
    fx.add(0, "ok-1", Status.SUCCEEDED, output_uri=fx.output("ok-1", Stage.TRYON, GREEN))
    fx.add(
        0,
        "ok-1",
        Status.SUCCEEDED,
        stage=Stage.REFINE,
        provider="ailab",
        output_uri=fx.output("ok-1", Stage.REFINE, MAGENTA),
    )
    fx.add(
        1,
        SCRIPT_ID,
        Status.INVALID,
        error_kind=ErrorKind.INVALID,
        error_code="INVALID_ROW",
        error_message="id unsafe for a path",
    )
    fx.add(
        2,
        "fail-1",
        Status.FAILED,
        garment_image=str(fx.corrupt),
        error_kind=ErrorKind.PERMANENT,
        error_code="IMAGE_REJECTED",
        error_message=NASTY_MESSAGE,
        attempts=1,
    )
    fx.add(
        3,
        "missing-out",
        Status.SUCCEEDED,
        output_uri=fx.lake.full_uri(fx.output_path("missing-out", Stage.TRYON)),
    )
    fx.add(
        4, "skip-refine", Status.SUCCEEDED, output_uri=fx.output("skip-refine", Stage.TRYON, YELLOW)
    )
    fx.add(
        4,
        "skip-refine",
        Status.SKIPPED,
        stage=Stage.REFINE,
        provider="ailab",
        error_code="REFINE_NOT_APPLICABLE",
        error_message="no top garment to refine",
    )
    fx.add(
        5,
        "prompt-row",
        Status.SUCCEEDED,
        garment_image=None,
        output_uri=fx.output("prompt-row", Stage.TRYON, GREEN),
    )
    return fx


class RowsParser(HTMLParser):
    """Collects, per table body row, the text of each cell (entities decoded)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.scripts = 0
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts += 1
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(sheet: ContactSheet) -> RowsParser:
    return parse_html(sheet.html)


def parse_html(page: str) -> RowsParser:
    parser = RowsParser()
    parser.feed(page)
    return parser


async def test_grid_image_has_a_band_per_row_and_images_in_their_cells(run: RunFixture) -> None:
    sheet = await build_contact_sheet(
        run.records, bank=await run.held(), read_output=lake_output_reader(run.lake)
    )
    layout = sheet.layout
    grid = Image.open(BytesIO(sheet.jpeg))
    grid.load()

    assert grid.format == "JPEG"
    assert layout.columns == ("person", "garment", "coarse", "refined")  # the run refined
    assert grid.size == (4 * (128 + 2 * layout.pad) + layout.status_width, layout.top + 6 * 140)
    assert (sheet.rows, sheet.rows_with_images, sheet.rows_listed) == (6, 6, 6)

    def centre(row: int, column: str) -> tuple[int, ...]:
        left, top, right, bottom = layout.thumb_box(row, column)
        return grid.getpixel(((left + right) // 2, (top + bottom) // 2))

    def corner(row: int, column: str) -> tuple[int, ...]:
        left, top, _, _ = layout.thumb_box(row, column)
        return grid.getpixel((left + 2, top + 2))

    # Row 0 succeeded in both stages: every cell shows its image, none the placeholder.
    assert close(centre(0, "person"), RED)
    assert close(centre(0, "garment"), BLUE)
    assert close(centre(0, "coarse"), GREEN)
    assert close(centre(0, "refined"), MAGENTA)
    assert not close(centre(0, "coarse"), PLACEHOLDER_RGB)
    # Invalid row: placeholders everywhere.
    for column in layout.columns:
        assert close(corner(1, column), PLACEHOLDER_RGB)
    # Failed row: the person still shows, the corrupt garment (held, but its bytes do not
    # decode) and the coarse cell do not.
    assert close(centre(2, "person"), RED)
    assert close(corner(2, "garment"), PLACEHOLDER_RGB)
    assert close(corner(2, "coarse"), PLACEHOLDER_RGB)
    # Output recorded but the file is gone: a placeholder, and the sheet is still built.
    assert close(corner(3, "coarse"), PLACEHOLDER_RGB)
    assert close(centre(4, "coarse"), YELLOW)
    assert close(corner(4, "refined"), PLACEHOLDER_RGB)
    assert close(corner(5, "garment"), PLACEHOLDER_RGB)
    assert close(centre(5, "coarse"), GREEN)


async def test_html_lists_every_row_escaped_with_its_status(run: RunFixture) -> None:
    sheet = await build_contact_sheet(
        run.records, bank=await run.held(), read_output=lake_output_reader(run.lake)
    )
    page = parse(sheet)

    # Every row, in manifest order, ids round-tripping through the escaping.
    ids = [cells[1] for cells in page.rows]
    assert ids == ["ok-1", SCRIPT_ID, "fail-1", "missing-out", "skip-refine", "prompt-row"]
    assert page.scripts == 0
    assert SCRIPT_ID not in sheet.html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in sheet.html
    assert "<img src=x" not in sheet.html
    assert NASTY_MESSAGE in page.rows[2][-1]
    assert "default-src 'none'" in sheet.html  # nothing may load or run

    # Images: ok-1 4, invalid 0, fail-1 1 (corrupt garment), missing-out 2, skip-refine 3,
    # prompt-row 2.
    assert sheet.html.count("src='data:image/jpeg;base64,") == 12
    cells = {cells[1]: cells for cells in page.rows}
    assert cells["ok-1"][-1].count("succeeded") == 2
    assert cells[SCRIPT_ID][2:6] == ["invalid row"] * 4
    assert "INVALID_ROW" in cells[SCRIPT_ID][-1]
    assert cells["fail-1"][3] == "unreadable: DECODE_FAILED"
    assert cells["fail-1"][4] == "failed: IMAGE_REJECTED"
    assert cells["fail-1"][5] == "not run"
    assert cells["missing-out"][4] == "missing output: NOT_FOUND"
    assert cells["skip-refine"][5] == "skipped: REFINE_NOT_APPLICABLE"
    assert cells["prompt-row"][3] == "no garment image (prompt)"
    assert "all 6 rows shown" in sheet.html


async def test_rows_beyond_the_image_limit_are_listed_and_said_to_be(run: RunFixture) -> None:
    calls: list[str] = []

    def read_local(uri: str) -> bytes:  # a plain sync reader is accepted too
        calls.append(uri)
        return Path(uri).read_bytes()

    sheet = await build_contact_sheet(
        run.records,
        bank=await run.held(max_rows=2),
        read_output=read_local,
        max_image_rows=2,
        max_listed_rows=5,
    )
    grid = Image.open(BytesIO(sheet.jpeg))

    assert grid.height == sheet.layout.top + 2 * sheet.layout.row_height
    assert (sheet.rows_with_images, sheet.rows_listed) == (2, 5)
    assert [cells[1] for cells in parse(sheet).rows] == [
        "ok-1",
        SCRIPT_ID,
        "fail-1",
        "missing-out",
        "skip-refine",
    ]
    assert "images for the first 2 of 6 rows (limit)" in sheet.html
    assert "5 rows listed in the HTML" in sheet.html
    # Only the first two rows' outputs were read (ok-1's two; the invalid row has none); the
    # inputs came from the bank.
    assert calls == [run.output_path("ok-1", Stage.TRYON), run.output_path("ok-1", Stage.REFINE)]


async def test_a_large_run_keeps_the_grid_image_bounded(tmp_path: Path) -> None:
    image = png_bytes(GREEN, (40, 40))
    records = [
        RowRecord(
            run_id=RUN_ID,
            row_id=f"r{i:04d}",
            row_index=i,
            provider="changeclothes",
            status=Status.SUCCEEDED,
            person_image="p.png",
            garment_image="g.png",
            output_uri=f"out-{i}.png",
        )
        for i in range(250)
    ]

    async def read(uri: str) -> bytes:
        return image

    bank = ThumbnailBank()
    bank.offer(0, "p.png", image)
    bank.offer(0, "g.png", image)
    sheet = await build_contact_sheet(records, bank=bank, read_output=read)
    grid = Image.open(BytesIO(sheet.jpeg))

    assert sheet.layout.columns == ("person", "garment", "coarse")  # nothing refined
    assert grid.size == (3 * 140 + sheet.layout.status_width, sheet.layout.top + 100 * 140)
    assert sheet.html.count("<tr class='row-succeeded'>") == 250
    assert sheet.html.count("src='data:image/jpeg;base64,") == 300
    assert "every row is listed in contact_sheet.html" in sheet.html


async def test_write_contact_sheet_reads_the_run_back_from_the_lake(run: RunFixture) -> None:
    # Rows 0-2 are in this run's metadata; rows 3-5 were recorded by an earlier committed run,
    # so this run keeps them for its report only. Their outputs were never in this run's hands
    # (not in the bank): the sheet reads them back from the lake.
    first_three = [r for r in run.records if r.row_index <= 2]
    run.lake.write_metadata(RUN_ID, "part-a", first_three)
    write_report_records(run.lake, RUN_ID, "part-a", run.records[len(first_three) :])

    uris = await write_contact_sheet(run.lake, RUN_ID, manifest_rows=7, bank=await run.held())

    assert uris.html == run.lake.full_uri(run.lake.path("runs", RUN_ID, "contact_sheet.html"))
    assert uris.jpeg == run.lake.full_uri(run.lake.path("runs", RUN_ID, "contact_sheet.jpg"))
    staged = Path(uris.html).read_text(encoding="utf-8")
    assert staged.count("<tr class='row-") == 6
    assert staged.count("src='data:image/jpeg;base64,") == 12
    assert "1 of the manifest&#39;s 7 rows have no record" in staged
    with Image.open(uris.jpeg) as grid:
        assert grid.height == 44 + 22 + 6 * 140
    # The rows an earlier run had done are marked so, stage by stage, and counted.
    rows = {cells[1]: cells[-1] for cells in parse_html(staged).rows}
    for row_id in ("missing-out", "skip-refine", "prompt-row"):
        assert "already done by an earlier run: no new provider call" in rows[row_id]
    assert "already recorded by an earlier run" in rows["skip-refine"]  # its refine stage
    assert not any("already" in rows[row_id] for row_id in ("ok-1", "fail-1"))
    assert staged.count(" earlier'>") == 3  # the row marker
    assert "try-on: 4 succeeded, 1 failed, 1 invalid (3 from earlier runs)" in staged

    # Once committed, the published metadata is read (the staged parts may be gone).
    run.lake.commit_run(RUN_ID, {"run_id": RUN_ID})
    for part in run.lake.fs.glob(run.lake.path("runs", RUN_ID, "parts") + "/*.parquet"):
        run.lake.fs.rm_file(part)
    assert [r.row_index for r in group_rows(read_run_records(run.lake, RUN_ID))] == list(range(6))


async def test_prompt_rows_show_their_prompt_escaped_and_messages_are_whole(
    run: RunFixture,
) -> None:
    prompt = "Help <b>her</b> into a 'blue' & \"striped\" <script>alert(1)</script> shirt"
    prompt += ", very long" * 20
    message = "the provider explains: " + "a long reason, " * 60 + "THE END"
    run.add(6, "long-msg", Status.FAILED, error_kind=ErrorKind.PERMANENT, error_code="X_Y")
    run.records[-1].error_message = message
    sheet = await build_contact_sheet(
        run.records,
        bank=await run.held(),
        read_output=lake_output_reader(run.lake),
        prompts={5: prompt},
    )
    page = parse(sheet)
    cells = {cells[1]: cells for cells in page.rows}

    # Where the garment would be: the prompt, cut to fit (whole in its tooltip); whole beside.
    placeholder = cells["prompt-row"][3]
    assert placeholder.startswith("prompt: Help <b>her</b> into a 'blue'")
    assert placeholder.endswith("...") and len(placeholder) < len(prompt)
    assert prompt in cells["prompt-row"][-1]
    assert page.scripts == 0 and "<script>" not in sheet.html and "<b>her" not in sheet.html
    assert "&lt;b&gt;her&lt;/b&gt;" in sheet.html
    assert "title='Help &lt;b&gt;her&lt;/b&gt; into a &#39;blue&#39; &amp; &#34;striped" in (
        sheet.html
    )
    # A message is shown whole on the page (wrapped by the page, not cut).
    assert message in cells["long-msg"][-1]
    # Without the manifest's prompts the placeholder still says what the row is.
    plain = parse(await build_contact_sheet(run.records))
    assert {c[1]: c for c in plain.rows}["prompt-row"][3] == "no garment image (prompt)"


async def test_a_stage_done_by_an_earlier_run_names_it() -> None:
    done = RowRecord(
        run_id=RUN_ID,
        row_id="r",
        row_index=0,
        provider="changeclothes",
        status=Status.SUCCEEDED,
        reused_from_run="run-3",
    )
    sheet = await build_contact_sheet([done])
    assert "already done by run run-3: no new provider call" in parse(sheet).rows[0][-1]


async def test_write_contact_sheet_refuses_an_unsafe_run_id(run: RunFixture) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        await write_contact_sheet(run.lake, "../escape", run.records)


async def test_hostile_uris_and_run_ids_stay_inert_in_attributes_and_text() -> None:
    """The page's attributes are single-quoted: a quote in a URI must not end one."""
    hostile = "/in/a' onmouseover='alert(1)'><script>alert(2)</script>.png"
    record = RowRecord(
        run_id="r'><script>alert(3)</script>",
        row_id="h",
        row_index=0,
        provider="changeclothes",
        status=Status.SUCCEEDED,
        person_image=hostile,
        garment_image=hostile,
        output_uri=hostile,
    )
    sheet = await build_contact_sheet([record])  # nothing held, nothing read: placeholders
    page = parse(sheet)

    assert page.scripts == 0
    assert "<script>" not in sheet.html and "' onmouseover=" not in sheet.html
    # The placeholders of the person, the garment and the output each name it in a title.
    assert sheet.html.count("title='/in/a&#39; onmouseover=&#39;alert(1)&#39;&gt;&lt;script") == 3
    assert hostile in page.rows[0][-1]  # the output's URI, shown as text


def test_make_thumbnail_fits_the_box_upright_and_flat() -> None:
    # A landscape JPEG stored sideways (EXIF orientation 6) is a portrait thumbnail.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = BytesIO()
    Image.new("RGB", (400, 200), RED).save(buffer, "JPEG", exif=exif)
    thumb = make_thumbnail(buffer.getvalue(), 128)
    assert thumb.size == (64, 128)
    assert thumb.mode == "RGB"

    # Transparency goes onto white.
    buffer = BytesIO()
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(buffer, "PNG")
    assert make_thumbnail(buffer.getvalue(), 128).getpixel((10, 10)) == (255, 255, 255)


def test_make_thumbnail_refuses_oversized_headers_before_decoding() -> None:
    buffer = BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, "PNG")
    with pytest.raises(Exception, match="DECOMPRESSION_BOMB"):
        make_thumbnail(buffer.getvalue(), 128, max_pixels=1_000_000)


def test_group_rows_keeps_the_latest_record_per_stage() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first = RowRecord(
        run_id=RUN_ID,
        row_id="a",
        row_index=0,
        provider="changeclothes",
        status=Status.FAILED,
        finished_at=t0,
    )
    retried = first.model_copy(
        update={"status": Status.SUCCEEDED, "finished_at": t0 + timedelta(1)}
    )
    rows = group_rows([retried, first])
    assert len(rows) == 1
    assert rows[0].tryon is retried
    assert rows[0].refine is None


def test_tallies_by_provider_stage_status_and_failures_by_code(run: RunFixture) -> None:
    counts = {(c.provider, c.stage, c.status): c.records for c in count_statuses(run.records)}
    assert counts == {
        ("changeclothes", "tryon", "succeeded"): 4,
        ("changeclothes", "tryon", "invalid"): 1,
        ("changeclothes", "tryon", "failed"): 1,
        ("ailab", "refine", "succeeded"): 1,
        ("ailab", "refine", "skipped"): 1,
    }
    failures = {(g.stage, g.error_code): g for g in group_failures(run.records)}
    assert set(failures) == {
        ("tryon", "INVALID_ROW"),
        ("tryon", "IMAGE_REJECTED"),
        ("refine", "REFINE_NOT_APPLICABLE"),
    }
    rejected = failures[("tryon", "IMAGE_REJECTED")]
    assert (rejected.records, rejected.example_row_ids) == (1, ("fail-1",))
    assert rejected.example_message == NASTY_MESSAGE


async def test_a_thumbnail_bank_is_the_sheets_only_source_of_inputs(run: RunFixture) -> None:
    """Thumbnails offered during the run are laid out as they are: the sheet reads only outputs
    the bank lacks, never an input; rows past the sheet's image rows and repeated URIs are not
    thumbnailed; bytes that do not decode leave the reason in the bank."""
    bank = ThumbnailBank(max_rows=3)
    person, garment = str(run.person), str(run.garment)
    for row_index in range(5):  # every row shares the person: one thumbnail
        bank.offer(row_index, person, png_bytes(YELLOW))
    bank.offer(1, garment, png_bytes(BLUE))
    bank.offer(3, "late-row.png", png_bytes(RED))  # row 3: not drawn with images (max 3)
    bank.offer(0, "broken.png", b"not an image")
    await bank.settle()
    assert len(bank) == 2
    assert bank.get(person) is not None and bank.get("late-row.png") is None
    broken = bank.get("broken.png")
    assert broken is not None and broken.thumb is None
    assert broken.note == "unreadable: DECODE_FAILED"  # the sheet has nothing else to read

    reads: list[str] = []

    async def read(uri: str) -> bytes:
        reads.append(uri)
        return Path(uri).read_bytes()

    sheet = await build_contact_sheet(run.records, bank=bank, read_output=read, max_image_rows=3)
    outputs = {r.output_uri for r in run.records if r.output_uri}
    assert reads and set(reads) <= outputs  # outputs the bank lacks; not one input
    # fail-1's corrupt garment was never offered: a placeholder, not a read.
    assert {cells[1]: cells for cells in parse(sheet).rows}["fail-1"][3] == "input unavailable"
    grid = Image.open(BytesIO(sheet.jpeg)).convert("RGB")
    box = sheet.layout.thumb_box(0, "person")
    centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
    assert close(grid.getpixel(centre), YELLOW)  # the bank's picture, not the file's red


# ------------------------------------------------------------------- no fetch, no network


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name look-up and connection attempt in this process is refused and noted."""
    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., NoReturn]:
        def refused(*args: object, **kwargs: object) -> NoReturn:
            attempts.append(what)
            raise OSError(f"this test must not touch the network ({what})")

        return refused

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return attempts


@pytest.mark.parametrize("thumb_px", [128, 96], ids=["bank-size", "smaller-sheet"])
async def test_held_inputs_are_shown_without_any_network(
    tmp_path: Path, no_network: list[str], thumb_px: int
) -> None:
    """Inputs behind URLs the run fetched and held: the sheet lays out the run's thumbnails,
    shrunk when drawn smaller than the bank made them, and resolves or connects to nothing."""
    fx = RunFixture(tmp_path)
    person = "https://images.example.invalid/person.png?X-Amz-Signature=s3cret"
    garment = "https://images.example.invalid/garment.png"
    inputs: dict[str, object] = {"person_image": person, "garment_image": garment}
    fx.add(0, "ok", Status.SUCCEEDED, output_uri=fx.output("ok", Stage.TRYON, GREEN), **inputs)
    fx.add(1, "rejected", Status.FAILED, error_code="IMAGE_REJECTED", attempts=1, **inputs)
    bank = ThumbnailBank()  # the run's size, 128 px
    bank.offer(0, person, png_bytes(RED, (300, 450)))
    bank.offer(0, garment, png_bytes(BLUE, (300, 450)))
    await bank.settle()

    uris = await write_contact_sheet(fx.lake, RUN_ID, fx.records, bank=bank, thumb_px=thumb_px)

    assert no_network == []
    html = Path(uris.html).read_text(encoding="utf-8")
    assert html.count("src='data:image/jpeg;base64,") == 5  # both rows' inputs, one output
    assert "s3cret" not in html
    sizes = [(int(w), int(h)) for w, h in re.findall(r"width='(\d+)' height='(\d+)'", html)]
    assert all(max(size) <= thumb_px for size in sizes)
    assert (thumb_px * 2 // 3, thumb_px) in sizes  # a 2:3 input fills the sheet's box
    layout = SheetLayout(thumb_px=thumb_px)
    with Image.open(uris.jpeg) as opened:
        grid = opened.convert("RGB")
    for row, column, colour in ((0, "person", RED), (1, "garment", BLUE)):
        left, top, right, bottom = layout.thumb_box(row, column)
        assert close(grid.getpixel(((left + right) // 2, (top + bottom) // 2)), colour)


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer.start(EmulatorConfig())
    yield server
    server.stop()


async def run_rows(
    rows: list[ManifestRow], lake: Lake, emulator: EmulatorServer, bank: ThumbnailBank
) -> list[RowRecord]:
    """The rows through the run's own pipeline: inputs fetched by the run's guarded client with
    loopback allowed (``fetch_allow``) and a short timeout, one attempt each, the bank filled
    as rows go, as in the flow."""
    async with (
        httpx.AsyncClient(timeout=30) as provider_http,
        inputs_client_for(["127.0.0.1"], timeout_s=RUN_FETCH_TIMEOUT_S) as inputs_http,
    ):
        client = ChangeClothesClient(
            http=provider_http,
            api_key=SecretStr(accepted_key("CHANGECLOTHES_API_KEY")),
            base_url=emulator.base_url,
        )
        ctx = RunContext(
            run_id=RUN_ID,
            lane=Lane(client=client, max_in_flight=4),
            http=inputs_http,
            lake=lake,
            images=PreparedImageCache(fetch_max_bytes=1 << 20),
            retry=RetryPolicy(max_attempts=1),
            thumbnails=bank,
        )
        return await process_rows(rows, ctx)


async def test_inputs_the_run_could_not_fetch_are_never_fetched_for_the_sheet(
    input_server: InputServer, emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Rows whose input hung, failed with a 500, streamed without end or was refused: after
    the run's own attempts the sheet asks the server for nothing (not even the input it did
    hold), waits on nothing, and shows each such input as a placeholder naming why."""
    person, garment = str(SAMPLE / "person_ana.jpg"), str(SAMPLE / "garment_red_tee.jpg")
    inputs = {
        "held": (input_server.url("/img/person.jpg"), garment),
        "hangs": (input_server.url("/hang"), str(SAMPLE / "garment_striped_tee.jpg")),
        "errors": (person, input_server.url("/status/500")),
        "endless": (input_server.url("/endless"), garment),
        "refused": ("http://10.0.0.1/person.jpg?sig=s3cret", garment),
    }
    rows = [
        ManifestRow(
            row_index=index, id=row_id, person_image=p, garment_image=g, category="upper_body"
        )
        for index, (row_id, (p, g)) in enumerate(inputs.items())
    ]
    lake = Lake.open(str(tmp_path / "lake"))
    bank = ThumbnailBank()
    records = await run_rows(rows, lake, emulator, bank)
    assert {r.row_id: r.error_code for r in records} == {
        "held": None,
        "hangs": "FETCH_TIMEOUT",
        "errors": "FETCH_HTTP_500",
        "endless": "FETCH_TOO_LARGE",
        "refused": "FETCH_BLOCKED_ADDRESS",
    }
    by_the_run = input_server.requests()
    assert by_the_run == {"/img/person.jpg": 1, "/hang": 1, "/status/500": 1, "/endless": 1}

    uris = await write_contact_sheet(lake, RUN_ID, records, bank=bank, manifest_rows=len(rows))

    assert input_server.requests() == by_the_run  # not one request more
    html = Path(uris.html).read_text(encoding="utf-8")
    cells = {cells[1]: cells[2:5] for cells in parse_html(html).rows}
    # The input a failed row did obtain is shown: it was offered as soon as it was prepared.
    assert cells["hangs"] == ["input not fetched: FETCH_TIMEOUT", "", "failed: FETCH_TIMEOUT"]
    assert cells["errors"][:2] == ["", "input not fetched: FETCH_HTTP_500"]
    assert cells["endless"][0] == "input not fetched: FETCH_TOO_LARGE"
    assert cells["refused"][0] == "input not fetched: FETCH_BLOCKED_ADDRESS"
    # The held row's person, garment and result; the garment again where rows share it, and
    # the one input each of "hangs" and "errors" did obtain.
    assert html.count("src='data:image/jpeg;base64,") == 7
    assert cells["held"] == ["", "", ""]  # images, no placeholder text
    assert cells["endless"][1] == cells["refused"][1] == ""
    assert "s3cret" not in html
    layout = SheetLayout()
    with Image.open(uris.jpeg) as grid:
        corners = [grid.getpixel(layout.thumb_box(row, "person")[:2]) for row in range(len(rows))]
    # A placeholder fills its whole box; the held row's thumbnail is centred on the white.
    shown = [cells[row_id][0] == "" for row_id in inputs]
    assert shown == [True, False, True, False, False]  # held, hangs, errors, endless, refused
    expected = [(255, 255, 255) if s else PLACEHOLDER_RGB for s in shown]
    assert all(close(c, e) for c, e in zip(corners, expected, strict=True)), corners
