"""Staging prepared inputs for URL-only providers: written once, fetchable, refused when useless."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from providers.base import PreparedImage
from tasks.lake import Lake
from tasks.staging import STAGING_BASE_URL_ENV, InputStager, is_loopback_url


def image(data: bytes = b"\xff\xd8\xff fake jpeg bytes") -> PreparedImage:
    return PreparedImage(
        data=data,
        mime="image/jpeg",
        width=600,
        height=800,
        sha256=hashlib.sha256(data).hexdigest(),
        source_uri="person.jpg",
    )


async def test_local_lake_serves_staged_inputs_on_loopback(tmp_path: Path) -> None:
    lake = Lake.open(str(tmp_path))
    stager = InputStager(lake, provider_base_url="http://127.0.0.1:9999")
    try:
        first = await stager.stage(image())
        again = await stager.stage(image())
        assert first.url == again.url and first.url is not None
        assert first.url.startswith("http://127.0.0.1:")
        staged = tmp_path / "inputs" / f"{image().sha256}.jpg"
        assert staged.read_bytes() == image().data  # content-addressed, written once
        async with httpx.AsyncClient() as http:
            response = await http.get(first.url)
            assert response.status_code == 200 and response.content == image().data
            assert response.headers["content-type"] == "image/jpeg"
            missing = await http.get(first.url.rsplit("/", 1)[0] + "/nothing.jpg")
            assert missing.status_code == 404
            outside = await http.get(first.url.split("/inputs/")[0] + "/metadata/x.parquet")
            assert outside.status_code == 404  # only <lake>/inputs is served
    finally:
        stager.close()


def test_local_lake_with_a_remote_provider_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STAGING_BASE_URL_ENV, raising=False)
    with pytest.raises(ValueError, match="takes image URLs only"):
        InputStager(Lake.open(str(tmp_path)), provider_base_url="https://aiart.tencentcloudapi.com")


async def test_public_staging_base_url_is_used_when_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STAGING_BASE_URL_ENV, "https://cdn.example.com/lake-inputs/")
    stager = InputStager(Lake.open(str(tmp_path)), provider_base_url="https://aiart.example.com")
    staged = await stager.stage(image())
    assert staged.url == f"https://cdn.example.com/lake-inputs/inputs/{image().sha256}.jpg"
    stager.close()


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000/x", True),
        ("http://localhost/x", True),
        ("http://[::1]:80/", True),
        ("https://10.0.0.1/", False),
        ("https://example.com/", False),
    ],
)
def test_is_loopback_url(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback
