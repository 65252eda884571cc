"""Reading manifests from local files and fsspec URLs, and the errors when that cannot work."""

from __future__ import annotations

import gzip
import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import pytest
from fsspec.spec import AbstractFileSystem

from schemas.manifest import ManifestError
from schemas.uris import image_ref_refusal
from tasks.manifest import load_manifest, manifest_base_uri, read_manifest, redact_uri

HEADER = "id,person_image,garment_image,category"


@pytest.fixture
def memdir() -> Iterator[str]:
    """A fresh ``memory://`` directory, removed afterwards (the memory filesystem is global)."""
    fs = fsspec.filesystem("memory")
    root = f"/test-manifest-{uuid.uuid4().hex}"
    fs.mkdir(root)
    yield f"memory://{root.lstrip('/')}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# --- CSV ----------------------------------------------------------------------------------


def test_csv_columns_are_all_text(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", f"{HEADER}\n007,p.jpg,g.jpg,dresses\n1.50,q.jpg,g.jpg,x\n")
    df = read_manifest(str(path))
    assert df.columns == ["id", "person_image", "garment_image", "category"]
    assert all(dtype == pl.String for dtype in df.dtypes)
    assert df["id"].to_list() == ["007", "1.50"]


def test_csv_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\nr1,p.jpg,g.jpg,dresses\n".encode())
    assert read_manifest(str(path)).columns[0] == "id"
    report = load_manifest(str(path))
    assert [r.id for r in report.valid] == ["r1"]


def test_csv_with_crlf_and_a_quoted_newline(tmp_path: Path) -> None:
    text = (
        "id,person_image,garment_image,category,garment_description\r\n"
        'r1,p.jpg,g.jpg,upper_body,"a shirt,\r\nwith ""two"" lines"\r\n'
        "r2,p.jpg,g.jpg,dresses,plain\r\n"
    )
    report = load_manifest(str(write(tmp_path / "m.csv", text)))
    assert report.invalid == []
    descriptions = [r.garment_description for r in report.valid]
    assert descriptions == ['a shirt,\r\nwith "two" lines', "plain"]
    assert [r.row_index for r in report.valid] == [0, 1]


def test_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "m.tsv", "id\tperson_image\tprompt\nr1\tp.jpg\ta, b\n")
    assert read_manifest(str(path))["prompt"].to_list() == ["a, b"]


def test_gzipped_csv(tmp_path: Path) -> None:
    path = tmp_path / "m.csv.gz"
    path.write_bytes(gzip.compress(f"{HEADER}\nr1,p.jpg,g.jpg,dresses\n".encode()))
    assert read_manifest(str(path))["id"].to_list() == ["r1"]


def test_csv_without_an_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "manifest", f"{HEADER}\nr1,p.jpg,g.jpg,dresses\n")
    assert read_manifest(str(path)).height == 1


def test_csv_from_memory_filesystem(memdir: str) -> None:
    uri = f"{memdir}/manifest.csv"
    with fsspec.open(uri, "wb") as handle:
        handle.write(f"{HEADER}\nr1,/p.jpg,/g.jpg,dresses\n".encode())
    df = read_manifest(uri)
    assert df.to_dicts() == [
        {"id": "r1", "person_image": "/p.jpg", "garment_image": "/g.jpg", "category": "dresses"}
    ]


# --- Parquet ------------------------------------------------------------------------------


def test_parquet_with_an_integer_id(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pl.DataFrame(
        {
            "id": [1, 2],
            "person_image": ["p.jpg", "q.jpg"],
            "prompt": ["x", "y"],
            "score": [0.5, 1.0],
        }
    ).write_parquet(path)
    df = read_manifest(str(path))
    assert df["id"].to_list() == ["1", "2"]
    assert all(dtype == pl.String for dtype in df.dtypes)
    report = load_manifest(str(path))
    assert [r.id for r in report.valid] == ["1", "2"]
    assert report.valid[0].person_image == str(tmp_path / "p.jpg")


def test_parquet_is_sniffed_by_its_magic_bytes(tmp_path: Path) -> None:
    path = tmp_path / "manifest.bin"
    pl.DataFrame({"id": ["r1"], "person_image": ["p.jpg"], "prompt": ["x"]}).write_parquet(path)
    assert read_manifest(str(path))["id"].to_list() == ["r1"]


def test_parquet_from_memory_filesystem(memdir: str) -> None:
    uri = f"{memdir}/m.pq"
    with fsspec.open(uri, "wb") as handle:
        pl.DataFrame({"id": ["r1"], "person_image": ["p.jpg"], "prompt": ["x"]}).write_parquet(
            handle
        )
    assert read_manifest(uri)["person_image"].to_list() == ["p.jpg"]


def test_parquet_nested_column_we_do_not_read_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pl.DataFrame(
        {"id": ["r1"], "person_image": ["p.jpg"], "prompt": ["x"], "tags": [["a", "b"]]}
    ).write_parquet(path)
    assert load_manifest(str(path)).valid[0].id == "r1"


def test_parquet_nested_known_column_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pl.DataFrame({"id": ["r1"], "person_image": [["p.jpg"]], "prompt": ["x"]}).write_parquet(path)
    with pytest.raises(ManifestError, match="'person_image' has type List"):
        read_manifest(str(path))


# --- relative references ------------------------------------------------------------------


def test_relative_paths_resolve_against_a_local_manifest_directory(tmp_path: Path) -> None:
    sub = tmp_path / "batch"
    sub.mkdir()
    text = (
        f"{HEADER}\n"
        "r1,people/p.jpg,../shared/g.jpg,dresses\n"
        "r2,/abs/p.jpg,https://cdn.example/g.jpg,upper_body\n"
    )
    report = load_manifest(str(write(sub / "manifest.csv", text)))
    first, second = report.valid
    assert first.person_image == str(sub / "people" / "p.jpg")
    assert first.garment_image == str(tmp_path / "shared" / "g.jpg")
    assert second.person_image == "/abs/p.jpg"
    assert second.garment_image == "https://cdn.example/g.jpg"


def test_relative_local_manifest_path_resolves_to_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "m.csv", f"{HEADER}\nr1,p.jpg,g.jpg,dresses\n")
    monkeypatch.chdir(tmp_path)
    (row,) = load_manifest("m.csv").valid
    assert row.person_image == str(tmp_path / "p.jpg")


def test_relative_paths_resolve_against_a_memory_url(memdir: str) -> None:
    uri = f"{memdir}/dir/manifest.csv"
    with fsspec.open(uri, "wb") as handle:
        handle.write(f"{HEADER}\nr1,people/p.jpg,../g.jpg,dresses\n".encode())
    (row,) = load_manifest(uri).valid
    assert row.person_image == f"{memdir}/dir/people/p.jpg"
    assert row.garment_image == f"{memdir}/g.jpg"


def test_relative_paths_under_a_manifest_url_of_another_scheme_are_invalid_rows(
    memdir: str,
) -> None:
    """The manifest's URL is the operator's (any fsspec URL); images read from beside it are
    checked like any other image reference, so a chained manifest URL makes them invalid."""
    uri = f"simplecache::{memdir}/dir/manifest.csv"
    with fsspec.open(f"{memdir}/dir/manifest.csv", "wb") as handle:
        handle.write(f"{HEADER}\nr1,people/p.jpg,https://cdn.example/g.jpg,dresses\n".encode())
    report = load_manifest(uri)
    assert report.valid == []
    (bad,) = report.invalid
    assert "chained fsspec URLs" in bad.message and "person_image" in bad.message
    assert "garment_image" not in bad.message


def test_image_refs_with_refused_schemes_are_invalid_rows(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "r1,p.jpg,g.jpg,dresses\n"
        "r2,gs://b/p.jpg,g.jpg,dresses\n"
        "r3,p.jpg,blockcache::http://127.0.0.1:8000/g.jpg,dresses\n"
        "r4,HTTP:/p.jpg,g.jpg,dresses\n"
        "r5,s3://b/p.jpg,https://cdn.example/g.jpg,dresses\n"
    )
    report = load_manifest(str(write(tmp_path / "m.csv", text)))
    assert [r.id for r in report.valid] == ["r1", "r5"]
    assert {bad.row_id: bad.reasons for bad in report.invalid} == {
        "r2": [image_ref_refusal("gs://b/p.jpg", "person_image")],
        "r3": [image_ref_refusal("blockcache::http://127.0.0.1:8000/g.jpg", "garment_image")],
        "r4": [image_ref_refusal("HTTP:/p.jpg", "person_image")],
    }
    assert "URI scheme 'gs' is not allowed" in report.invalid[0].reasons[0]


def test_load_manifest_checks_providers(tmp_path: Path) -> None:
    text = "id,person_image,prompt,provider\nr1,p.jpg,x,fashn\nr2,p.jpg,x,acme\n"
    report = load_manifest(str(write(tmp_path / "m.csv", text)), known_providers=["fashn"])
    assert [r.id for r in report.valid] == ["r1"]
    assert report.invalid[0].reasons == ["unknown provider 'acme' (expected one of: fashn)"]


@pytest.mark.parametrize(
    ("uri", "base"),
    [
        ("s3://bucket/dir/manifest.csv", "s3://bucket/dir"),
        ("s3://bucket/manifest.csv", "s3://bucket"),
        ("memory://bucket/dir/manifest.csv", "memory://bucket/dir"),
        ("https://host/a/m.csv?X-Amz-Signature=abc#frag", "https://host/a"),
        ("simplecache::s3://bucket/d/m.csv", "simplecache::s3://bucket/d"),
        ("file:///data/m.csv", "file:///data"),
        ("/data/run/m.csv", "/data/run"),
    ],
)
def test_manifest_base_uri(uri: str, base: str) -> None:
    assert manifest_base_uri(uri) == base


# --- errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest not found: .*nope\.csv"):
        read_manifest(str(tmp_path / "nope.csv"))


def test_missing_memory_file(memdir: str) -> None:
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(f"{memdir}/nope.csv")


def test_missing_required_column(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,garment_image,category\nr1,g.jpg,dresses\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(str(path))
    assert "missing required column(s) 'person_image'" in str(info.value)
    assert "found columns: 'id', 'garment_image', 'category'" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xef\xbb\xbf", b"  \r\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match="is empty"):
        read_manifest(str(path))


def test_header_only_manifest_is_not_an_error(tmp_path: Path) -> None:
    report = load_manifest(str(write(tmp_path / "m.csv", f"{HEADER}\n")))
    assert (report.n_rows, report.valid, report.invalid) == (0, [], [])


def test_ragged_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", f"{HEADER}\nr1,p.jpg,g.jpg,dresses,extra,more\n")
    with pytest.raises(ManifestError, match="is not valid CSV"):
        read_manifest(str(path))


def test_parquet_extension_without_parquet_content(tmp_path: Path) -> None:
    path = write(tmp_path / "m.parquet", f"{HEADER}\n")
    with pytest.raises(ManifestError, match="not a valid Parquet file"):
        read_manifest(str(path))


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 32)
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest(str(path))


def test_binary_file_is_neither_csv_nor_parquet(tmp_path: Path) -> None:
    path = tmp_path / "m.xlsx"
    path.write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    with pytest.raises(ManifestError, match="neither Parquet nor UTF-8 CSV"):
        read_manifest(str(path))


def test_directory_is_not_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=str(tmp_path)):
        read_manifest(str(tmp_path))


class _LeakyFileSystem(AbstractFileSystem):
    """A backend whose errors repeat its credentials and the full URL, as some do."""

    protocol = "leakytest"

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        key = self.storage_options["key"]
        raise RuntimeError(
            f"access denied for key={key} secret={self.storage_options['secret']} "
            f"on leakytest://{path}?sig=s3cr3tsig"
        )


def test_errors_never_show_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # `fsspec.registry` is shadowed by a read-only mapping; the module holds the writable one.
    registry_module = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(registry_module._registry, "leakytest", _LeakyFileSystem)
    uri = "leakytest://bucket/m.csv?sig=s3cr3tsig"
    options = {"key": "AKIAEXAMPLEKEY", "secret": "topsecretvalue"}
    with pytest.raises(ManifestError) as info:
        read_manifest(uri, storage_options=options)
    message = str(info.value)
    assert "could not read manifest leakytest://bucket/m.csv?***: RuntimeError" in message
    for secret in ("AKIAEXAMPLEKEY", "topsecretvalue", "s3cr3tsig"):
        assert secret not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("/data/m.csv", "/data/m.csv"),
        ("s3://bucket/m.csv", "s3://bucket/m.csv"),
        ("https://user:pw@host/m.csv", "https://***@host/m.csv"),
        ("https://host/m.csv?X-Amz-Signature=abc", "https://host/m.csv?***"),
        ("simplecache::https://host/m.csv?sig=1", "simplecache::https://host/m.csv?***"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


# --- local image files (check_files) ------------------------------------------------------


def test_missing_local_images_make_rows_invalid_with_the_path_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "people").mkdir()
    (tmp_path / "people" / "p.jpg").write_bytes(b"x")
    (tmp_path / "g.jpg").write_bytes(b"x")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")  # a broken link
    monkeypatch.setenv("HOME", str(tmp_path))
    deep = "d" * 120  # a long path: shown whole, never shortened
    text = (
        f"{HEADER},lower_garment_image\n"
        "ok,people/p.jpg,g.jpg,dresses,\n"
        "rel,people/missing.jpg,g.jpg,dresses,\n"
        f"abs,{tmp_path}/people/p.jpg,{tmp_path}/{deep}/g.jpg,dresses,\n"
        f"url,file://{tmp_path}/nope.jpg,https://cdn.example/g.jpg,dresses,\n"
        "home,~/people/p.jpg,~/nope.jpg,dresses,\n"
        "dir,people,g.jpg,dresses,\n"
        "link,link.jpg,g.jpg,upper_body,lower.jpg\n"
        "remote,s3://bucket/p.jpg,memory://b/g.jpg,dresses,\n"
        "both,people/missing.jpg,g.jpg,shoes,\n"
    )
    path = write(tmp_path / "m.csv", text)
    assert [r.id for r in load_manifest(str(path)).valid][:2] == ["ok", "rel"]  # not asked
    report = load_manifest(str(path), check_files=True)
    assert [r.id for r in report.valid] == ["ok", "remote"]
    reasons = {bad.row_id: bad.reasons for bad in report.invalid}
    assert reasons == {
        "rel": [f"no such file in column 'person_image': {tmp_path}/people/missing.jpg"],
        "abs": [f"no such file in column 'garment_image': {tmp_path}/{deep}/g.jpg"],
        "url": [f"no such file in column 'person_image': file://{tmp_path}/nope.jpg"],
        "home": ["no such file in column 'garment_image': ~/nope.jpg"],
        "dir": [f"a directory, not a file in column 'person_image': {tmp_path}/people"],
        "link": [
            f"no such file in column 'person_image': {tmp_path}/link.jpg",
            f"no such file in column 'lower_garment_image': {tmp_path}/lower.jpg",
        ],
        # Files are checked on rows the manifest's own checks pass, as a run checks them.
        "both": ["unknown category 'shoes' (expected one of: upper_body, lower_body, dresses)"],
    }
    assert [bad.row_index for bad in report.invalid] == [1, 2, 3, 4, 5, 6, 8]


def test_missing_files_are_looked_for_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.manifest

    (tmp_path / "g.jpg").write_bytes(b"x")
    rows = "".join(f"r{i},p{i % 3}.jpg,g.jpg,dresses\n" for i in range(300))
    path = write(tmp_path / "m.csv", f"{HEADER}\n{rows}")
    looked: list[str] = []
    original = tasks.manifest._local_file_problem

    def counting(ref: str) -> str | None:
        looked.append(ref)
        return original(ref)

    monkeypatch.setattr(tasks.manifest, "_local_file_problem", counting)
    report = load_manifest(str(path), check_files=True)
    assert len(report.invalid) == 300 and report.valid == []
    assert sorted(looked) == sorted(
        str(tmp_path / n) for n in ("p0.jpg", "p1.jpg", "p2.jpg", "g.jpg")
    )
