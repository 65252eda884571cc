"""Inputs recognised from their sources: a rerun computes finished rows' work keys from the
source index, fetching and decoding nothing; a source changed in place is prepared again."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from schemas.image_profile import ImageProfile
from tasks.images import ImageInputError, PreparedImageCache
from tasks.images.sources import MERGE_PARTS, SourceIndex, identify_source, source_key
from tasks.lake import Lake
from tests.images import garment_jpeg, person_jpeg
from tests.input_server import InputServer

PROFILE = ImageProfile(name="test", min_side=64, max_side=256, max_bytes=1 << 20)
OTHER = ImageProfile(name="test", min_side=64, max_side=200, max_bytes=1 << 20)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def inputs() -> Iterator[InputServer]:
    server = InputServer({"a.jpg": person_jpeg(), "b.jpg": person_jpeg(), "c.jpg": garment_jpeg()})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def rerun_cache(lake: Lake, first: PreparedImageCache) -> PreparedImageCache:
    """What the next run starts with: the first run's new entries flushed, the index read."""
    first.sources.flush()
    return PreparedImageCache(sources=SourceIndex.load(lake, "run-2"))


async def test_a_rerun_knows_local_files_without_decoding_them(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    photo = tmp_path / "person.jpg"
    photo.write_bytes(person_jpeg())
    first = PreparedImageCache(sources=SourceIndex.load(lake, "run-1"))
    prepared = await first.get(str(photo), http=http, profile=PROFILE)
    assert first.prepared == 1

    again = rerun_cache(lake, first)
    sha = await again.sha256(str(photo), http=http, profile=PROFILE)
    assert sha == prepared.sha256
    assert (again.prepared, again.recognised) == (0, 1)
    # Another profile is another preparation: not known yet.
    other = await again.sha256(str(photo), http=http, profile=OTHER)
    assert other != sha and again.prepared == 1


async def test_a_file_changed_in_place_is_prepared_again_even_with_its_old_size_and_mtime(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    photo = tmp_path / "person.jpg"
    # Two different photos of one size (bytes after a JPEG's end are ignored by decoders).
    old, new = person_jpeg(shirt=(20, 40, 120)), person_jpeg(shirt=(200, 40, 20))
    size = max(len(old), len(new))
    old, new = old.ljust(size, b"\0"), new.ljust(size, b"\0")
    photo.write_bytes(old)
    first = PreparedImageCache(sources=SourceIndex.load(lake, "run-1"))
    before = (await first.get(str(photo), http=http, profile=PROFILE)).sha256
    stat = photo.stat()

    photo.write_bytes(new)
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p / touch -d
    assert photo.stat().st_size == len(new) and photo.stat().st_mtime_ns == stat.st_mtime_ns

    again = rerun_cache(lake, first)
    after = await again.sha256(str(photo), http=http, profile=PROFILE)
    assert (again.prepared, again.recognised) == (1, 0)
    assert after != before


async def test_http_sources_are_fetched_once_and_named_by_their_bytes(
    tmp_path: Path, http: httpx.AsyncClient, inputs: InputServer
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    first = PreparedImageCache(sources=SourceIndex.load(lake, "run-1"))
    sha_a = await first.sha256(inputs.url("/img/a.jpg"), http=http, profile=PROFILE)
    assert inputs.requests()["/img/a.jpg"] == 1  # named and prepared from one GET
    # The cache's own image for the same key: no second fetch.
    assert (await first.get(inputs.url("/img/a.jpg"), http=http, profile=PROFILE)).sha256 == sha_a
    assert inputs.requests()["/img/a.jpg"] == 1

    again = rerun_cache(lake, first)
    # The same bytes under another URL are the same source.
    assert await again.sha256(inputs.url("/img/b.jpg"), http=http, profile=PROFILE) == sha_a
    assert await again.sha256(inputs.url("/img/a.jpg"), http=http, profile=PROFILE) == sha_a
    assert (again.prepared, again.recognised) == (0, 2)
    assert await again.sha256(inputs.url("/img/c.jpg"), http=http, profile=PROFILE) != sha_a
    assert again.prepared == 1


async def test_concurrent_rows_share_one_fetch_of_a_source(
    tmp_path: Path, http: httpx.AsyncClient, inputs: InputServer
) -> None:
    import asyncio

    cache = PreparedImageCache(sources=SourceIndex.load(Lake.open(str(tmp_path / "l")), "r"))
    url = inputs.url("/img/a.jpg")
    hashes = await asyncio.gather(
        *(cache.sha256(url, http=http, profile=PROFILE) for _ in range(8))
    )
    assert len(set(hashes)) == 1
    assert inputs.requests()["/img/a.jpg"] == 1 and cache.prepared == 1


async def test_a_missing_source_fails_as_it_always_did_and_is_remembered(
    tmp_path: Path, http: httpx.AsyncClient, inputs: InputServer
) -> None:
    cache = PreparedImageCache()
    for uri, code in [
        (str(tmp_path / "nope.jpg"), "FETCH_NOT_FOUND"),
        (inputs.url("/status/404"), "FETCH_NOT_FOUND"),
    ]:
        for _ in range(2):
            with pytest.raises(ImageInputError) as info:
                await cache.sha256(uri, http=http, profile=PROFILE)
            assert info.value.code == code
    assert inputs.requests()["/status/404"] == 1  # the permanent failure was remembered


async def test_s3_sources_are_named_by_etag(
    s3_server: object, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    from tests.s3server import S3Server

    assert isinstance(s3_server, S3Server)
    fs = s3_server.filesystem()
    uri = s3_server.uri("sources-test", "person.jpg")
    fs.pipe_file(uri, person_jpeg())
    options = s3_server.storage_options
    first = await identify_source(uri, http=http, storage_options=options)
    again = await identify_source(uri, http=http, storage_options=options)
    assert first is not None and first == again and first.data is None
    assert first.identity.startswith("s3:") and "etag=" in first.identity
    fs.pipe_file(uri, person_jpeg(shirt=(1, 2, 3)))
    changed = await identify_source(uri, http=http, storage_options=options)
    assert changed is not None and changed.identity != first.identity
    missing = await identify_source(
        s3_server.uri("sources-test", "nope.jpg"), http=http, storage_options=options
    )
    assert missing is None


def test_index_parts_round_trip_merge_and_survive_a_bad_part(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    for n in range(MERGE_PARTS + 1):
        index = SourceIndex(lake, f"run-{n}")
        index.remember(source_key(f"sha256:{n:064x}", PROFILE), f"{n:064x}")
        assert index.flush() is not None
        assert index.flush() is None  # nothing new: no part
    (tmp_path / "lake" / "sources" / "broken.parquet").write_bytes(b"not parquet")
    parts = sorted((tmp_path / "lake" / "sources").glob("*.parquet"))
    assert len(parts) == MERGE_PARTS + 2

    loaded = SourceIndex.load(lake, "run-x")
    assert len(loaded) == MERGE_PARTS + 1
    assert loaded.get(source_key(f"sha256:{3:064x}", PROFILE)) == f"{3:064x}"
    merged = sorted((tmp_path / "lake" / "sources").glob("*.parquet"))
    assert len(merged) == 1 and merged[0].name.startswith("merged-")
    assert len(SourceIndex.load(lake, "run-y")) == MERGE_PARTS + 1
