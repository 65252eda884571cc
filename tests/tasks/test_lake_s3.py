"""The lake and input staging against a real S3 server on loopback (moto, see tests/s3server.py)."""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import polars as pl
import pytest
import s3fs

from providers.base import PreparedImage
from schemas.results import METADATA_SCHEMA, RowRecord, Status
from tasks.lake import Lake, LakePathError
from tasks.staging import PRESIGN_EXPIRES_S, STAGING_BASE_URL_ENV, InputStager
from tests.s3server import S3Server
from tests.tasks.test_staging import image


def fresh_prefix() -> str:
    return f"lake-{uuid.uuid4().hex[:12]}"


def open_lake(s3: S3Server, prefix: str) -> Lake:
    return Lake.open(s3.uri(prefix), storage_options=s3.storage_options)


def record(run_id: str, row_id: str, index: int, status: Status, **extra: Any) -> RowRecord:
    return RowRecord.model_validate(
        {
            "run_id": run_id,
            "row_id": row_id,
            "row_index": index,
            "provider": "changeclothes",
            "status": status,
            "started_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            **extra,
        }
    )


def test_open_normalises_the_root(s3_server: S3Server) -> None:
    prefix = fresh_prefix()
    lake = Lake.open(s3_server.uri(prefix) + "/", storage_options=s3_server.storage_options)
    assert isinstance(lake.fs, s3fs.S3FileSystem)
    assert lake.root == f"{s3_server.bucket}/{prefix}"
    assert lake.uri == s3_server.uri(prefix)
    assert lake.full_uri(lake.path("runs", "r1")) == s3_server.uri(prefix, "runs", "r1")
    assert lake.metadata_glob() == s3_server.uri(prefix, "metadata", "**", "*.parquet")


def test_bytes_and_json_round_trip_through_s3(s3_server: S3Server) -> None:
    prefix = fresh_prefix()
    lake = open_lake(s3_server, prefix)
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64  # binary, 16 KiB
    digest = hashlib.sha256(image).hexdigest()
    uri = lake.write_bytes(lake.output_path(digest, "png"), image)
    assert uri == s3_server.uri(prefix, "outputs", f"{digest}.png")
    assert lake.read_uri(uri) == image
    summary = {"run_id": "run-1", "counts": {"succeeded": 1}, "at": datetime(2026, 1, 1)}
    json_uri = lake.write_json(lake.run_path("run-1", "summary.json"), summary)

    # Read back through a separate client: the objects really are on the server.
    reader = s3_server.filesystem()
    assert reader.cat_file(uri) == image
    saved = json.loads(reader.cat_file(json_uri))
    assert saved == {"run_id": "run-1", "counts": {"succeeded": 1}, "at": "2026-01-01 00:00:00"}
    assert sorted(reader.find(s3_server.uri(prefix))) == sorted(
        [
            f"{s3_server.bucket}/{prefix}/outputs/{digest}.png",
            f"{s3_server.bucket}/{prefix}/runs/run-1/summary.json",
        ]
    )
    # read_uri only reads this lake's objects.
    elsewhere = s3_server.uri(prefix + "-other", "outputs", f"{digest}.png")
    s3_server.filesystem().pipe_file(elsewhere, b"not ours")
    with pytest.raises(LakePathError):
        lake.read_uri(elsewhere)


def test_metadata_is_visible_only_once_the_run_commits(s3_server: S3Server) -> None:
    prefix = fresh_prefix()
    lake = open_lake(s3_server, prefix)
    first = [
        record("run-a", "r1", 0, Status.SUCCEEDED, output_uri="s3://x/y.png", attempts=1),
        record("run-a", "r2", 1, Status.FAILED, error_code="HARMFUL_CONTENT", attempts=1),
    ]
    second = [record("run-b", "r1", 0, Status.INVALID, error_code="INVALID_ROW")]
    part_uri = lake.write_metadata("run-a", "part-00000", first)
    assert part_uri == s3_server.uri(prefix, "runs", "run-a", "parts", "part-00000.parquet")
    lake.write_metadata("run-b", "part-00000", second)
    # Written, not committed: readers of metadata/ see nothing yet.
    assert lake.read_metadata().height == 0
    assert not lake.is_committed("run-a")

    marker = lake.commit_run("run-a", {"run_id": "run-a"})
    assert marker == s3_server.uri(prefix, "runs", "run-a", "_COMMITTED")
    assert lake.is_committed("run-a") and not lake.is_committed("run-b")
    assert json.loads(s3_server.filesystem().cat_file(marker))["parts"] == ["part-00000.parquet"]
    back = lake.read_metadata("run-a").sort("row_id")
    assert back.schema == pl.Schema(METADATA_SCHEMA)
    assert back["status"].to_list() == ["succeeded", "failed"]
    assert back["error_code"].to_list() == [None, "HARMFUL_CONTENT"]
    assert lake.read_metadata().height == 2  # run-b is still uncommitted

    lake.commit_run("run-b", {"run_id": "run-b"})
    # What a user runs: polars straight on the lake's glob, with object_store's options.
    scanned = (
        pl.scan_parquet(lake.metadata_glob(), storage_options=s3_server.polars_storage_options)
        .sort("run_id", "row_id")
        .collect()
    )
    assert scanned.schema == pl.Schema(METADATA_SCHEMA)
    assert scanned.select("run_id", "row_id", "status").rows() == [
        ("run-a", "r1", "succeeded"),
        ("run-a", "r2", "failed"),
        ("run-b", "r1", "invalid"),
    ]
    assert scanned["started_at"][0] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    one_run = (
        pl.scan_parquet(lake.metadata_glob(), storage_options=s3_server.polars_storage_options)
        .filter(pl.col("run_id") == "run-b")
        .collect()
    )
    assert one_run["row_id"].to_list() == ["r1"]


def test_a_retried_run_recommits_in_place(s3_server: S3Server) -> None:
    """The same run committed twice (a retry from the UI): parts replaced, none duplicated,
    the marker rewritten although S3 refuses the exclusive create the second time."""
    prefix = fresh_prefix()
    lake = open_lake(s3_server, prefix)
    lake.write_metadata("run-r", "part-00000", [record("run-r", "r1", 0, Status.FAILED)])
    lake.write_metadata("run-r", "part-00001", [record("run-r", "r2", 1, Status.FAILED)])
    lake.commit_run("run-r", {"attempt": 1})

    # The exclusive create the protocol relies on really is exclusive on this S3 server.
    with pytest.raises(FileExistsError), lake.fs.open(lake.commit_marker("run-r"), "xb") as f:
        f.write(b"second writer")

    lake.remove_if_exists(lake.run_path("run-r", "parts", "part-00001.parquet"))
    lake.write_metadata("run-r", "part-00000", [record("run-r", "r1", 0, Status.SUCCEEDED)])
    marker = lake.commit_run("run-r", {"attempt": 2})
    saved = json.loads(s3_server.filesystem().cat_file(marker))
    assert saved == {"attempt": 2, "parts": ["part-00000.parquet"]}
    meta = lake.read_metadata("run-r")
    assert meta.select("row_id", "status").rows() == [("r1", "succeeded")]
    published = s3_server.filesystem().find(s3_server.uri(prefix, "metadata"))
    assert [posixpath.basename(p) for p in published] == ["part-00000.parquet"]


def test_an_empty_s3_lake_reads_as_an_empty_frame(s3_server: S3Server) -> None:
    lake = open_lake(s3_server, fresh_prefix())
    empty = lake.read_metadata()
    assert empty.height == 0 and empty.schema == pl.Schema(METADATA_SCHEMA)
    assert not lake.is_committed("run-x")


def test_lakes_sharing_a_key_prefix_stay_apart(s3_server: S3Server) -> None:
    """S3 has no directories: ``lake`` must not see ``lake-2``'s keys, which start alike."""
    prefix = fresh_prefix()
    lake = open_lake(s3_server, prefix)
    neighbour = open_lake(s3_server, prefix + "-2")
    for owner, run_id in ((neighbour, "run-n"), (lake, "run-l")):
        owner.write_metadata(run_id, "part-00000", [record(run_id, "r1", 0, Status.SUCCEEDED)])
        owner.commit_run(run_id, {"run_id": run_id})
    assert lake.read_metadata()["run_id"].to_list() == ["run-l"]
    assert not lake.is_committed("run-n")
    scanned = pl.scan_parquet(
        lake.metadata_glob(), storage_options=s3_server.polars_storage_options
    ).collect()
    assert scanned["run_id"].to_list() == ["run-l"]


@pytest.mark.parametrize(
    "parts",
    [
        ("..", "escaped.json"),
        ("results", "..", "..", "escaped.json"),
        ("..", "{prefix}-sibling", "escaped.json"),  # a sibling whose name starts like ours
        ("/", "escaped.json"),
        ("/etc", "passwd"),
        ("runs", ""),
        ("runs\\..\\..", "escaped.json"),
    ],
    ids=["parent", "up-twice", "sibling-prefix", "root", "absolute", "empty", "backslashes"],
)
def test_path_guard_refuses_paths_leaving_the_root(
    s3_server: S3Server, parts: tuple[str, ...]
) -> None:
    prefix = fresh_prefix()
    lake = open_lake(s3_server, prefix)
    parts = tuple(p.format(prefix=prefix) for p in parts)
    with pytest.raises(LakePathError):
        lake.write_bytes(lake.path(*parts), b"must not be written")
    # Nothing was written anywhere in the bucket.
    reader = s3_server.filesystem()
    written = [p for p in reader.find(s3_server.bucket) if p.endswith(("escaped.json", "passwd"))]
    assert written == []


def test_path_guard_at_the_bucket_root(s3_server: S3Server) -> None:
    lake = Lake.open(s3_server.uri(), storage_options=s3_server.storage_options)
    assert lake.root == s3_server.bucket
    assert lake.path("runs", "r1") == f"{s3_server.bucket}/runs/r1"
    with pytest.raises(LakePathError):
        lake.path("..", "another-bucket", "x.json")


@pytest.mark.parametrize("run_id", ["..", "../run", "a/b", ""])
def test_run_path_refuses_unsafe_run_ids(s3_server: S3Server, run_id: str) -> None:
    lake = open_lake(s3_server, fresh_prefix())
    with pytest.raises(LakePathError):
        lake.run_path(run_id, "summary.json")


@pytest.mark.parametrize(
    ("digest", "extension"),
    [("../" + "a" * 61, "png"), ("A" * 64, "png"), ("a" * 63, "png"), ("a" * 64, "png/../x")],
)
def test_output_path_takes_only_a_digest(s3_server: S3Server, digest: str, extension: str) -> None:
    lake = open_lake(s3_server, fresh_prefix())
    with pytest.raises(LakePathError):
        lake.output_path(digest, extension)


def prepared(data: bytes) -> PreparedImage:
    return image(data)


def expires_in(query: dict[str, list[str]]) -> float:
    """Seconds a presigned URL stays valid, for either signature version."""
    if "X-Amz-Expires" in query:  # SigV4: relative to X-Amz-Date
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        return int(query["X-Amz-Expires"][0]) - (datetime.now(UTC) - signed).total_seconds()
    return int(query["Expires"][0]) - time.time()  # SigV2: an absolute epoch


async def test_staged_input_gets_a_presigned_url_httpx_can_get(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STAGING_BASE_URL_ENV, raising=False)
    prefix = fresh_prefix()
    lake = open_lake(s3_server, prefix)
    image = prepared(b"\xff\xd8\xff\xe0" + uuid.uuid4().bytes * 512)
    # A remote provider is fine: an S3 lake presigns, nothing needs serving from here.
    stager = InputStager(lake, provider_base_url="https://aiart.tencentcloudapi.com")
    try:
        staged = await stager.stage(image)
        again = await stager.stage(image)
    finally:
        stager.close()
    assert stager._server is None  # no loopback file server was started

    key = f"{prefix}/inputs/{image.sha256}.jpg"
    assert staged.data == image.data and staged.sha256 == image.sha256
    assert staged.url is not None and again.url is not None
    parts = urlsplit(staged.url)
    assert f"{parts.scheme}://{parts.netloc}" == s3_server.endpoint_url
    assert parts.path == f"/{s3_server.bucket}/{key}"
    query = parse_qs(parts.query)
    assert expires_in(query) == pytest.approx(PRESIGN_EXPIRES_S, abs=60)
    assert s3_server.key in (query.get("X-Amz-Credential") or query["AWSAccessKeyId"])[0]
    assert s3_server.secret not in staged.url

    reader = s3_server.filesystem()
    assert reader.cat_file(f"{s3_server.bucket}/{key}") == image.data  # content-addressed
    assert reader.find(s3_server.uri(prefix)) == [f"{s3_server.bucket}/{key}"]  # staged once

    async with httpx.AsyncClient() as http:
        for url in (staged.url, again.url):
            response = await http.get(url)
            assert response.status_code == 200
            assert response.content == image.data
        missing = await http.get(staged.url.replace(image.sha256, "0" * 64))
        assert missing.status_code == 404


async def test_staged_input_urls_are_signed_with_sigv4(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STAGING_BASE_URL_ENV, raising=False)
    lake = open_lake(s3_server, fresh_prefix())
    stager = InputStager(lake, provider_base_url="https://aiart.tencentcloudapi.com")
    try:
        staged = await stager.stage(prepared(b"\xff\xd8\xff\xe0" + uuid.uuid4().bytes))
    finally:
        stager.close()
    assert staged.url is not None
    query = parse_qs(urlsplit(staged.url).query)
    assert query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"]
