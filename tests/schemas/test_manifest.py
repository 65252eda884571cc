"""The manifest contract: column rules, per-row reasons, id safety and reference resolution."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from schemas.manifest import (
    CATEGORIES,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    InvalidRow,
    ManifestError,
    ManifestRow,
    is_safe_id,
    resolve_uri,
    uri_scheme,
)
from schemas.manifest_checks import validate_manifest
from schemas.manifest_rows import ValidationReport
from schemas.uris import ImageRoute, Refusal, classify_image_ref, image_ref_refusal

ALLOWED = "(allowed: local path, file://, http(s)://, data:, s3://)"


def frame(*rows: dict[str, Any], columns: list[str] | None = None) -> pl.DataFrame:
    """A manifest frame of text columns; a key missing from a row is null."""
    names = columns or list(dict.fromkeys(k for row in rows for k in row))
    data = {name: [row.get(name) for row in rows] for name in names}
    return pl.DataFrame(data, schema=dict.fromkeys(names, pl.String))


def good(**overrides: str | None) -> dict[str, str | None]:
    row: dict[str, str | None] = {
        "id": "r1",
        "person_image": "/img/p.jpg",
        "garment_image": "/img/g.jpg",
        "category": "upper_body",
    }
    row.update(overrides)
    return row


def only_invalid(report: ValidationReport) -> InvalidRow:
    assert not report.valid
    assert len(report.invalid) == 1
    return report.invalid[0]


# --- the contract's constants -------------------------------------------------------------


def test_constants() -> None:
    assert CATEGORIES == ("upper_body", "lower_body", "dresses")
    assert REQUIRED_COLUMNS == ("id", "person_image")
    assert "garment_image" in OPTIONAL_COLUMNS
    assert "prompt" in OPTIONAL_COLUMNS
    assert not set(REQUIRED_COLUMNS) & set(OPTIONAL_COLUMNS)


# --- a good row ---------------------------------------------------------------------------


def test_good_row_is_valid_with_all_fields() -> None:
    row = good(
        lower_garment_image="/img/l.jpg",
        garment_description="blue shirt",
        gender="Female",
        provider="fashn",
    )
    report = validate_manifest(frame(row), known_providers={"fashn"})
    assert report.invalid == []
    assert report.n_rows == 1
    assert report.valid == [
        ManifestRow(
            row_index=0,
            id="r1",
            person_image="/img/p.jpg",
            garment_image="/img/g.jpg",
            category="upper_body",
            lower_garment_image="/img/l.jpg",
            garment_description="blue shirt",
            gender="woman",
            provider="fashn",
        )
    ]
    assert not report.valid[0].is_prompt_row


def test_prompt_only_row_is_valid_without_category() -> None:
    df = frame({"id": "p1", "person_image": "/p.jpg", "prompt": "a red summer dress"})
    report = validate_manifest(df)
    assert report.invalid == []
    (row,) = report.valid
    assert row.prompt == "a red summer dress"
    assert row.garment_image is None
    assert row.category is None
    assert row.is_prompt_row


def test_garment_row_may_also_carry_a_prompt() -> None:
    report = validate_manifest(frame(good(prompt="tuck the shirt in")))
    assert report.invalid == []
    assert report.valid[0].prompt == "tuck the shirt in"


def test_valid_rows_keep_their_row_index_around_invalid_ones() -> None:
    df = frame(good(id="a"), good(id="b", person_image=None), good(id="c"))
    report = validate_manifest(df)
    assert [(r.row_index, r.id) for r in report.valid] == [(0, "a"), (2, "c")]
    assert [(r.row_index, r.row_id) for r in report.invalid] == [(1, "b")]


def test_values_are_stripped_and_category_case_is_ignored() -> None:
    df = frame(good(id="  r1 ", person_image=" /p.jpg\t", category=" Dresses "))
    (row,) = validate_manifest(df).valid
    assert (row.id, row.person_image, row.category) == ("r1", "/p.jpg", "dresses")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("woman", "woman"),
        ("WOMAN", "woman"),
        ("female", "woman"),
        ("F", "woman"),
        ("man", "man"),
        ("Male", "man"),
        ("m", "man"),
        (None, None),
        ("  ", None),
    ],
)
def test_gender_is_normalised(given: str | None, expected: str | None) -> None:
    (row,) = validate_manifest(frame(good(gender=given))).valid
    assert row.gender == expected


def test_any_provider_is_accepted_without_a_known_list() -> None:
    (row,) = validate_manifest(frame(good(provider="whatever"))).valid
    assert row.provider == "whatever"


def test_non_string_columns_are_read_as_text() -> None:
    df = pl.DataFrame({"id": [7, 8], "person_image": ["/p.jpg", "/q.jpg"], "prompt": ["x", "y"]})
    report = validate_manifest(df)
    assert [r.id for r in report.valid] == ["7", "8"]


def test_header_only_manifest_has_no_rows() -> None:
    df = frame(columns=["id", "person_image", "garment_image", "category"])
    report = validate_manifest(df)
    assert (report.n_rows, report.valid, report.invalid) == (0, [], [])


def test_unknown_columns_are_ignored_and_reported() -> None:
    df = frame(good(garment_img="typo"))
    report = validate_manifest(df)
    assert report.invalid == []
    assert report.ignored_columns == ["garment_img"]
    assert "garment_img" in report.summary()


# --- column names -------------------------------------------------------------------------


def test_bom_and_whitespace_in_column_names_are_tolerated() -> None:
    df = pl.DataFrame(
        {
            "\ufeffid": ["r1"],
            " person_image ": ["/p.jpg"],
            "garment_image\t": ["/g.jpg"],
            "category": ["dresses"],
        }
    )
    report = validate_manifest(df)
    assert report.columns == ["id", "person_image", "garment_image", "category"]
    assert [r.id for r in report.valid] == ["r1"]


def test_column_names_are_case_sensitive() -> None:
    df = pl.DataFrame({"ID": ["r1"], "person_image": ["/p.jpg"], "prompt": ["x"]})
    with pytest.raises(ManifestError, match="'id'"):
        validate_manifest(df)


def test_missing_required_column_names_it_and_the_columns_found() -> None:
    df = frame({"id": "r1", "garment_image": "/g.jpg", "category": "dresses"})
    with pytest.raises(ManifestError) as info:
        validate_manifest(df)
    message = str(info.value)
    assert "missing required column(s) 'person_image'" in message
    assert "found columns: 'id', 'garment_image', 'category'" in message


def test_all_column_problems_are_reported_together() -> None:
    df = frame({"person": "/p.jpg"})
    with pytest.raises(ManifestError) as info:
        validate_manifest(df)
    message = str(info.value)
    assert "'id', 'person_image'" in message
    assert "needs a 'garment_image' or a 'prompt' column" in message


def test_garment_or_prompt_column_is_required() -> None:
    df = frame({"id": "r1", "person_image": "/p.jpg", "category": "dresses"})
    with pytest.raises(ManifestError, match="needs a 'garment_image' or a 'prompt' column"):
        validate_manifest(df)


def test_no_columns_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="no header"):
        validate_manifest(pl.DataFrame())


@pytest.mark.parametrize(
    "columns",
    [
        ["id", "person_image", "garment_image", "garment_image_duplicated_0"],  # Polars' rename
        ["id", "person_image", "garment_image", " garment_image"],  # equal once stripped
    ],
)
def test_repeated_known_column_is_a_manifest_error(columns: list[str]) -> None:
    df = pl.DataFrame({c: ["x"] for c in columns})
    with pytest.raises(ManifestError, match="appear more than once: 'garment_image'"):
        validate_manifest(df)


def test_nested_known_column_is_a_manifest_error() -> None:
    df = pl.DataFrame({"id": [["a"]], "person_image": ["/p.jpg"], "prompt": ["x"]})
    with pytest.raises(ManifestError, match="'id'"):
        validate_manifest(df)


# --- one reason at a time -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"id": None}, "missing value in column 'id'"),
        ({"id": "   "}, "missing value in column 'id'"),
        ({"person_image": None}, "missing value in column 'person_image'"),
        ({"person_image": " \t "}, "missing value in column 'person_image'"),
        (
            {"category": "shoes"},
            "unknown category 'shoes' (expected one of: upper_body, lower_body, dresses)",
        ),
        (
            {"category": None},
            "missing value in column 'category' (required for rows with a garment_image)",
        ),
        (
            {"id": "../x"},
            "id '../x' is unsafe for a path (allowed: ASCII letters, digits, '.', '_', '-';"
            " 1-128 chars; not starting with '.')",
        ),
        (
            {"garment_image": "ftpx://host/g.jpg"},
            f"URI scheme 'ftpx' is not allowed in column 'garment_image' {ALLOWED}",
        ),
        (
            {"person_image": "FTPX://host/p.jpg"},
            f"URI scheme 'ftpx' is not allowed in column 'person_image' {ALLOWED}",
        ),
        (
            {"lower_garment_image": "nope://l.jpg"},
            f"URI scheme 'nope' is not allowed in column 'lower_garment_image' {ALLOWED}",
        ),
        (
            {"person_image": "simplecache::s3://b/p.jpg"},
            "chained fsspec URLs ('simplecache::...') are not allowed in column 'person_image' "
            "(allowed: local path, file://, http(s)://, data:, s3://; one filesystem per image)",
        ),
        (
            {"person_image": "http:127.0.0.1/p.jpg"},
            "malformed http URL in column 'person_image' (expected http://host/...)",
        ),
        (
            {"person_image": "data:text/plain;base64,aGk="},
            "data URI in column 'person_image' is not a base64 image"
            " (expected data:image/<type>;base64,...)",
        ),
        ({"gender": "x"}, "invalid gender 'x' (expected one of: woman, man, female, male, f, m)"),
        ({"garment_image": None, "category": None}, "garment_image or prompt is required"),
        ({"garment_image": "  ", "prompt": " "}, "garment_image or prompt is required"),
        (
            {"garment_image": None, "category": None, "prompt": "x", "lower_garment_image": "/l"},
            "lower_garment_image is set but garment_image is missing",
        ),
        ({"provider": "foo"}, "unknown provider 'foo' (expected one of: fashn, kling)"),
    ],
)
def test_each_reason(overrides: dict[str, str | None], reason: str) -> None:
    df = frame(
        good(**overrides), columns=[*good(), "lower_garment_image", "prompt", "gender", "provider"]
    )
    bad = only_invalid(validate_manifest(df, known_providers=["kling", "fashn"]))
    assert bad.reasons == [reason]
    assert bad.message == reason
    assert bad.row_index == 0


def test_garment_row_without_a_category_column() -> None:
    df = frame({"id": "r1", "person_image": "/p.jpg", "garment_image": "/g.jpg"})
    bad = only_invalid(validate_manifest(df))
    assert bad.reasons == ["no 'category' column (required for rows with a garment_image)"]


def test_prompt_rows_are_fine_without_a_category_column() -> None:
    df = frame(
        {"id": "a", "person_image": "/p.jpg", "prompt": "x"},
        {"id": "b", "person_image": "/p.jpg", "garment_image": "/g.jpg"},
    )
    report = validate_manifest(df)
    assert [r.id for r in report.valid] == ["a"]
    assert [r.row_id for r in report.invalid] == ["b"]


def test_unknown_category_quotes_the_value_as_written() -> None:
    bad = only_invalid(validate_manifest(frame(good(category="Shoes"))))
    assert bad.reasons[0].startswith("unknown category 'Shoes'")


def test_long_values_are_shortened_in_messages() -> None:
    bad = only_invalid(validate_manifest(frame(good(category="x" * 500))))
    assert "'" + "x" * 77 + "...'" in bad.message
    assert len(bad.message) < 200


def test_well_formed_data_uri_is_accepted_and_not_resolved() -> None:
    uri = "data:image/png;base64,iVBORw0KGgo="
    (row,) = validate_manifest(frame(good(person_image=uri)), base_uri="/base").valid
    assert row.person_image == uri


# --- all reasons on one row ---------------------------------------------------------------


def test_every_reason_on_one_row_is_reported() -> None:
    df = frame(
        {
            "id": ".hidden",
            "person_image": "ftpx://p.jpg",
            "garment_image": "bogus://g.jpg",
            "category": "shoes",
            "lower_garment_image": "data:nope",
            "gender": "robot",
            "provider": "acme",
        },
        {
            "id": ".hidden",
            "person_image": "/p.jpg",
            "garment_image": "/g.jpg",
            "category": "dresses",
        },
    )
    report = validate_manifest(df, known_providers=["fashn"])
    assert report.valid == []
    first = report.invalid[0]
    assert first.row_id == ".hidden"
    assert first.reasons == [
        "id '.hidden' is unsafe for a path (allowed: ASCII letters, digits, '.', '_', '-';"
        " 1-128 chars; not starting with '.')",
        "duplicate id '.hidden' (also on rows 2)",  # rows as people count them, from 1
        f"URI scheme 'ftpx' is not allowed in column 'person_image' {ALLOWED}",
        f"URI scheme 'bogus' is not allowed in column 'garment_image' {ALLOWED}",
        "data URI in column 'lower_garment_image' is not a base64 image"
        " (expected data:image/<type>;base64,...)",
        "unknown category 'shoes' (expected one of: upper_body, lower_body, dresses)",
        "invalid gender 'robot' (expected one of: woman, man, female, male, f, m)",
        "unknown provider 'acme' (expected one of: fashn)",
    ]
    assert first.message == "; ".join(first.reasons)


def test_missing_everything_reports_every_missing_value() -> None:
    df = frame({"id": None, "person_image": None, "garment_image": None, "prompt": None})
    bad = only_invalid(validate_manifest(df))
    assert bad.row_id is None
    assert bad.reasons == [
        "missing value in column 'id'",
        "missing value in column 'person_image'",
        "garment_image or prompt is required",
    ]


# --- ids ----------------------------------------------------------------------------------


def test_duplicate_ids_mark_every_row_sharing_them() -> None:
    df = frame(
        good(id="r7"),
        good(id="ok"),
        good(id="r7"),
        good(id="r7", person_image=None),
    )
    report = validate_manifest(df)
    assert [r.id for r in report.valid] == ["ok"]
    by_row = {bad.row_index: bad for bad in report.invalid}
    assert sorted(by_row) == [0, 2, 3]
    # Row numbers in messages count from 1 (row_index + 1), as everywhere people read them.
    assert by_row[0].reasons == ["duplicate id 'r7' (also on rows 3, 4)"]
    assert by_row[2].reasons == ["duplicate id 'r7' (also on rows 1, 4)"]
    assert by_row[3].reasons == [
        "duplicate id 'r7' (also on rows 1, 3)",
        "missing value in column 'person_image'",
    ]


def test_ids_are_compared_after_stripping() -> None:
    report = validate_manifest(frame(good(id="a"), good(id=" a ")))
    assert len(report.invalid) == 2


def test_missing_ids_are_not_duplicates_of_each_other() -> None:
    report = validate_manifest(frame(good(id=None), good(id=None)))
    assert [bad.reasons for bad in report.invalid] == [["missing value in column 'id'"]] * 2


@pytest.mark.parametrize(
    "row_id", ["../../x", "a/b", ".hidden", "..", "a\\b", "a b", "é", "x" * 129, "r1\n"]
)
def test_unsafe_ids(row_id: str) -> None:
    assert not is_safe_id(row_id)


@pytest.mark.parametrize("row_id", ["../../x", "a/b", ".hidden", "a b", "x" * 129])
def test_unsafe_ids_make_rows_invalid(row_id: str) -> None:
    bad = only_invalid(validate_manifest(frame(good(id=row_id))))
    assert len(bad.reasons) == 1
    assert "is unsafe for a path" in bad.reasons[0]


@pytest.mark.parametrize("row_id", ["r1", "A-b_c.d", "0", "-x", "x.", "x" * 128])
def test_safe_ids(row_id: str) -> None:
    assert is_safe_id(row_id)
    assert validate_manifest(frame(good(id=row_id))).valid[0].id == row_id


def test_empty_id_is_missing_not_unsafe() -> None:
    assert not is_safe_id("")
    bad = only_invalid(validate_manifest(frame(good(id=""))))
    assert bad.reasons == ["missing value in column 'id'"]


def test_manifest_row_rejects_an_unsafe_id_itself() -> None:
    with pytest.raises(ValidationError, match="unsafe for a path"):
        ManifestRow(row_index=0, id="../x", person_image="/p.jpg", prompt="x")


def test_manifest_row_normalises_gender_and_is_frozen() -> None:
    row = ManifestRow(row_index=0, id="a", person_image="/p.jpg", prompt="x", gender="F")
    assert row.gender == "woman"
    with pytest.raises(ValidationError):
        row.id = "b"  # type: ignore[misc]


# --- URIs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "scheme"),
    [
        ("/abs/p.jpg", ""),
        ("rel/p.jpg", ""),
        ("p.jpg", ""),
        ("~/p.jpg", ""),
        ("data:image/png;base64,AAAA", "data"),
        ("DATA:image/png;base64,AAAA", "data"),
        ("S3://bucket/p.jpg", "s3"),
        ("https://host/p.jpg", "https"),
        ("file:///tmp/p.jpg", "file"),
        ("gs://b/p.jpg", "gs"),
        ("simplecache::s3://b/p.jpg", "simplecache"),
        ("git+ssh://h/p", "git+ssh"),
    ],
)
def test_uri_scheme(uri: str, scheme: str) -> None:
    assert uri_scheme(uri) == scheme


@pytest.mark.parametrize(
    ("ref", "route", "target"),
    [
        ("/abs/p.jpg", "local", "/abs/p.jpg"),
        ("rel/p one.jpg", "local", "rel/p one.jpg"),
        ("~/p.jpg", "local", "~/p.jpg"),
        ("/data/a:b.jpg", "local", "/data/a:b.jpg"),  # a ':' after the first '/' is no scheme
        ("file:///tmp/p.jpg", "local", "/tmp/p.jpg"),
        ("FILE:///tmp/p.jpg", "local", "/tmp/p.jpg"),
        ("https://host/p.jpg?sig=1", "http", "https://host/p.jpg?sig=1"),
        ("HTTP://host/p.jpg", "http", "HTTP://host/p.jpg"),
        ("http://[2001:db8::1]/p.jpg", "http", "http://[2001:db8::1]/p.jpg"),  # '::' in a host
        ("data:image/png;base64,AAAA", "data", "data:image/png;base64,AAAA"),
        ("s3://bucket/k/p.jpg", "s3", "bucket/k/p.jpg"),
        ("S3A://bucket/p.jpg", "s3", "bucket/p.jpg"),
        ("memory://b/p.jpg", "memory", "b/p.jpg"),
    ],
)
def test_allowed_image_refs_get_one_route(ref: str, route: str, target: str) -> None:
    verdict = classify_image_ref(ref)
    assert isinstance(verdict, ImageRoute)
    assert (verdict.route, verdict.target) == (route, target)
    assert image_ref_refusal(ref) is None
    assert validate_manifest(frame(good(person_image=ref))).valid[0].person_image == ref


# Every one of these reaches a network (or a parser that does) fsspec-side, past the guard.
REFUSED_REFS: list[tuple[str, str]] = [
    ("ftp://127.0.0.1:2121/p.jpg", "URI scheme 'ftp' is not allowed"),
    ("FTP://h/p.jpg", "URI scheme 'ftp' is not allowed"),
    ("sftp://h/p.jpg", "URI scheme 'sftp' is not allowed"),
    ("ssh://h/p.jpg", "URI scheme 'ssh' is not allowed"),
    ("gs://b/p.jpg", "URI scheme 'gs' is not allowed"),
    ("gcs://b/p.jpg", "URI scheme 'gcs' is not allowed"),
    ("az://c/p.jpg", "URI scheme 'az' is not allowed"),
    ("abfs://c/p.jpg", "URI scheme 'abfs' is not allowed"),
    ("hdfs://h/p.jpg", "URI scheme 'hdfs' is not allowed"),
    ("webhdfs://127.0.0.1:9870/p.jpg", "URI scheme 'webhdfs' is not allowed"),
    ("github://org:repo@main/p.jpg", "URI scheme 'github' is not allowed"),
    ("git://repo/p.jpg", "URI scheme 'git' is not allowed"),
    ("zip://p.jpg", "URI scheme 'zip' is not allowed"),
    ("tar://p.jpg", "URI scheme 'tar' is not allowed"),
    ("libarchive://p.jpg", "URI scheme 'libarchive' is not allowed"),
    ("reference://p.jpg", "URI scheme 'reference' is not allowed"),
    ("dbfs://p.jpg", "URI scheme 'dbfs' is not allowed"),
    ("smb://h/share/p.jpg", "URI scheme 'smb' is not allowed"),
    ("local://p.jpg", "URI scheme 'local' is not allowed"),
    ("simplecache://p.jpg", "URI scheme 'simplecache' is not allowed"),
    ("c:\\img\\p.jpg", "URI scheme 'c' is not allowed"),
    ("simplecache::http://127.0.0.1:8000/p.jpg", "chained fsspec URLs ('simplecache::...')"),
    ("blockcache::http://127.0.0.1:8000/p.jpg", "chained fsspec URLs ('blockcache::...')"),
    ("filecache::http://127.0.0.1:8000/p.jpg", "chained fsspec URLs ('filecache::...')"),
    ("SIMPLECACHE::HTTP://127.0.0.1/p.jpg", "chained fsspec URLs ('simplecache::...')"),
    ("Simplecache::s3://b/p.jpg", "chained fsspec URLs ('simplecache::...')"),
    ("simplecache::http://169.254.169.254/latest/", "chained fsspec URLs ('simplecache::...')"),
    ("zip://p.jpg::http://127.0.0.1:8000/a.zip", "chained fsspec URLs ('zip::...')"),
    ("s3://b/p.jpg::http://127.0.0.1/x", "chained fsspec URLs ('s3::...')"),
    ("memory://a::http://127.0.0.1/x", "chained fsspec URLs ('memory::...')"),
    ("file:///a::http://127.0.0.1/x", "chained fsspec URLs ('file::...')"),
    ("simple cache::http://127.0.0.1/x", "chained fsspec URLs ('...::...')"),
    ("/data/a::http://127.0.0.1/x", "chained fsspec URLs ('...::...')"),
    ("user:pw@host::http://127.0.0.1/x", "chained fsspec URLs ('...::...')"),
    ("http:127.0.0.1:8000/p.jpg", "malformed http URL"),
    ("http:/p.jpg", "malformed http URL"),
    ("HTTPS:p.jpg", "malformed https URL"),
    ("http::simplecache::x", "malformed http URL"),
    ("file:/etc/p.jpg", "malformed file URL"),
    ("s3:bucket/p.jpg", "malformed s3 URL"),
    ("memory:p.jpg", "malformed memory URL"),
]


@pytest.mark.parametrize(("ref", "named"), REFUSED_REFS)
def test_refused_image_refs_name_their_scheme(ref: str, named: str) -> None:
    verdict = classify_image_ref(ref, "person_image")
    assert isinstance(verdict, Refusal)
    assert named in verdict.reason
    assert "in column 'person_image'" in verdict.reason
    assert "pw" not in verdict.reason and "127.0.0.1" not in verdict.reason


@pytest.mark.parametrize("column", ["person_image", "garment_image", "lower_garment_image"])
def test_validation_refuses_each_ref_with_the_fetch_reason(column: str) -> None:
    """Validation and the fetch make one decision: the reason is ``classify_image_ref``'s."""
    refs = [ref for ref, _ in REFUSED_REFS]
    rows = [good(id=f"r{i}", **{column: ref}) for i, ref in enumerate(refs)]
    df = frame(*rows, columns=[*good(), "lower_garment_image"])
    report = validate_manifest(df)
    assert report.valid == []
    got = {bad.row_index: bad.reasons for bad in report.invalid}
    for i, (ref, named) in enumerate(REFUSED_REFS):
        assert got[i] == [image_ref_refusal(ref, column)], ref
        assert named in got[i][0] and f"column '{column}'" in got[i][0]


def test_validation_passes_allowed_refs_in_bulk_and_agrees_with_the_classifier() -> None:
    """The vectorised shortcut never passes a reference ``classify_image_ref`` refuses."""
    refs = [
        "p.jpg",
        "a/b c.jpg",
        "/abs/p.jpg",
        "http://h/p.jpg",
        "https://h:8443/p.jpg?x=a:b",
        "HTTPS://[::1]:8443/p.jpg",
        "s3://b/p.jpg",
        "s3a://b/p.jpg",
        "file:///p.jpg",
        "memory://b/p.jpg",
        "data:image/png;base64,AAAA",
        *(ref for ref, _ in REFUSED_REFS),
    ]
    df = frame(*(good(id=f"r{i}", person_image=ref) for i, ref in enumerate(refs)))
    report = validate_manifest(df)
    refused = {bad.row_index for bad in report.invalid}
    for i, ref in enumerate(refs):
        assert (i in refused) == (image_ref_refusal(ref) is not None), ref


@pytest.mark.parametrize(
    ("base", "named"),
    [("gs://b/dir", "'gs'"), ("simplecache::s3://b/dir", "chained"), ("ftp://h/d", "'ftp'")],
)
def test_relative_refs_under_a_manifest_on_a_refused_scheme_are_invalid(
    base: str, named: str
) -> None:
    """The manifest's own URL may be any fsspec URL; images read from beside it may not."""
    df = frame(
        good(id="rel", person_image="p.jpg"),
        good(id="abs", person_image="/data/p.jpg"),
        good(id="url", person_image="s3://b/p.jpg"),
    )
    report = validate_manifest(df, base_uri=base)
    assert [r.id for r in report.valid] == ["abs", "url"]
    (bad,) = report.invalid
    assert bad.row_id == "rel"
    assert "relative path in column 'person_image'" in bad.message and named in bad.message


@pytest.mark.parametrize(
    ("ref", "base", "expected"),
    [
        ("p.jpg", "/data/run", "/data/run/p.jpg"),
        ("img/p.jpg", "/data/run/", "/data/run/img/p.jpg"),
        ("./img/p.jpg", "/data/run", "/data/run/img/p.jpg"),
        ("../img/p.jpg", "/data/run", "/data/img/p.jpg"),
        ("/abs/p.jpg", "/data/run", "/abs/p.jpg"),
        ("~/p.jpg", "/data/run", "~/p.jpg"),
        ("p.jpg", None, "p.jpg"),
        ("p.jpg", "", "p.jpg"),
        ("img/p.jpg", "s3://bucket/dir", "s3://bucket/dir/img/p.jpg"),
        ("img/p.jpg", "s3://bucket/dir/", "s3://bucket/dir/img/p.jpg"),
        ("../p.jpg", "s3://bucket/dir", "s3://bucket/p.jpg"),
        ("../../../p.jpg", "s3://bucket/dir", "s3://bucket/p.jpg"),  # never leaves the bucket
        ("p.jpg", "s3://bucket", "s3://bucket/p.jpg"),
        ("img/p.jpg", "https://host/dir/", "https://host/dir/img/p.jpg"),
        ("../p.jpg", "https://host/a/b", "https://host/a/p.jpg"),
        ("p.jpg", "memory://bucket/dir", "memory://bucket/dir/p.jpg"),
        ("p.jpg", "file:///data/run", "file:///data/run/p.jpg"),
        ("s3://other/p.jpg", "/data/run", "s3://other/p.jpg"),
        ("https://cdn/p.jpg", "s3://bucket/dir", "https://cdn/p.jpg"),
        ("data:image/png;base64,AAAA", "/data/run", "data:image/png;base64,AAAA"),
    ],
)
def test_resolve_uri(ref: str, base: str | None, expected: str) -> None:
    assert resolve_uri(ref, base) == expected


@pytest.mark.parametrize(
    "base", ["/data/run", "/data/run/", "/", "s3://bucket/dir", "https://host/dir/", "memory://b"]
)
def test_vectorised_resolution_matches_resolve_uri(base: str) -> None:
    refs = ["p.jpg", "a/p.jpg", "./p.jpg", "../p.jpg", "a//p.jpg", "a/./b/../p.jpg", "/abs.jpg"]
    df = frame(*(good(id=f"r{i}", person_image=ref) for i, ref in enumerate(refs)))
    report = validate_manifest(df, base_uri=base)
    assert [r.person_image for r in report.valid] == [resolve_uri(ref, base) for ref in refs]


def test_relative_paths_resolve_against_a_local_directory() -> None:
    df = frame(
        good(person_image="people/p.jpg", garment_image="../g.jpg", lower_garment_image="l.jpg")
    )
    (row,) = validate_manifest(df, base_uri="/data/run").valid
    assert row.person_image == "/data/run/people/p.jpg"
    assert row.garment_image == "/data/g.jpg"
    assert row.lower_garment_image == "/data/run/l.jpg"


def test_relative_paths_resolve_against_a_url_directory() -> None:
    df = frame(good(person_image="people/p.jpg", garment_image="https://cdn/g.jpg"))
    (row,) = validate_manifest(df, base_uri="memory://bucket/dir").valid
    assert row.person_image == "memory://bucket/dir/people/p.jpg"
    assert row.garment_image == "https://cdn/g.jpg"


# --- reports and scale --------------------------------------------------------------------


def test_summary_counts_and_lists_invalid_rows() -> None:
    df = frame(good(id="a"), good(id="b", category="shoes"), good(id=None))
    summary = validate_manifest(df).summary()
    assert summary.splitlines()[0] == "3 rows: 1 valid, 2 invalid"
    # The second and third data rows: numbered from 1, as in validate's output and the logs.
    assert "row 2 (id 'b'): unknown category 'shoes'" in summary
    assert "row 3 (no id): missing value in column 'id'" in summary


def test_summary_is_capped() -> None:
    df = frame(*(good(id=f"r{i}", category="nope") for i in range(8)))
    summary = validate_manifest(df).summary(max_invalid=3)
    assert "... and 5 more invalid rows" in summary


def test_ten_thousand_rows() -> None:
    n = 10_000
    df = pl.DataFrame(
        {
            "id": [f"row-{i}" for i in range(n)],
            "person_image": [f"people/{i}.jpg" for i in range(n)],
            "garment_image": [f"s3://bucket/g/{i % 50}.jpg" for i in range(n)],
            "category": [CATEGORIES[i % 3] for i in range(n)],
            "gender": ["f", "m"] * (n // 2),
        }
    ).with_columns(
        # a sprinkling of bad rows: a duplicate id and an unknown category
        pl.when(pl.int_range(pl.len()) == 9_999).then(pl.lit("row-0")).otherwise("id").alias("id"),
        pl.when(pl.int_range(pl.len()) == 5_000)
        .then(pl.lit("hats"))
        .otherwise("category")
        .alias("category"),
    )
    report = validate_manifest(df, base_uri="/data/run")
    assert report.n_rows == n
    assert len(report.valid) == n - 3
    assert sorted(bad.row_index for bad in report.invalid) == [0, 5_000, 9_999]
    assert report.valid[0].person_image == "/data/run/people/1.jpg"
    assert report.valid[0].gender == "man"
