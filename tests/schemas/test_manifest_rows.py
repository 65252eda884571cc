"""ManifestRows and InvalidRows: rows held as frames, row objects built only when asked for."""

from __future__ import annotations

import polars as pl
import pytest

from schemas.manifest import InvalidRow, ManifestRow
from schemas.manifest_checks import validate_manifest
from schemas.manifest_rows import InvalidRows, ManifestRows
from tasks.execute import chunks_of


def manifest(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"r{i}" if i % 10 else f" r{i} " for i in range(n)],  # some need stripping
            "person_image": [f"people/{i}.jpg" for i in range(n)],
            "garment_image": [None if i % 7 == 0 else "g.jpg" for i in range(n)],
            "category": [None if i % 7 == 0 else "Dresses" for i in range(n)],
            "prompt": ["a coat" if i % 7 == 0 else None for i in range(n)],
            "gender": ["F" if i % 2 else None for i in range(n)],
        }
    ).with_columns(
        # every 13th row is invalid, so positions and row indices differ
        pl.when(pl.int_range(pl.len()) % 13 == 5)
        .then(None)
        .otherwise("person_image")
        .alias("person_image")
    )


@pytest.fixture
def rows() -> ManifestRows:
    return validate_manifest(manifest(100), base_uri="/data").valid


def test_rows_are_built_cleaned_normalised_and_resolved(rows: ManifestRows) -> None:
    assert len(rows) == 100 - 8
    first = rows[0]
    assert first == ManifestRow(
        row_index=0,
        id="r0",
        person_image="/data/people/0.jpg",
        prompt="a coat",
        gender=None,
    )
    assert rows[1].category == "dresses" and rows[1].gender == "woman"
    assert rows[1].garment_image == "/data/g.jpg"
    assert rows[-1].row_index == 99
    assert 5 not in [r.row_index for r in rows]
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_slices_take_and_frames_agree_with_the_rows(rows: ManifestRows) -> None:
    built = list(rows)
    assert list(rows[10:20]) == built[10:20]
    assert list(rows[::3]) == built[::3]
    assert rows[10:20] == built[10:20]  # a sequence of rows equals the same rows in a list
    assert rows != built[:-1]
    picked = rows.take(pl.Series([0, 5, 7], dtype=pl.UInt32))
    assert list(picked) == [built[0], built[5], built[7]]
    frame = rows.frame(["id", "person_image", "gender"])
    assert frame.rows() == [(r.row_index, r.id, r.person_image, r.gender) for r in built]
    assert rows.row_indices().to_list() == [r.row_index for r in built]


def test_rows_built_elsewhere_round_trip() -> None:
    built = list(validate_manifest(manifest(30)).valid)
    again = ManifestRows.of(built)
    assert list(again) == built and again == built


def test_chunks_hold_no_row_objects_until_a_chunk_starts(
    rows: ManifestRows, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    original = ManifestRows._build

    def counting(self: ManifestRows, positions: pl.Series) -> list[ManifestRow]:
        built.append(positions.len())
        return original(self, positions)

    monkeypatch.setattr(ManifestRows, "_build", counting)
    chunks = chunks_of(rows, 25)
    assert [len(c) for c in chunks] == [25, 25, 25, 17]
    assert built == []  # slicing built nothing
    first = list(chunks[0])
    assert built == [25] and [r.row_index for r in first] == [r.row_index for r in rows[:25]]


def test_invalid_rows_in_bulk_read_as_the_row_objects_do() -> None:
    given = [
        InvalidRow(4, None, ["missing value in column 'id'"]),
        InvalidRow(0, "x" * 200, ["a", "b"]),
        InvalidRow(9, "it's", ["c"]),
    ]
    rows = InvalidRows.of(given)
    assert [r.row_index for r in rows] == [0, 4, 9]  # in row order
    assert rows.lines() == [r.line() for r in rows]
    assert rows.lines()[0].startswith("row 1 (id '" + "x" * 77 + "...'): a; b")
    assert rows.lines()[1] == "row 5 (no id): missing value in column 'id'"
    assert rows[1] == given[0] and rows[-1] == given[2] and rows[1:] == [given[0], given[2]]
    assert rows == sorted(given, key=lambda r: r.row_index) and rows != given


def test_problems_found_later_join_the_report_in_row_order() -> None:
    report = validate_manifest(manifest(30))
    assert [bad.row_index for bad in report.invalid] == [5, 18]
    more = report.with_problems({18: ["later"], 2: ["found", "twice"], 29: ["last"]})
    assert [bad.row_index for bad in more.invalid] == [2, 5, 18, 29]
    assert more.invalid[0] == InvalidRow(2, "r2", ["found", "twice"])
    assert more.invalid[2].reasons == [*report.invalid[1].reasons, "later"]
    assert len(more.valid) == len(report.valid) - 2
    assert [r.row_index for r in more.valid] == [
        r.row_index for r in report.valid if r.row_index not in (2, 29)
    ]
    assert report.with_problems({}) is report
