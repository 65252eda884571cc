"""Staging prepared inputs for URL-only providers: written once, fetchable, refused when useless."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
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
            folder = first.url.rsplit("/", 1)[0]
            assert folder.endswith("/inputs")  # the URL of the folder, like a public base
            missing = await http.get(folder + "/nothing.jpg")
            assert missing.status_code == 404
            nested = await http.get(f"{folder}/sub/{image().sha256}.jpg")
            assert nested.status_code == 404  # direct children of inputs only
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


def test_refusal_says_what_to_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STAGING_BASE_URL_ENV, raising=False)
    with pytest.raises(ValueError) as refused:
        InputStager(Lake.open(str(tmp_path)), provider_base_url="https://aiart.tencentcloudapi.com")
    message = str(refused.value)
    assert f"serve the folder {tmp_path}/inputs at a public URL" in message
    assert f"fetched as <{STAGING_BASE_URL_ENV}>/<name>" in message


@pytest.mark.parametrize(
    ("base", "folder_url"),
    [
        ("https://cdn.example.com/tryon-inputs/", "https://cdn.example.com/tryon-inputs"),
        ("https://cdn.example.com/tryon-inputs", "https://cdn.example.com/tryon-inputs"),
        ("https://cdn.example.com/tryon/inputs/", "https://cdn.example.com/tryon/inputs"),
        ("https://cdn.example.com/", "https://cdn.example.com"),
        ("https://cdn.example.com", "https://cdn.example.com"),
        ("  http://10.1.2.3:8080/a/b//  ", "http://10.1.2.3:8080/a/b"),
    ],
)
async def test_public_base_is_the_url_of_the_inputs_folder(
    base: str, folder_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STAGING_BASE_URL_ENV, base)
    stager = InputStager(Lake.open(str(tmp_path)), provider_base_url="https://aiart.example.com")
    try:
        staged = await stager.stage(image())
    finally:
        stager.close()
    name = f"{image().sha256}.jpg"
    assert (tmp_path / "inputs" / name).read_bytes() == image().data
    # <lake>/inputs/<name> is <base>/<name>: no lake folder name is added to the base.
    assert staged.url == f"{folder_url}/{name}"
    assert stager._server is None  # the public base replaces the loopback server


@pytest.mark.parametrize(
    ("base", "problem", "secret"),
    [
        ("https://cdn.example.com/inputs/?sig=s3cr3t", "query string", "s3cr3t"),
        ("https://cdn.example.com/inputs?", "query string", None),
        ("https://cdn.example.com/inputs/#s3cr3t", "fragment", "s3cr3t"),
        ("https://user:s3cr3t@cdn.example.com/inputs/", "user info", "s3cr3t"),
        ("cdn.example.com/inputs/", "not an absolute http(s) URL", None),
        ("user:s3cr3t@cdn.example.com/inputs/", "not an absolute http(s) URL", "s3cr3t"),
        ("s3://bucket/lake/inputs", "not an absolute http(s) URL", None),
        ("file:///srv/lake/inputs", "not an absolute http(s) URL", None),
        ("https:///inputs/", "not an absolute http(s) URL", None),
        ("https://cdn.example.com:port/inputs/", "not an absolute http(s) URL", None),
    ],
)
def test_a_base_that_cannot_take_a_file_name_is_refused(
    base: str, problem: str, secret: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STAGING_BASE_URL_ENV, base)
    # Refused even for a loopback provider: a run must not start with a base it would misuse.
    with pytest.raises(ValueError, match=STAGING_BASE_URL_ENV) as refused:
        InputStager(Lake.open(str(tmp_path)), provider_base_url="http://127.0.0.1:9999")
    assert problem in str(refused.value)
    if secret is not None:
        assert secret not in str(refused.value)


def test_a_blank_base_counts_as_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STAGING_BASE_URL_ENV, "   ")
    with pytest.raises(ValueError, match="takes image URLs only"):
        InputStager(Lake.open(str(tmp_path)), provider_base_url="https://aiart.tencentcloudapi.com")


async def test_staged_url_is_fetchable_from_a_server_of_just_the_inputs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving <lake>/inputs under a path prefix, as the README says, is enough."""
    lake_dir = tmp_path / "lake"
    (lake_dir / "inputs").mkdir(parents=True)
    (lake_dir / "metadata").mkdir()
    (lake_dir / "metadata" / "x.parquet").write_bytes(b"private")
    root = tmp_path / "www"
    (root / "tryon").mkdir(parents=True)
    (root / "tryon" / "inputs").symlink_to(lake_dir / "inputs")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/tryon/inputs/"
        monkeypatch.setenv(STAGING_BASE_URL_ENV, base)
        stager = InputStager(Lake.open(str(lake_dir)), provider_base_url="https://aiart.example")
        try:
            staged = await stager.stage(image())
        finally:
            stager.close()
        assert staged.url == f"{base}{image().sha256}.jpg"
        async with httpx.AsyncClient() as http:
            response = await http.get(staged.url)
        assert response.status_code == 200 and response.content == image().data
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


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
