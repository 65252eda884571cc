"""tasks.images.fetch_bytes: every image reference takes one route, and hostile ones take none.

A real server on 127.0.0.1 (and on ::1 when the machine has it) serves a valid JPEG at every
path and a zip holding one, and counts accepted TCP connections, so an FTP or WebHDFS client
is seen as well as an HTTP one. Each hostile reference must be refused (UNSUPPORTED_SCHEME
before any IO, or FETCH_BLOCKED_ADDRESS from the guarded HTTP client) with the server never
contacted. Before the closed list, fsspec parsed these URLs itself: ``simplecache::http://...``
fetched the loopback image and ``ftp://`` connected wherever it was told.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import fsspec.core
import httpx
import pytest
from PIL import Image

from schemas.uris import image_ref_refusal
from tasks.fetch_guard import BLOCKED_CODE, LOOPBACK, FetchPolicy, inputs_http_client
from tasks.images import ImageInputError, fetch_bytes
from tests.s3server import S3Server

UNSUPPORTED = "UNSUPPORTED_SCHEME"


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.jpg", JPEG)
    return buffer.getvalue()


ZIP = _zip()


class _CountingServer(ThreadingHTTPServer):
    """Answers any GET with an image; counts every accepted connection, HTTP or not."""

    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.connections = 0
        self.lock = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.lock:
            self.connections += 1
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # an FTP client hanging up on an HTTP server is expected here

    @property
    def port(self) -> int:
        return self.server_address[1]


class _CountingServer6(_CountingServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _CountingServer
    timeout = 2  # a client waiting for a greeting (FTP) is dropped, not kept forever

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = ZIP if self.path.split("?", 1)[0].endswith(".zip") else JPEG
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET


@dataclass
class Servers:
    v4: _CountingServer
    v6: _CountingServer | None

    @property
    def connections(self) -> int:
        return self.v4.connections + (self.v6.connections if self.v6 else 0)


def _serve(server: _CountingServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _stop(server: _CountingServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    v4 = _CountingServer("127.0.0.1")
    _serve(v4)
    v6: _CountingServer | None = None
    if socket.has_ipv6:
        try:
            v6 = _CountingServer6("::1")
        except OSError:  # no IPv6 loopback on this machine
            v6 = None
        else:
            _serve(v6)
    yield Servers(v4, v6)
    _stop(v4)
    if v6 is not None:
        _stop(v6)


@pytest.fixture
async def guarded() -> AsyncIterator[httpx.AsyncClient]:
    """The client a run fetches inputs with, under the default policy."""
    async with inputs_http_client(FetchPolicy(), timeout=httpx.Timeout(3.0)) as client:
        yield client


# (reference with {port} / {port6} for the servers' ports, the code it must fail with)
HOSTILE: list[tuple[str, str]] = [
    ("simplecache::http://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("blockcache::http://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("filecache::http://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("zip://x.jpg::http://127.0.0.1:{port}/a.zip", UNSUPPORTED),
    ("SIMPLECACHE::HTTP://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("Simplecache::http://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    (" simplecache::http://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("simplecache::http://169.254.169.254/latest/meta-data/", UNSUPPORTED),
    ("simplecache::s3://bucket/x.jpg", UNSUPPORTED),
    ("ftp://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("FTP://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("webhdfs://127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("github://org:repo@main/x.jpg", UNSUPPORTED),
    ("reference://x.jpg", UNSUPPORTED),
    ("gs://bucket/x.jpg", UNSUPPORTED),
    ("http:127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("http:/x.jpg", UNSUPPORTED),
    ("https:127.0.0.1:{port}/x.jpg", UNSUPPORTED),
    ("HTTP://127.0.0.1:{port}/x.jpg", BLOCKED_CODE),
    ("http://localhost:{port}/x", BLOCKED_CODE),
    ("http://127.1:{port}/x", BLOCKED_CODE),
    ("http://0x7f000001:{port}/x", BLOCKED_CODE),
    ("http://2130706433:{port}/x", BLOCKED_CODE),
    ("http://[::1]:{port6}/x", BLOCKED_CODE),
    ("http://[::ffff:127.0.0.1]:{port}/x", BLOCKED_CODE),
]


@pytest.mark.parametrize(("template", "code"), HOSTILE, ids=[t for t, _ in HOSTILE])
async def test_hostile_references_are_refused_and_nothing_is_contacted(
    servers: Servers, guarded: httpx.AsyncClient, template: str, code: str
) -> None:
    if "{port6}" in template and servers.v6 is None:
        pytest.skip("no IPv6 loopback on this machine")
    port6 = servers.v6.port if servers.v6 is not None else 0
    uri = template.format(port=servers.v4.port, port6=port6)
    before = servers.connections
    with pytest.raises(ImageInputError) as info:
        await fetch_bytes(uri, http=guarded)
    await asyncio.sleep(0.05)  # a connection attempt would have been accepted by now
    assert servers.connections == before, f"{uri} reached the server"
    assert info.value.code == code, info.value
    assert not info.value.transient
    if code == UNSUPPORTED:
        # The fetch refuses with the reason validation gives (validation adds the column).
        assert info.value.message == image_ref_refusal(uri)
        assert str(servers.v4.port) not in info.value.message


async def test_the_counter_sees_a_fetch_that_is_allowed(servers: Servers) -> None:
    """Control: with loopback allowed, the same server is reached and counted."""
    policy = FetchPolicy(allow=LOOPBACK)
    before = servers.connections
    async with inputs_http_client(policy, timeout=httpx.Timeout(3.0)) as client:
        data = await fetch_bytes(f"HTTP://127.0.0.1:{servers.v4.port}/x.jpg", http=client)
    assert data == JPEG
    assert servers.connections == before + 1


@pytest.fixture
def no_fsspec_url_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the fetch hands a URL to fsspec's parser (which follows chains)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fsspec URL parsing used on an image reference")

    for name in ("url_to_fs", "open", "open_files", "get_fs_token_paths", "_un_chain"):
        monkeypatch.setattr(fsspec.core, name, refuse)
    monkeypatch.setattr(fsspec, "open", refuse)


@pytest.mark.usefixtures("no_fsspec_url_parsing")
async def test_allowed_routes_read_through_one_explicit_filesystem(
    guarded: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "p one.jpg").write_bytes(JPEG)
    memory = fsspec.filesystem("memory")
    memory.pipe("/fetch-routes/p.jpg", JPEG)
    monkeypatch.chdir(tmp_path)
    try:
        for uri in (
            str(tmp_path / "p one.jpg"),
            "p one.jpg",
            f"file://{tmp_path}/p one.jpg",
            f"FILE://{tmp_path}/p one.jpg",
            "memory://fetch-routes/p.jpg",
            "MEMORY://fetch-routes/p.jpg",
            "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(),
        ):
            assert await fetch_bytes(uri, http=guarded) == JPEG, uri
    finally:
        memory.rm("/fetch-routes", recursive=True)


async def test_s3_takes_bucket_and_key_from_the_url_and_the_endpoint_from_the_run(
    s3_server: S3Server, servers: Servers, guarded: httpx.AsyncClient
) -> None:
    s3_server.filesystem().pipe(f"{s3_server.bucket}/routes/p.jpg", JPEG)
    options = s3_server.storage_options
    for uri in (s3_server.uri("routes", "p.jpg"), f"S3A://{s3_server.bucket}/routes/p.jpg"):
        assert await fetch_bytes(uri, http=guarded, storage_options=options) == JPEG, uri
    # A host where the bucket goes is a bucket name at the run's endpoint, never a host.
    before = servers.connections
    with pytest.raises(ImageInputError):
        await fetch_bytes(
            f"s3://127.0.0.1:{servers.v4.port}/x.jpg", http=guarded, storage_options=options
        )
    await asyncio.sleep(0.05)
    assert servers.connections == before
