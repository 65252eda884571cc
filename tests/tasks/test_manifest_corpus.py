"""A corpus of broken manifests, read from real files the way a run reads them.

tests/schemas/test_manifest.py checks each rule on in-memory frames and
tests/tasks/test_manifest.py the readers one format at a time; here every case is a file whose
bad row sits between good rows, and the test asserts the bad row gets its own, specific reason
while the good rows stay valid (row-level problems), or that the whole manifest is refused
with a message naming the problem (manifest-level problems). The last tests run the flow: bad
rows are recorded in the lake, and an unusable manifest stops the run before any provider call.

Ids are a contract, not just file names: they are refused unless they are short ASCII
``[A-Za-z0-9._-]`` not starting with '.', though the lake never builds a path from them
(outputs are content-addressed; see tests/tasks/test_path_safety.py). A demanding user joins
on ids, exports by id and greps logs for them: ``../../x``, ``/etc/passwd``, an invisible
right-to-left override or a 10 kB id would bite there, so they are rejected up front with the
reason, never silently rewritten.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest

from schemas.manifest import ManifestError
from tasks.manifest import load_manifest

if TYPE_CHECKING:
    from emulator.server import EmulatorServer

HEADER = "id,person_image,garment_image,category,garment_description,gender,prompt"
GOOD_BEFORE = "good-0,p.jpg,g.jpg,upper_body,a shirt,woman,"
GOOD_AFTER = "good-2,p.jpg,,,,,a red coat"
UNSAFE = "is unsafe for a path"


def write_csv(path: Path, *rows: str, header: str = HEADER, prefix: bytes = b"") -> str:
    text = "\n".join([header, *rows]) + "\n"
    path.write_bytes(prefix + text.encode("utf-8"))
    return str(path)


# -- row-level problems: the row is invalid with a specific reason, the others go on ----------

# (case, the bad CSV row (as written in the file), its expected reason(s))
ROW_CASES: list[tuple[str, str, list[str]]] = [
    ("dot-dot traversal id", "../../x,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("absolute id", "/etc/passwd,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("nested id", "a/b,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("bare dot-dot id", "..,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("hidden-file id", ".env,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("backslash id", "..\\..\\x,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("percent-encoded id", "..%2F..%2Fx,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("NUL in id", "r\x001,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("quoted newline in id", '"r\n1",p.jpg,g.jpg,dresses,,,', [UNSAFE]),
    ("fullwidth dots id", "\uff0e\uff0e\uff0fx,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("right-to-left override id", "r\u202egpj.1,p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("129-char id", "x" * 129 + ",p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("10k-char id", "y" * 10_000 + ",p.jpg,g.jpg,dresses,,,", [UNSAFE]),
    ("missing id", ",p.jpg,g.jpg,dresses,,,", ["missing value in column 'id'"]),
    ("whitespace id", "   ,p.jpg,g.jpg,dresses,,,", ["missing value in column 'id'"]),
    ("missing person", "r1,,g.jpg,dresses,,,", ["missing value in column 'person_image'"]),
    ("no garment, no prompt", "r1,p.jpg,,,,,", ["garment_image or prompt is required"]),
    (
        "garment without category",
        "r1,p.jpg,g.jpg,,,,",
        ["missing value in column 'category' (required for rows with a garment_image)"],
    ),
    ("numeric category", "r1,p.jpg,g.jpg,1,,,", ["unknown category '1'"]),
    ("numeric gender", "r1,p.jpg,g.jpg,dresses,,7,", ["invalid gender '7'"]),
    (
        "unknown scheme",
        "r1,ftpx://h/p.jpg,g.jpg,dresses,,,",
        ["URI scheme 'ftpx' is not allowed in column 'person_image'"],
    ),
    ("ftp image", "r1,ftp://127.0.0.1/p.jpg,g.jpg,dresses,,,", ["URI scheme 'ftp' is not allowed"]),
    ("gs image", "r1,p.jpg,gs://b/g.jpg,dresses,,,", ["URI scheme 'gs' is not allowed"]),
    (
        "chained fsspec URL",
        "r1,simplecache::http://127.0.0.1:8000/p.jpg,g.jpg,dresses,,,",
        ["chained fsspec URLs ('simplecache::...') are not allowed in column 'person_image'"],
    ),
    (
        "chain hidden behind upper case and spaces",
        "r1, SIMPLECACHE::HTTP://169.254.169.254/x ,g.jpg,dresses,,,",
        ["chained fsspec URLs ('simplecache::...')"],
    ),
    (
        "archive over http",
        "r1,p.jpg,zip://g.jpg::http://127.0.0.1:8000/a.zip,dresses,,,",
        ["chained fsspec URLs ('zip::...') are not allowed in column 'garment_image'"],
    ),
    (
        "http without slashes",
        "r1,http:127.0.0.1:8000/p.jpg,g.jpg,dresses,,,",
        ["malformed http URL in column 'person_image'"],
    ),
    (
        "data URI that is not an image",
        'r1,"data:text/plain;base64,aGk=",g.jpg,dresses,,,',
        ["data URI in column 'person_image' is not a base64 image"],
    ),
    (
        "NUL in an image path",
        "r1,p\x00.jpg,g.jpg,dresses,,,",
        ["control character (newline, NUL, ...) in column 'person_image'"],
    ),
    (
        "quoted newline in an image path",
        'r1,"p\n.jpg",g.jpg,dresses,,,',
        ["control character (newline, NUL, ...) in column 'person_image'"],
    ),
    ("NUL in a prompt", "r1,p.jpg,,,,,a red\x00 coat", ["NUL byte in column 'prompt'"]),
    (
        "quoted newline in a category",
        'r1,p.jpg,g.jpg,"dres\nses",,,',
        ["unknown category 'dres\nses'"],
    ),
    (
        "everything wrong at once",
        "../x,,g.jpg,hats,,robot,",
        [UNSAFE, "missing value in column 'person_image'", "unknown category", "invalid gender"],
    ),
]


@pytest.mark.parametrize(("case", "row", "reasons"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_a_bad_row_gets_its_own_reasons_and_the_others_go_on(
    tmp_path: Path, case: str, row: str, reasons: list[str]
) -> None:
    report = load_manifest(write_csv(tmp_path / "m.csv", GOOD_BEFORE, row, GOOD_AFTER))
    assert [r.id for r in report.valid] == ["good-0", "good-2"], case
    assert [r.row_index for r in report.valid] == [0, 2]
    [bad] = report.invalid
    assert bad.row_index == 1
    assert len(bad.reasons) == len(reasons), bad.reasons
    for got, expected in zip(bad.reasons, reasons, strict=True):
        assert expected in got, (got, expected)
    # The reason quotes a long value shortened, never the whole of it.
    assert all(len(reason) < 300 for reason in bad.reasons)


def test_duplicate_ids_mark_every_copy_and_spare_the_rest(tmp_path: Path) -> None:
    rows = [
        "dup,p.jpg,g.jpg,dresses,,,",
        GOOD_BEFORE,
        " dup ,q.jpg,g.jpg,dresses,,,",  # the same id once stripped
        "Dup,p.jpg,g.jpg,dresses,,,",  # ids are case-sensitive: another id
        "dup,p.jpg,g.jpg,dresses,,,",
    ]
    report = load_manifest(write_csv(tmp_path / "m.csv", *rows))
    assert [r.id for r in report.valid] == ["good-0", "Dup"]
    assert {b.row_index: b.reasons for b in report.invalid} == {
        # row_index counts from 0; the rows a message names count from 1, as people do.
        0: ["duplicate id 'dup' (also on rows 3, 5)"],
        2: ["duplicate id 'dup' (also on rows 1, 5)"],
        4: ["duplicate id 'dup' (also on rows 1, 3)"],
    }


def test_the_id_contract_at_its_edges(tmp_path: Path) -> None:
    ok = ["0", "007", "a.b", "x.", "-x", "A_b-c.d", "z" * 128, "CON", "nul"]
    rows = [f"{row_id},p.jpg,,,,,a coat" for row_id in ok]
    report = load_manifest(write_csv(tmp_path / "m.csv", *rows))
    assert report.invalid == []
    assert [r.id for r in report.valid] == ok  # kept exactly, leading zeros too


# -- encodings and CSV quoting --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "header"),
    [
        (b"\xef\xbb\xbf", HEADER),
        (b"\xef\xbb\xbf", '"id","person_image","garment_image","category"'),
        (b"\xef\xbb\xbf\xef\xbb\xbf", HEADER),  # a tool that added a BOM twice
        (b"\xef\xbb\xbf", " id ,person_image,garment_image,category"),
    ],
)
def test_a_bom_is_not_part_of_the_first_column_name(
    tmp_path: Path, prefix: bytes, header: str
) -> None:
    path = write_csv(tmp_path / "m.csv", "r1,p.jpg,g.jpg,dresses", header=header, prefix=prefix)
    report = load_manifest(path)
    assert report.columns[0] == "id"
    assert "\ufeff" not in "".join(report.columns)
    assert [r.id for r in report.valid] == ["r1"]
    assert report.ignored_columns == []


def test_a_bom_in_a_tsv_and_in_a_parquet_column_name(tmp_path: Path) -> None:
    tsv = tmp_path / "m.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfid\tperson_image\tprompt\r\nr1\tp.jpg\ta coat\r\n")
    assert [r.id for r in load_manifest(str(tsv)).valid] == ["r1"]
    parquet = tmp_path / "m.parquet"
    pl.DataFrame({"\ufeffid": ["r1"], "person_image": ["p.jpg"], "prompt": ["x"]}).write_parquet(
        parquet
    )
    report = load_manifest(str(parquet))
    assert report.columns[0] == "id" and [r.id for r in report.valid] == ["r1"]


def test_quoted_newlines_commas_and_quotes_stay_inside_their_field(tmp_path: Path) -> None:
    rows = [
        'r1,p.jpg,g.jpg,upper_body,"line one\nline two, with a comma and ""quotes""",,',
        'r2,p.jpg,,,,,"a prompt\r\nover two lines"',
        "r3,p.jpg,g.jpg,dresses,plain,,",
    ]
    report = load_manifest(write_csv(tmp_path / "m.csv", *rows))
    assert report.invalid == []
    assert [r.row_index for r in report.valid] == [0, 1, 2]  # rows, not lines
    assert report.valid[0].garment_description == ('line one\nline two, with a comma and "quotes"')
    assert report.valid[1].prompt == "a prompt\r\nover two lines"


# -- manifest-level problems: refused whole, with a clear message ---------------------------

MANIFEST_CASES: list[tuple[str, bytes, str]] = [
    (
        "no person_image column",
        b"id,garment_image\nr1,g.jpg\n",
        "missing required column(s) 'person_image'",
    ),
    ("no id column", b"person_image,prompt\np.jpg,x\n", "missing required column(s) 'id'"),
    (
        "neither garment nor prompt column",
        b"id,person_image\nr1,p.jpg\n",
        "needs a 'garment_image' or a 'prompt' column",
    ),
    (
        "semicolon separated",
        b"id;person_image;prompt\nr1;p.jpg;x\n",
        "found columns: 'id;person_image;prompt'",
    ),
    (
        "header in a different case",
        b"ID,Person_Image,Prompt\nr1,p.jpg,x\n",
        "missing required column(s) 'id', 'person_image'",
    ),
    (
        "column twice",
        b"id,person_image,prompt,prompt\nr1,p.jpg,x,y\n",
        "appear more than once: 'prompt'",
    ),
    ("only a BOM", b"\xef\xbb\xbf", "is empty (no header)"),
    (
        "UTF-16",
        "id,person_image,prompt\nr1,p.jpg,x\n".encode("utf-16"),
        "neither Parquet nor UTF-8 CSV text",
    ),
    (
        "Latin-1 bytes",
        "id,person_image,prompt\nr1,p.jpg,caf\u00e9\n".encode("latin-1"),
        "undecodable byte at offset 35",
    ),
    (
        "a row with too many fields",
        b"id,person_image,prompt\nr1,p.jpg,x\nr2,p.jpg,x,extra,more\n",
        "row 2 has 5 fields, the header 3",  # the second row under the header
    ),
    (
        "a row too long after a quoted newline",
        b'id,person_image,prompt\nr1,p.jpg,"a\nb"\nr2,p.jpg,x,extra\n',
        "row 2 has 4 fields, the header 3",
    ),
    (
        "an unterminated quote",
        b'id,person_image,prompt\nr1,"p.jpg,x\nr2,p.jpg,y\n',
        "is not valid CSV",
    ),
]


@pytest.mark.parametrize(
    ("case", "data", "message"), MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES]
)
def test_a_manifest_level_problem_refuses_the_whole_manifest(
    tmp_path: Path, case: str, data: bytes, message: str
) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(str(path))
    assert message in str(caught.value), (case, str(caught.value))
    assert len(str(caught.value)) < 600


# -- Parquet with columns of the wrong type --------------------------------------------------

BASE = {"person_image": ["p.jpg", "q.jpg"], "garment_image": ["g.jpg"] * 2}


def write_parquet(path: Path, frame: pl.DataFrame) -> str:
    frame.write_parquet(path)
    return str(path)


@pytest.mark.parametrize(
    ("ids", "dtype", "expected"),
    [
        ([1, 2], pl.Int64, ["1", "2"]),
        ([1, 2], pl.UInt8, ["1", "2"]),
        ([7.0, 8.0], pl.Float64, ["7", "8"]),  # pandas' integer ids once a gap made them float
        ([1.5, 2.25], pl.Float32, ["1.5", "2.25"]),
        ([True, False], pl.Boolean, ["true", "false"]),
        ([datetime.date(2026, 1, 2), datetime.date(2026, 1, 3)], pl.Date, None),
        (["r1", "r2"], pl.Categorical, ["r1", "r2"]),
    ],
)
def test_parquet_ids_of_other_types_are_read_as_text(
    tmp_path: Path, ids: list[object], dtype: pl.DataType, expected: list[str] | None
) -> None:
    frame = pl.DataFrame({"id": pl.Series(ids).cast(dtype), **BASE, "category": ["dresses"] * 2})
    report = load_manifest(write_parquet(tmp_path / "m.parquet", frame))
    assert report.invalid == []
    assert [r.id for r in report.valid] == (expected or ["2026-01-02", "2026-01-03"])


def test_parquet_float_ids_with_a_gap_are_missing_not_nan(tmp_path: Path) -> None:
    """pandas writes [1, None, 3] as float64 [1.0, NaN, 3.0]."""
    frame = pl.DataFrame(
        {
            "id": [1.0, float("nan"), 3.0],
            "person_image": ["p.jpg"] * 3,
            "prompt": ["x"] * 3,
        }
    )
    report = load_manifest(write_parquet(tmp_path / "m.parquet", frame))
    assert [r.id for r in report.valid] == ["1", "3"]
    [bad] = report.invalid
    assert (bad.row_index, bad.row_id, bad.reasons) == (1, None, ["missing value in column 'id'"])


def test_parquet_numeric_category_and_all_null_person_are_row_errors(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            "person_image": pl.Series([None, "p.jpg", "p.jpg"], dtype=pl.String),
            "garment_image": ["g.jpg"] * 3,
            "category": pl.Series([3, 1, None], dtype=pl.Int32),
            "gender": pl.Series([None, None, None], dtype=pl.Null),
            "prompt": pl.Series([None, None, None], dtype=pl.Null),
        }
    )
    report = load_manifest(write_parquet(tmp_path / "m.parquet", frame))
    assert report.valid == []
    assert {b.row_id: b.reasons for b in report.invalid} == {
        "a": [
            "missing value in column 'person_image'",
            "unknown category '3' (expected one of: upper_body, lower_body, dresses)",
        ],
        "b": ["unknown category '1' (expected one of: upper_body, lower_body, dresses)"],
        "c": ["missing value in column 'category' (required for rows with a garment_image)"],
    }


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("person_image", [b"\xff\xd8\xff", b"p.jpg"], "column 'person_image' (Binary) cannot"),
        ("id", [["a"], ["b"]], "column 'id' has type List(String), which is not text"),
        ("category", [{"c": "dresses"}] * 2, "column 'category' has type Struct"),
    ],
)
def test_parquet_known_columns_that_cannot_be_text_refuse_the_manifest(
    tmp_path: Path, column: str, values: list[object], message: str
) -> None:
    data = {"id": ["a", "b"], **BASE, "category": ["dresses"] * 2}
    data[column] = values
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_parquet(tmp_path / "m.parquet", pl.DataFrame(data)))
    assert message in str(caught.value)


def test_parquet_missing_columns_refuse_the_manifest(tmp_path: Path) -> None:
    frame = pl.DataFrame({"id": ["a"], "garment_image": ["g.jpg"]})
    with pytest.raises(ManifestError, match=r"missing required column\(s\) 'person_image'"):
        load_manifest(write_parquet(tmp_path / "m.parquet", frame))


# -- through the flow: recorded in the lake, or refused before any provider call -------------

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "sample" / "images"


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorServer]:
    from emulator.server import EmulatorConfig, EmulatorServer
    from flows.cli import emulator_env

    with EmulatorServer.start(EmulatorConfig()) as server:
        for name, value in emulator_env(server.base_url).items():
            monkeypatch.setenv(name, value)
        yield server


def provider_calls(emulator: EmulatorServer) -> int:
    return sum(p.requests for p in emulator.control.stats().by_provider.values())


@pytest.mark.e2e
async def test_bad_rows_are_recorded_in_the_lake_and_good_rows_run(
    prefect_server: None, emulator: EmulatorServer, tmp_path: Path
) -> None:
    from flows.batch import BatchParams, tryon_batch

    person, garment = SAMPLE_IMAGES / "person_ana.jpg", SAMPLE_IMAGES / "garment_red_tee.jpg"
    rows = [
        f"good-a,{person},{garment},upper_body,,,",
        f"../../x,{person},{garment},upper_body,,,",
        f"dup,{person},{garment},upper_body,one,,",
        f"dup,{person},{garment},upper_body,two,,",
        f'"r\n1",{person},{garment},upper_body,,,',
        f"r-nul,{person}\x00,{garment},upper_body,,,",
        f"r-cat,{person},{garment},hats,,,",
        f"good-b,{person},,,,,a red coat",
    ]
    manifest = write_csv(tmp_path / "m.csv", *rows, prefix=b"\xef\xbb\xbf")
    lake = tmp_path / "lake"
    summary = await tryon_batch(BatchParams(manifest=manifest, lake=str(lake)))
    assert summary.counts == {"succeeded": 2, "invalid": 6}
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect().sort("row_index")
    assert meta["status"].to_list() == ["succeeded"] + ["invalid"] * 6 + ["succeeded"]
    messages = dict(zip(meta["row_index"], meta["error_message"], strict=True))
    assert UNSAFE in messages[1]
    assert messages[2] == "duplicate id 'dup' (also on rows 4)"  # row numbers count from 1
    assert messages[3] == "duplicate id 'dup' (also on rows 3)"
    assert UNSAFE in messages[4]
    assert "control character" in messages[5] and "'person_image'" in messages[5]
    assert "unknown category 'hats'" in messages[6]
    assert provider_calls(emulator) == 2  # only the good rows reached the provider


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("id,garment_image,category", "missing required column(s) 'person_image'"),
        ("ID,Person_Image,Prompt", "missing required column(s) 'id', 'person_image'"),
    ],
)
async def test_missing_columns_stop_the_run_before_any_provider_call(
    prefect_server: None, emulator: EmulatorServer, tmp_path: Path, header: str, message: str
) -> None:
    from flows.batch import BatchParams, RunNotStarted, tryon_batch

    manifest = write_csv(tmp_path / "m.csv", "r1,x.jpg,upper_body", header=header)
    with pytest.raises(RunNotStarted) as caught:
        await tryon_batch(BatchParams(manifest=manifest, lake=str(tmp_path / "lake")))
    assert message in str(caught.value)
    assert provider_calls(emulator) == 0
    assert not (tmp_path / "lake" / "metadata").exists()
