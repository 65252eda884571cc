"""Stage prepared inputs where a URL-only provider (Tencent) can fetch them.

Prepared images are written to the lake content-addressed (``<lake>/inputs/<sha256>.<ext>``,
so a rerun or a shared image is staged once) and handed to the provider as a URL:
- an object store that can presign (s3fs ``url()``) gives a presigned GET URL;
- otherwise (a local lake) a small file server on loopback serves ``<lake>/inputs``. That only
  works for a provider on this machine (the emulator): against a real endpoint the run refuses
  to start unless ``TRYON_STAGING_BASE_URL`` is set.

``TRYON_STAGING_BASE_URL`` is the public URL of the folder ``<lake>/inputs`` itself, and it wins
over the other two: ``<lake>/inputs/<name>`` is handed out as ``<base>/<name>``, so nothing else
of the lake needs to be public. ``parse_staging_base`` says what a base may look like.
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


def parse_staging_base(value: str) -> str:
    """A ``TRYON_STAGING_BASE_URL`` value as a base ``staged_url`` can join onto.

    It must be an absolute http(s) URL of the folder (any path prefix, trailing slash optional).
    A query string, fragment or user info is refused rather than guessed at: appending a name
    to ``...?token`` or ``...#x`` would put it in the wrong part of the URL, and such parts tend
    to carry credentials. Nothing but scheme, host and path is echoed in the error.
    """
    value = value.strip()
    parts = urlsplit(value)
    host = parts.netloc.rpartition("@")[2]
    shown = f": {parts.scheme}://{host}{parts.path}"
    problem = None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not _port_ok(value):
        problem, shown = "it is not an absolute http(s) URL", ""  # unparsed: echo none of it
    elif parts.query or parts.fragment or "?" in value or "#" in value:
        problem = "it has a query string or fragment, which a file name cannot be appended to"
    elif parts.username is not None or parts.password is not None:
        problem = "it carries user info; serve the folder without credentials in the URL"
    if problem:
        raise ValueError(
            f"{STAGING_BASE_URL_ENV} must be the http(s) URL of the folder <lake>/inputs "
            f"(e.g. https://cdn.example.com/tryon-inputs/), but {problem}{shown}"
        )
    return value.rstrip("/")


def _port_ok(url: str) -> bool:
    try:
        urlsplit(url).port  # noqa: B018 - parsing it is the check
    except ValueError:
        return False
    return True


def staged_url(base: str, name: str) -> str:
    """``<base>/<name>``: the URL of ``<lake>/inputs/<name>`` when ``base`` serves that folder."""
    return f"{base.rstrip('/')}/{name}"


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _InputsServer:
    """Serves the files of ``<lake>/inputs`` read-only on 127.0.0.1 at ``base_url``."""

    def __init__(self, lake: Lake) -> None:
        inputs = lake.path("inputs")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                name = path.removeprefix("/inputs/")
                # Only direct children of inputs: no other lake folder, no subfolder, no dotfile.
                if name == path or not name or "/" in name or name.startswith("."):
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
        # The same shape as a public base: the URL of the folder itself.
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/inputs"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class InputStager:
    """Gives each prepared image a URL a provider can GET. Close it when the run ends."""

    def __init__(self, lake: Lake, *, provider_base_url: str) -> None:
        self.lake = lake
        configured = os.environ.get(STAGING_BASE_URL_ENV, "").strip()
        self.public_base = parse_staging_base(configured) if configured else None
        self.presign = hasattr(lake.fs, "url") and not lake.fs.__class__.__name__.startswith(
            "Local"
        )
        if not (self.public_base or self.presign or is_loopback_url(provider_base_url)):
            raise ValueError(
                f"the provider at {provider_base_url} takes image URLs only, and a local lake "
                f"cannot give it any: use an s3:// lake (presigned URLs) or serve the folder "
                f"{lake.uri}/inputs at a public URL and set {STAGING_BASE_URL_ENV} to it "
                f"(<lake>/inputs/<name> is then fetched as <{STAGING_BASE_URL_ENV}>/<name>)"
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
            url = staged_url(self._base(), name)
        return replace(image, url=url)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
