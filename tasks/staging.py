"""Stage prepared inputs where a URL-only provider (Tencent) can fetch them.

Prepared images are written to the lake content-addressed (``<lake>/inputs/<sha256>.<ext>``,
so a rerun or a shared image is staged once) and handed to the provider as a URL:
- an object store that can presign (s3fs ``url()``) gives a presigned GET URL;
- otherwise (a local lake) a small file server on loopback serves ``<lake>/inputs``. That only
  works for a provider on this machine (the emulator): against a real endpoint the run refuses
  to start unless ``TRYON_STAGING_BASE_URL`` names a public URL serving ``<lake>/inputs``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import posixpath
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from providers.base import PreparedImage
from tasks.lake import Lake

STAGING_BASE_URL_ENV = "TRYON_STAGING_BASE_URL"
MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
PRESIGN_EXPIRES_S = 6 * 3600  # longer than any poll deadline: a staged URL must not expire first


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _InputsServer:
    """Serves ``<lake>/inputs/<name>`` read-only on 127.0.0.1 (names are content hashes)."""

    def __init__(self, lake: Lake) -> None:
        inputs = lake.path("inputs")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = posixpath.basename(urlsplit(self.path).path)
                if not self.path.startswith("/inputs/") or name.startswith("."):
                    self.send_error(404)
                    return
                try:
                    data = lake.fs.cat_file(posixpath.join(inputs, name))
                except FileNotFoundError:
                    self.send_error(404)
                    return
                self.send_response(200)
                kind = (
                    "png" if name.endswith(".png") else "webp" if name.endswith(".webp") else "jpeg"
                )
                self.send_header("Content-Type", f"image/{kind}")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class InputStager:
    """Gives each prepared image a URL a provider can GET. Close it when the run ends."""

    def __init__(self, lake: Lake, *, provider_base_url: str) -> None:
        self.lake = lake
        self.public_base = os.environ.get(STAGING_BASE_URL_ENV, "").rstrip("/") or None
        self.presign = hasattr(lake.fs, "url") and not lake.fs.__class__.__name__.startswith(
            "Local"
        )
        if not (self.public_base or self.presign or is_loopback_url(provider_base_url)):
            raise ValueError(
                f"the provider at {provider_base_url} takes image URLs only, and a local lake "
                f"cannot give it any: use an s3:// lake (presigned URLs) or set "
                f"{STAGING_BASE_URL_ENV} to a public URL serving {lake.uri}/inputs"
            )
        self._server: _InputsServer | None = None
        self._staged: set[str] = set()
        self._lock = asyncio.Lock()

    def _base(self) -> str:
        if self.public_base:
            return self.public_base
        if self._server is None:
            self._server = _InputsServer(self.lake)
        return self._server.base_url

    async def stage(self, image: PreparedImage) -> PreparedImage:
        """The same image with ``url`` set, written to the lake once per content hash."""
        name = f"{image.sha256}.{image.extension}"
        path = self.lake.path("inputs", name)
        if name not in self._staged:
            async with self._lock:
                if name not in self._staged:
                    exists = await asyncio.to_thread(self.lake.fs.exists, path)
                    if not exists:
                        await self.lake.awrite_bytes(path, image.data)
                    self._staged.add(name)
        if self.presign and not self.public_base:
            url = await asyncio.to_thread(self.lake.fs.url, path, expires=PRESIGN_EXPIRES_S)
        else:
            url = f"{self._base()}/inputs/{name}"
        return replace(image, url=url)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
