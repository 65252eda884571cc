"""A corpus of bad (and merely unusual) input images in one manifest, through the whole flow.

Every image is generated here and served by a real HTTP server on 127.0.0.1 (or read from a
local path). Loopback is opened for this run with ``fetch_allow=["127.0.0.1"]`` (IPv4 loopback
only: ``[::1]``, link-local and private addresses stay refused). Each row's outcome is read
from the run's metadata in the lake: unusual-but-usable images must succeed; every bad one
must fail with its own specific error code, and the good rows beside them must succeed.
"""

from __future__ import annotations

import gzip
import io
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from PIL import Image

from emulator.server import EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, tryon_batch
from providers.changeclothes.settings import PROFILE as CHANGECLOTHES
from tasks.images import prepare_image

pytestmark = pytest.mark.e2e

FETCH_TIMEOUT_S = 3.0
SLOW_S = 10.0
ENDLESS_CAP = 1 << 30  # "endless": 1 GiB, far more than the 50 MiB fetch cap

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


# ------------------------------------------------------------------------------ the images


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **kw)
    return buffer.getvalue()


def photo(width: int = 600, height: int = 800, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth image with some texture (compresses like a photo, not like a flat colour)."""
    rng = random.Random(seed)
    grad = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 40).convert("L")
    channels = [Image.blend(grad, noise, rng.uniform(0.2, 0.5)) for _ in range(3)]
    return Image.merge("RGB", channels).convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, depth: int, colour: int, raw: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def bomb_png() -> bytes:
    """A few hundred bytes whose header claims 100000 x 100000 pixels (10 gigapixels)."""
    return crafted_png(100_000, 100_000, 8, 2, b"\0" * 64)


def huge_png() -> bytes:
    """A real, complete 20000 x 20000 1-bit PNG (one colour: about 50 kB on the wire)."""
    row = b"\0" + b"\0" * (20_000 // 8)  # filter byte + 2500 bytes of black pixels
    return crafted_png(20_000, 20_000, 1, 0, row * 20_000)


def rgb48_png() -> bytes:
    """16 bits per channel RGB (Pillow cannot write it): a horizontal ramp."""
    width, height = 400, 600
    line = b"".join(struct.pack(">HHH", x * 163, 65535 - x * 163, 32768) for x in range(width))
    return crafted_png(width, height, 16, 2, (b"\0" + line) * height)


def grey16_png() -> bytes:
    im = Image.linear_gradient("L").resize((400, 600)).convert("I")
    im = im.point(lambda v: v * 257).convert("I;16")
    return encode(im, "PNG")


def palette_transparent_png() -> bytes:
    im = photo(400, 600).quantize(64)
    data = encode(im, "PNG", transparency=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P" and "transparency" in check.info
    return data


def cmyk_jpeg() -> bytes:
    data = encode(photo(600, 800).convert("CMYK"), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    return data


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (400, 600), colour) for colour in (RED, GREEN, BLUE)]


def animated_gif() -> bytes:
    first, *rest = frames()
    return encode(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)


def animated_webp() -> bytes:
    first, *rest = frames()
    data = encode(first, "WEBP", save_all=True, append_images=rest, duration=100, lossless=True)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3
    return data


def exif_rotated_jpeg() -> bytes:
    """Stored landscape 800x600 with Orientation 6: shown (and to be sent) as portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(800, 600), "JPEG", quality=90, exif=exif.tobytes())


def truncated_jpeg() -> bytes:
    data = encode(photo(600, 800, seed=1), "JPEG", quality=90)
    return data[: len(data) * 6 // 10]


def corrupt_jpeg() -> bytes:
    # A JPEG start and then noise: no valid segment structure.
    return b"\xff\xd8\xff\xe0" + random.Random(7).randbytes(20_000)


HTML = b"<!doctype html><html><head><title>Login</title></head><body>Sign in</body></html>"


# ------------------------------------------------------------------------------ the server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.endless_sent = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hanging up mid-stream is part of the test

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        name = path.rsplit("/", 1)[-1]
        if path.startswith("/img/") and name in self.server.files:
            body, content_type = self.server.files[name]
            self._send(200, body, content_type)
        elif path.startswith("/gzip/") and name in self.server.files:
            body, content_type = self.server.files[name]
            self._send(200, gzip.compress(body), content_type, Content_Encoding="gzip")
        elif path == "/gzip-bomb.jpg":  # ~64 kB on the wire, 64 MiB once decoded
            self._send(
                200, gzip.compress(b"\0" * (64 << 20)), "image/jpeg", Content_Encoding="gzip"
            )
        elif path.startswith("/status/"):
            self._send(int(name), b"<html>error</html>", "text/html")
        elif path == "/slow.jpg":
            time.sleep(SLOW_S)
            self._send(200, b"late", "image/jpeg")
        elif path == "/loop-a.jpg":
            self._redirect("/loop-b.jpg")
        elif path == "/loop-b.jpg":
            self._redirect("/loop-a.jpg")
        elif path == "/to-metadata.jpg":
            self._redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
        elif path == "/endless.jpg":
            self._endless()
        else:
            self._send(404, b"", "text/plain")

    def _endless(self) -> None:
        # No Content-Length: the body ends when the server closes, i.e. never.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        self.close_connection = True
        chunk = b"\xff" * 65536
        try:
            while self.server.endless_sent < ENDLESS_CAP:
                self.wfile.write(chunk)
                self.server.endless_sent += len(chunk)
        except OSError:
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------- the corpus

# id -> (expected status, expected error code or None, transient?)
OK = ("succeeded", None, None)

EXPECTED: dict[str, tuple[str, str | None, bool | None]] = {
    # good rows beside the bad ones
    "good-http-jpeg": OK,
    "good-local-png": OK,
    "good-gzip-encoded": OK,
    # unusual but usable: prepared, then sent
    "cmyk-jpeg": OK,
    "png-16bit-grey": OK,
    "png-16bit-rgb": OK,
    "png-palette-transparency": OK,
    "gif-animated": OK,  # first frame
    "webp-animated": OK,  # first frame
    "png-named-jpg-http": OK,  # content decides, not the extension or Content-Type
    "png-named-jpg-local": OK,
    "jpeg-exif-rotated": OK,
    # bad content
    "jpeg-truncated": ("failed", "DECODE_FAILED", False),
    "jpeg-corrupt": ("failed", "DECODE_FAILED", False),
    "html-not-image": ("failed", "DECODE_FAILED", False),
    "empty-body": ("failed", "DECODE_FAILED", False),
    "pcx-format": ("failed", "FORMAT_NOT_ALLOWED", False),
    "png-bomb-header": ("failed", "DECOMPRESSION_BOMB", False),
    "png-20000x20000": ("failed", "DECOMPRESSION_BOMB", False),
    "png-1x1": ("failed", "TOO_SMALL", False),
    "extreme-aspect": ("failed", "ASPECT_RATIO", False),
    # bad fetches
    "unreachable-port": ("failed", "FETCH_CONNECTION", True),
    "http-404": ("failed", "FETCH_NOT_FOUND", False),
    "http-500": ("failed", "FETCH_HTTP_500", True),
    "slow-server": ("failed", "FETCH_TIMEOUT", True),
    "redirect-loop": ("failed", "FETCH_REDIRECTS", False),
    "endless-download": ("failed", "FETCH_TOO_LARGE", False),
    "gzip-bomb": ("failed", "FETCH_TOO_LARGE", False),
    # fetch safety: not in fetch_allow
    "metadata-link-local": ("failed", "FETCH_BLOCKED_ADDRESS", False),
    "private-10": ("failed", "FETCH_BLOCKED_ADDRESS", False),
    "ipv6-loopback": ("failed", "FETCH_BLOCKED_ADDRESS", False),
    "ipv4-mapped-ipv6-private": ("failed", "FETCH_BLOCKED_ADDRESS", False),
    "redirect-to-metadata": ("failed", "FETCH_BLOCKED_ADDRESS", False),
}


def build_corpus(server: _Server, tmp: Path) -> dict[str, str]:
    """Serve or write every case; return row id -> person image URI."""
    served = {
        "good.jpg": (encode(photo(600, 800, seed=2), "JPEG", quality=90), "image/jpeg"),
        "cmyk.jpg": (cmyk_jpeg(), "image/jpeg"),
        "grey16.png": (grey16_png(), "image/png"),
        "rgb48.png": (rgb48_png(), "image/png"),
        "palette.png": (palette_transparent_png(), "image/png"),
        "anim.gif": (animated_gif(), "image/gif"),
        "anim.webp": (animated_webp(), "image/webp"),
        "png-really.jpg": (encode(photo(500, 700, seed=3), "PNG"), "image/jpeg"),
        "rotated.jpg": (exif_rotated_jpeg(), "image/jpeg"),
        "truncated.jpg": (truncated_jpeg(), "image/jpeg"),
        "corrupt.jpg": (corrupt_jpeg(), "image/jpeg"),
        "page.jpg": (HTML, "text/html"),
        "empty.jpg": (b"", "image/jpeg"),
        "image.pcx": (encode(photo(400, 600), "PCX"), "image/x-pcx"),
        "bomb.png": (bomb_png(), "image/png"),
        "huge.png": (huge_png(), "image/png"),
        "tiny.png": (encode(Image.new("RGB", (1, 1), RED), "PNG"), "image/png"),
        "strip.jpg": (encode(photo(4000, 100), "JPEG"), "image/jpeg"),
    }
    server.files.update(served)
    local_png = tmp / "good.png"
    local_png.write_bytes(encode(photo(500, 700, seed=4), "PNG"))
    png_as_jpg = tmp / "really-a-png.jpg"
    png_as_jpg.write_bytes(encode(photo(500, 700, seed=5), "PNG"))
    base, port = server.base, server.server_address[1]
    img = f"{base}/img"
    return {
        "good-http-jpeg": f"{img}/good.jpg",
        "good-local-png": str(local_png),
        "good-gzip-encoded": f"{base}/gzip/good.jpg",
        "cmyk-jpeg": f"{img}/cmyk.jpg",
        "png-16bit-grey": f"{img}/grey16.png",
        "png-16bit-rgb": f"{img}/rgb48.png",
        "png-palette-transparency": f"{img}/palette.png",
        "gif-animated": f"{img}/anim.gif",
        "webp-animated": f"{img}/anim.webp",
        "png-named-jpg-http": f"{img}/png-really.jpg",
        "png-named-jpg-local": str(png_as_jpg),
        "jpeg-exif-rotated": f"{img}/rotated.jpg",
        "jpeg-truncated": f"{img}/truncated.jpg",
        "jpeg-corrupt": f"{img}/corrupt.jpg",
        "html-not-image": f"{img}/page.jpg",
        "empty-body": f"{img}/empty.jpg",
        "pcx-format": f"{img}/image.pcx",
        "png-bomb-header": f"{img}/bomb.png",
        "png-20000x20000": f"{img}/huge.png",
        "png-1x1": f"{img}/tiny.png",
        "extreme-aspect": f"{img}/strip.jpg",
        "unreachable-port": f"http://127.0.0.1:{closed_port()}/person.jpg",
        "http-404": f"{base}/status/404",
        "http-500": f"{base}/status/500",
        "slow-server": f"{base}/slow.jpg",
        "redirect-loop": f"{base}/loop-a.jpg",
        "endless-download": f"{base}/endless.jpg",
        "gzip-bomb": f"{base}/gzip-bomb.jpg",
        "metadata-link-local": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "private-10": "http://10.0.0.1/person.jpg?sig=s3cret",
        "ipv6-loopback": f"http://[::1]:{port}/img/good.jpg",
        "ipv4-mapped-ipv6-private": "http://[::ffff:192.168.0.1]/person.jpg",
        "redirect-to-metadata": f"{base}/to-metadata.jpg",
    }


async def test_bad_input_corpus_gets_a_specific_outcome_per_row(
    use_emulator: EmulatorServer, server: _Server, tmp_path: Path
) -> None:
    people = build_corpus(server, tmp_path)
    assert set(people) == set(EXPECTED)
    garment = tmp_path / "garment.png"
    garment.write_bytes(encode(photo(512, 640, seed=9), "PNG"))
    rows = [
        {
            "id": row_id,
            "person_image": uri,
            "garment_image": str(garment),
            "category": "upper_body",
            "garment_description": row_id,  # distinct work per row
        }
        for row_id, uri in people.items()
    ]
    manifest = tmp_path / "manifest.csv"
    pl.DataFrame(rows).write_csv(manifest)
    lake = tmp_path / "lake"

    started = time.perf_counter()
    with pytest.raises(BatchIncomplete) as caught:
        await tryon_batch(
            BatchParams(
                manifest=str(manifest),
                lake=str(lake),
                max_attempts=2,  # transient fetch errors: retried once, then recorded
                fetch_allow=["127.0.0.1"],  # this test's servers; nothing else
                fetch_timeout_s=FETCH_TIMEOUT_S,
            )
        )
    elapsed = time.perf_counter() - started

    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    assert meta.height == len(EXPECTED)
    outcomes = {
        r["row_id"]: (r["status"], r["error_code"], r["error_kind"], r["error_message"])
        for r in meta.iter_rows(named=True)
    }
    wrong = {}
    for row_id, (status, code, transient) in EXPECTED.items():
        got_status, got_code, got_kind, message = outcomes[row_id]
        kind = None if transient is None else ("transient" if transient else "permanent")
        if (got_status, got_code, got_kind) != (status, code, kind):
            wrong[row_id] = f"expected {(status, code, kind)}, got {outcomes[row_id]}"
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())

    succeeded = meta.filter(pl.col("status") == "succeeded")
    for output in succeeded["output_uri"]:
        assert Path(output).is_file()
    summary = caught.value.summary
    n_ok = sum(1 for s, _, _ in EXPECTED.values() if s == "succeeded")
    assert summary.counts == {"succeeded": n_ok, "failed": len(EXPECTED) - n_ok}

    # Refusals name the host and the address class, never the path or the query.
    for row_id in ("metadata-link-local", "private-10", "redirect-to-metadata"):
        message = outcomes[row_id][3]
        assert "169.254.169.254" in message or "10.0.0.1" in message
        assert "security-credentials" not in message and "s3cret" not in message
    assert "link-local" in outcomes["metadata-link-local"][3]
    # The size cap stopped the endless body while it streamed: nowhere near its GiB.
    assert server.endless_sent < 256 << 20
    # Timeouts were short: the slow row did not hold the run for its SLOW_S per attempt.
    assert elapsed < 120


# -------------------------------------- what "succeeded" must mean for the unusual images


def prepared(data: bytes) -> Image.Image:
    image = prepare_image(data, profile=CHANGECLOTHES, source_uri="corpus")
    return Image.open(io.BytesIO(image.data))


@pytest.mark.parametrize("make", [animated_gif, animated_webp], ids=["gif", "webp"])
def test_animated_inputs_use_their_first_frame(make: Any) -> None:
    with prepared(make()) as im:
        r, g, b = im.convert("RGB").resize((1, 1)).getpixel((0, 0))
    assert r > 180 and g < 80 and b < 80  # RED: the first frame


def test_exif_rotated_input_is_sent_upright() -> None:
    with prepared(exif_rotated_jpeg()) as im:
        assert im.height > im.width


def test_transparent_palette_is_flattened_onto_white() -> None:
    im = Image.new("P", (400, 600), 0)
    im.putpalette([0, 0, 0] * 2 + [0] * (256 - 2) * 3)
    im.paste(1, (100, 100, 300, 500))
    with prepared(encode(im, "PNG", transparency=0)) as out:
        assert out.convert("RGB").getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("make", [grey16_png, rgb48_png], ids=["grey16", "rgb48"])
def test_16_bit_inputs_keep_their_tones(make: Any) -> None:
    with prepared(make()) as out:
        lo, hi = out.convert("RGB").getchannel("R").getextrema()  # R ramps in both images
    assert lo < 40 and hi > 200  # scaled to 8 bits, not clipped to white or black


def test_cmyk_input_is_converted_not_inverted() -> None:
    source = photo(600, 800, seed=6)
    data = encode(source.convert("CMYK"), "JPEG", quality=95)
    with prepared(data) as out:
        got = out.convert("RGB").resize((1, 1)).getpixel((0, 0))
    want = source.resize((1, 1)).getpixel((0, 0))
    assert all(abs(a - b) < 40 for a, b in zip(got, want, strict=True)), (got, want)
