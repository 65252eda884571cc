"""What the provider contract tests and the emulator's own tests share: drawn images, a real
emulator with its control client, a real image host, a real client.

tests/providers/conftest.py and tests/emulator/conftest.py import the fixtures (``__all__``):
pytest finds fixtures among a conftest's names.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import SecretStr

from emulator import AsyncEmulatorControl, EmulatorConfig, EmulatorServer
from emulator.keys import accepted_key
from providers.base import PreparedImage
from providers.changeclothes.client import ChangeClothesClient

# The fixtures, for the conftests' star import (helpers are imported by name).
__all__ = [
    "_fresh_emulator",
    "api_key",
    "client",
    "control",
    "emulator",
    "garment",
    "http",
    "image_host",
    "person",
    "raw_post",
]

TRIAL_KEY = "trial-key-for-tests"
TRIAL_LIMIT = 2
DELETED_KEY = "key-of-a-deleted-user"
PERSON_SIZE = (384, 576)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def person_jpeg(shirt: tuple[int, int, int] = (20, 40, 120)) -> bytes:
    """A flat figure: head, torso (``shirt``), legs, on a light grey background."""
    w, h = PERSON_SIZE
    image = Image.new("RGB", (w, h), (205, 205, 210))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.4, h * 0.03, w * 0.6, h * 0.16), fill=(210, 170, 140))
    draw.rectangle((w * 0.28, h * 0.18, w * 0.72, h * 0.52), fill=shirt)
    draw.rectangle((w * 0.32, h * 0.52, w * 0.68, h * 0.95), fill=(90, 90, 90))
    return _jpeg(image)


def garment_jpeg(colour: tuple[int, int, int] = (220, 30, 30)) -> bytes:
    """A garment filling most of a white product shot."""
    image = Image.new("RGB", (400, 400), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((60, 50, 340, 360), fill=colour)
    return _jpeg(image)


def prepared(
    data: bytes, *, url: str | None = None, mime: str = "image/jpeg", source: str = "mem://image"
) -> PreparedImage:
    """Bytes -> ``PreparedImage`` as the preparation step would hand it to a client."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except OSError:  # deliberately broken bytes
        width, height = 1, 1
    return PreparedImage(
        data=data,
        mime=mime,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        source_uri=source,
        url=url,
    )


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def band_diff(a: np.ndarray, b: np.ndarray, top: float, bottom: float) -> float:
    """Mean absolute difference of two same-size images over rows [top, bottom), middle columns."""
    h, w = a.shape[:2]
    rows = slice(round(top * h), round(bottom * h))
    cols = slice(round(0.4 * w), round(0.6 * w))
    return float(np.abs(a[rows, cols] - b[rows, cols]).mean())


@pytest.fixture(scope="session")
def person() -> bytes:
    return person_jpeg()


@pytest.fixture(scope="session")
def garment() -> bytes:
    return garment_jpeg()


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(
        seed=7, deleted_user_keys=[DELETED_KEY], trial_keys={TRIAL_KEY: TRIAL_LIMIT}
    )
    with EmulatorServer.start(config) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_emulator(request: pytest.FixtureRequest) -> None:
    """Each test starts with zero stats, the configured faults and fresh account counters."""
    if "emulator" in request.fixturenames:
        server: EmulatorServer = request.getfixturevalue("emulator")
        server.control.reset(faults=True)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def api_key() -> SecretStr:
    return SecretStr(accepted_key("CHANGECLOTHES_API_KEY"))


@pytest.fixture
def client(
    http: httpx.AsyncClient, emulator: EmulatorServer, api_key: SecretStr
) -> ChangeClothesClient:
    return ChangeClothesClient(http=http, api_key=api_key, base_url=emulator.base_url)


@pytest.fixture
def control(http: httpx.AsyncClient, emulator: EmulatorServer) -> AsyncEmulatorControl:
    return AsyncEmulatorControl(emulator.base_url, http=http)


RawPost = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
def raw_post(http: httpx.AsyncClient, emulator: EmulatorServer, api_key: SecretStr) -> RawPost:
    """A hand-made request, for what the client would never send (no/odd auth, bad fields)."""

    async def post(
        path: str,
        fields: dict[str, str | tuple[str, bytes, str]],
        *,
        authorization: str | None = "default",
    ) -> httpx.Response:
        headers = {}
        if authorization == "default":
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        elif authorization is not None:
            headers["Authorization"] = authorization
        files = [(k, (None, v) if isinstance(v, str) else v) for k, v in fields.items()]
        return await http.post(emulator.base_url + path, files=files, headers=headers)

    return post


@dataclass
class ImageHost:
    """A plain HTTP server on loopback serving registered bytes (stands in for the lake)."""

    base_url: str = ""
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def add(self, name: str, data: bytes, mime: str = "image/jpeg") -> str:
        self.files[f"/{name}"] = (data, mime)
        return f"{self.base_url}/{name}"


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host.hits[self.path] += 1
            found = host.files.get(self.path)
            if found is None:
                self.send_error(404)
                return
            data, mime = found
            self.send_response(200)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield host
    server.shutdown()
    server.server_close()
