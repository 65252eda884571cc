"""The screen that passes plainly fine rows in bulk changes nothing: every row of a manifest
holding every kind of value gets the same verdict and the same reasons with it as without it
(``screen=False`` runs every row through the per-check expressions, the reference)."""

from __future__ import annotations

import random

import polars as pl
import pytest

import schemas.manifest_checks
from schemas.manifest import KNOWN_COLUMNS
from schemas.manifest_checks import validate_manifest
from schemas.manifest_rows import ValidationReport

IDS = [
    "",
    "   ",
    " pad ",
    "../x",
    ".hidden",
    "dup",
    "DUP",
    "dup ",
    "x" * 128,
    "x" * 129,
    "é",
    "a\tb",
    "\u00a0nbsp",
    "nbsp\u00a0",
    "a\x1f",
    None,
]
REFS = [
    "/abs/p.jpg",
    "rel/p.jpg",
    "p one.jpg",
    " /pad.jpg ",
    "~/p.jpg",
    "./p.jpg",
    "../p.jpg",
    "a//p.jpg",
    "https://h/p.jpg?x=a:b",
    "HTTPS://[::1]:8443/p.jpg",
    "https://h/p.jpg ",
    "https://",
    "http:/x.jpg",
    "http:h/x.jpg",
    "httpſ://h/p.jpg",
    "s3://b/k.jpg",
    "S3A://b/k.jpg",
    "s3://b/k:1.jpg",
    "s3:b/k.jpg",
    "file:///p.jpg",
    "file:/p.jpg",
    "FILE://rel/p.jpg",
    "memory://b/p.jpg",
    "data:image/png;base64,AAAA",
    "DATA:IMAGE/PNG;BASE64,AAAA",
    "data:image/png;base64,AA AA",
    "data:image/png;base64,",
    "data:image/svg+xml;base64,AAAA\n",
    "data:text/plain;base64,aGk=",
    "ftp://h/p.jpg",
    "gs://b/p.jpg",
    "simplecache::https://h/p.jpg",
    "/data/a::http://127.0.0.1/x",
    "c:\\img\\p.jpg",
    "/dir/a:b.jpg",
    "p\n.jpg",
    "p\x00.jpg",
    "p.jpg\x1f",
    "\x1cp.jpg",
    "/p.jpg\u00a0",
    "\u2003/p.jpg",
    "",
    "  ",
    None,
]
CATEGORIES = [
    "upper_body",
    "UPPER_BODY",
    "Lower_Body",
    " dresses ",
    "shoes",
    "dreſſes",
    "upper_body\x00",
    "",
    None,
]
GENDERS = ["woman", "F", "m", " male ", "MAN", "robot", "", "K", None]
TEXTS = ["blue", " blue ", "", "  ", "a\x00b", "line\nbreak\r\n", "\u3000x\u3000", "x\x1f", None]
PROVIDERS = [None, "changeclothes", "hidream ", "acme", "", "x\x00", "HIDREAM"]
CHOICES = {
    "id": IDS,
    "person_image": REFS,
    "garment_image": REFS,
    "category": CATEGORIES,
    "lower_garment_image": [None] * 6 + REFS,
    "garment_description": TEXTS,
    "prompt": [None] * 3 + TEXTS,
    "gender": GENDERS,
    "provider": PROVIDERS,
}


def tricky_manifest(rows: int, seed: int, columns: tuple[str, ...] = KNOWN_COLUMNS) -> pl.DataFrame:
    """Mostly plainly fine rows (as a real manifest is), each with a few columns drawn from
    every kind of value, so each kind meets the others."""
    rng = random.Random(seed)
    data: dict[str, list[str | None]] = {c: [] for c in columns}
    for i in range(rows):
        row: dict[str, str | None] = {
            "id": f"r{i}",
            "person_image": "/img/p.jpg",
            "garment_image": "https://cdn.example/g.jpg",
            "category": "upper_body",
            "lower_garment_image": None,
            "garment_description": "cotton",
            "prompt": None,
            "gender": "woman",
            "provider": None,
        }
        for column in rng.sample(list(CHOICES), rng.choice([0, 0, 1, 2, 3])):
            row[column] = rng.choice(CHOICES[column])
        for column in columns:
            data[column].append(row[column])
    return pl.DataFrame(data, schema=dict.fromkeys(columns, pl.String))


def verdicts(report: ValidationReport) -> tuple[list[tuple[object, ...]], list[object]]:
    valid = [tuple(row.model_dump().values()) for row in report.valid]
    return valid, list(report.invalid)


@pytest.fixture(params=["distinct", "each"])
def matching(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Image columns matched a distinct value at a time, or value by value: both ways."""
    share = 1.0 if request.param == "distinct" else 0.0
    monkeypatch.setattr(schemas.manifest_checks, "_DISTINCT_SHARE_MAX", share)
    return str(request.param)


@pytest.mark.parametrize(
    ("base_uri", "known_providers"),
    [
        (None, None),
        ("/data/run", ["changeclothes", "hidream"]),
        ("s3://bucket/dir", None),
        ("gs://bucket/dir", ["hidream"]),  # relative paths are refused: no screening at all
    ],
)
def test_the_screen_changes_no_verdict_and_no_reason(
    base_uri: str | None, known_providers: list[str] | None, matching: str
) -> None:
    frame = tricky_manifest(3000, seed=15)
    screened = validate_manifest(frame, base_uri=base_uri, known_providers=known_providers)
    reference = validate_manifest(
        frame, base_uri=base_uri, known_providers=known_providers, screen=False
    )
    assert verdicts(screened) == verdicts(reference)
    assert screened.n_rows == reference.n_rows == 3000
    # Not vacuous: both kinds of rows are there in numbers, reasons of many kinds too.
    assert 1000 < len(screened.valid) < 2900
    kinds = {
        reason.split(" '")[0].split(" (")[0] for bad in screened.invalid for reason in bad.reasons
    }
    assert len(kinds) >= 10, kinds


@pytest.mark.parametrize(
    "columns",
    [
        ("id", "person_image", "prompt"),  # no garment column: prompt rows only
        ("id", "person_image", "garment_image"),  # no category column
        ("id", "person_image", "garment_image", "category", "gender"),
    ],
)
def test_the_screen_agrees_when_columns_are_absent(columns: tuple[str, ...], matching: str) -> None:
    frame = tricky_manifest(1000, seed=3, columns=columns)
    screened = validate_manifest(frame, base_uri="/data/run")
    assert verdicts(screened) == verdicts(
        validate_manifest(frame, base_uri="/data/run", screen=False)
    )


def test_repeated_ids_are_found_across_the_screen() -> None:
    """A plainly fine 'a' and an 'a' that needs stripping are the same id: both rows fail."""
    frame = pl.DataFrame(
        {
            "id": ["a", "b", " a", "c", "c", "d\u00a0", "d"],
            "person_image": ["/p.jpg"] * 7,
            "prompt": ["x"] * 7,
        }
    )
    report = validate_manifest(frame)
    assert [bad.row_index for bad in report.invalid] == [0, 2, 3, 4, 5, 6]
    assert report.invalid[0].reasons == ["duplicate id 'a' (also on rows 3)"]
    assert [row.id for row in report.valid] == ["b"]


def test_a_long_run_of_one_id_names_the_first_rows_and_counts_the_rest() -> None:
    frame = pl.DataFrame(
        {"id": ["same"] * 25, "person_image": ["/p.jpg"] * 25, "prompt": ["x"] * 25}
    )
    report = validate_manifest(frame)
    assert len(report.invalid) == 25
    assert report.invalid[0].reasons == [
        "duplicate id 'same' (also on rows 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 14 more)"
    ]
    assert report.invalid[5].reasons == [
        "duplicate id 'same' (also on rows 1, 2, 3, 4, 5, 7, 8, 9, 10, 11 and 14 more)"
    ]
    assert report.invalid[24].reasons == [
        "duplicate id 'same' (also on rows 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 14 more)"
    ]
