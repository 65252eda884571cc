"""tasks.images: every image is generated here; HTTP goes to a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import pickle
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import httpx
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image, ImageChops, ImageCms, ImageOps

from providers.base import PreparedImage
from providers.registry import BUILT_IN, REFINER
from schemas.image_profile import ImageProfile
from tasks.images import (
    ImageInputError,
    PreparedImageCache,
    display_uri,
    fetch_and_prepare,
    fetch_bytes,
    image_profile_fits,
    prepare,
    prepare_image,
    resize,
)

JPEG_PROFILE = ImageProfile(name="t-jpeg", min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024)
PNG_PROFILE = ImageProfile(
    name="t-png", min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024, formats=("PNG",)
)
RED = (255, 0, 0)
WHITE = (255, 255, 255)


# ------------------------------------------------------------------------------------ helpers


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def decoded(prepared: PreparedImage) -> Image.Image:
    img = Image.open(io.BytesIO(prepared.data))
    img.load()
    return img


def prep(data: bytes, profile: ImageProfile = JPEG_PROFILE, **kwargs: Any) -> PreparedImage:
    return prepare_image(data, profile=profile, source_uri="test://image", **kwargs)


def refused(code: str, data: bytes, profile: ImageProfile = JPEG_PROFILE, **kw: Any) -> str:
    with pytest.raises(ImageInputError) as info:
        prep(data, profile, **kw)
    assert info.value.code == code, str(info.value)
    assert not info.value.transient
    return info.value.message


def near(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel[:3], expected, strict=True))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def small_png(color: tuple[int, int, int] = (10, 120, 200), size: int = 300) -> bytes:
    return encode(Image.new("RGB", (size, size), color), "PNG")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int, *, valid_data: bool = True) -> bytes:
    """A real 1-bit greyscale PNG of one colour: tiny file, ``width*height`` pixels decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    if valid_data:
        row = b"\x00" * (1 + (width + 7) // 8)
        packer = zlib.compressobj(9)
        rows_per_chunk = 1000
        parts = [packer.compress(row * rows_per_chunk) for _ in range(height // rows_per_chunk)]
        parts.append(packer.compress(row * (height % rows_per_chunk)))
        idat = b"".join(parts) + packer.flush()
    else:
        idat = b"garbage: decoding this would fail" * 4
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------ big EXIF JPEG


@pytest.fixture(scope="module")
def rotated_jpeg() -> bytes:
    """6000x4000 stored, EXIF Orientation 6, a red block in the stored top-left corner."""
    height, width = 4000, 6000
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.empty((height, width, 3), np.float32)
    arr[..., 0] = 30  # keep red out of the background so the marker is unambiguous
    arr[..., 1] = 60 + 150 * x / width
    arr[..., 2] = 60 + 150 * y / height
    arr += rng.normal(0, 6, arr.shape)
    arr[:600, :600] = RED
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def test_large_exif_rotated_jpeg_is_upright_fitted_and_marker_moves(rotated_jpeg: bytes) -> None:
    out = prep(rotated_jpeg)
    img = decoded(out)
    assert (out.width, out.height) == img.size == (1365, 2048)  # portrait: rotated 90
    assert out.height > out.width and max(img.size) <= JPEG_PROFILE.max_side
    assert out.mime == "image/jpeg" and img.format == "JPEG" and img.mode == "RGB"
    # Orientation 6 = rotate 90 clockwise: the stored top-left lands top-right.
    assert near(img.getpixel((img.width - 40, 40)), RED, tol=40)
    for corner in ((40, 40), (40, img.height - 40), (img.width - 40, img.height - 40)):
        assert not near(img.getpixel(corner), RED, tol=60), corner
    # Metadata is not carried over: no orientation left to apply twice.
    assert 0x0112 not in img.getexif()
    assert out.sha256 == hashlib.sha256(out.data).hexdigest()
    assert out.source_uri == "test://image"
    assert image_profile_fits(out.data, JPEG_PROFILE)
    assert not image_profile_fits(rotated_jpeg, JPEG_PROFILE)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation: int) -> None:
    img = Image.new("RGB", (600, 400), (0, 0, 200))
    img.paste(RED, (0, 0, 150, 100))  # marker in the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    out = decoded(prep(data))
    assert out.size == reference.size
    for x_frac in (0.1, 0.9):
        for y_frac in (0.1, 0.9):
            xy = (int(out.width * x_frac), int(out.height * y_frac))
            assert near(out.getpixel(xy), reference.getpixel(xy)[:3], tol=40), xy


# --------------------------------------------------------------------------------- colour modes


def test_png_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (400, 300), (0, 0, 255, 0))  # transparent, hidden blue
    img.paste((0, 200, 0, 255), (200, 0, 400, 150))  # opaque green
    img.paste((0, 0, 0, 128), (200, 150, 400, 300))  # half-transparent black
    out = decoded(prep(encode(img, "PNG"), PNG_PROFILE))
    assert out.mode == "RGB"
    assert out.getpixel((50, 50)) == WHITE
    assert out.getpixel((300, 50)) == (0, 200, 0)
    assert near(out.getpixel((300, 250)), (127, 127, 127), tol=2)


@pytest.mark.parametrize(("mode", "fmt"), [("LA", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF")])
def test_other_alpha_inputs_are_composited_on_white(mode: str, fmt: str) -> None:
    img = Image.new("LA", (300, 300), (40, 0))
    img.paste((40, 255), (150, 0, 300, 300))
    params = {"lossless": True} if fmt == "WEBP" else {}
    out = decoded(prep(encode(img.convert(mode), fmt, **params), PNG_PROFILE))
    assert out.getpixel((10, 10)) == WHITE
    assert near(out.getpixel((290, 10)), (40, 40, 40), tol=1)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt: str) -> None:
    img = Image.new("P", (300, 300), 0)
    img.putpalette([*RED, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (150, 0, 300, 300))
    out = decoded(prep(encode(img, fmt, transparency=0), PNG_PROFILE))
    assert out.getpixel((10, 10)) == WHITE  # index 0 (red) is the transparent one
    assert out.getpixel((290, 10)) == (0, 0, 255)


def test_cmyk_jpeg_comes_out_rgb_with_the_right_colour() -> None:
    img = Image.new("RGB", (400, 400), RED)
    img.paste((0, 0, 255), (200, 0, 400, 400))
    data = encode(img.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decoded(prep(data))
    assert out.mode == "RGB"
    assert near(out.getpixel((50, 200)), RED, tol=30)
    assert near(out.getpixel((350, 200)), (0, 0, 255), tol=30)


@pytest.mark.parametrize(("fmt", "dtype"), [("PNG", "<u2"), ("TIFF", "<u2"), ("TIFF", ">u2")])
def test_16_bit_grey_is_scaled_not_clipped(fmt: str, dtype: str) -> None:
    arr = np.full((300, 300), 32768, dtype=dtype)
    arr[:, 100:200] = 65535
    arr[:, 200:] = 1000  # 1000/256 ~ 4: a clip would make this 255
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    out = decoded(prep(encode(src, fmt), PNG_PROFILE))
    assert out.mode == "RGB"
    assert near(out.getpixel((50, 150)), (128, 128, 128), tol=1)
    assert near(out.getpixel((150, 150)), (255, 255, 255), tol=1)
    assert near(out.getpixel((250, 150)), (4, 4, 4), tol=1)


def test_32_bit_int_grey_within_16_bit_range_is_scaled() -> None:
    arr = np.full((300, 300), 32768, dtype=np.int32)
    out = decoded(prep(encode(Image.fromarray(arr), "TIFF"), PNG_PROFILE))
    assert near(out.getpixel((150, 150)), (128, 128, 128), tol=1)


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grey_become_rgb(mode: str) -> None:
    img = Image.new(mode, (300, 300), 0)
    img.paste(255 if mode == "L" else 1, (150, 0, 300, 300))
    out = decoded(prep(encode(img, "PNG"), PNG_PROFILE))
    assert out.mode == "RGB"
    assert out.getpixel((10, 10)) == (0, 0, 0)
    assert out.getpixel((290, 10)) == WHITE


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (300, 300), c) for c in (RED, (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert near(decoded(prep(data, PNG_PROFILE)).getpixel((150, 150)), RED, tol=2)


def test_no_exif_or_icc_carried_over() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(Image.new("RGB", (400, 300), (90, 40, 10)), "JPEG", exif=exif, icc_profile=icc)
    for profile in (JPEG_PROFILE, PNG_PROFILE):
        out = prep(data, profile)
        img = decoded(out)
        assert "icc_profile" not in img.info and "exif" not in img.info
        assert b"SecretCam" not in out.data
        assert near(img.getpixel((200, 150)), (90, 40, 10), tol=6)


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("WEBP", "image/webp")])
def test_output_format_follows_the_profile(fmt: str, mime: str) -> None:
    profile = ImageProfile(name="f", min_side=64, max_side=512, max_bytes=1 << 20, formats=(fmt,))
    out = prep(small_png(size=600), profile)
    assert out.mime == mime and decoded(out).format == fmt
    assert (out.width, out.height) == (512, 512)


# ---------------------------------------------------------------------------------- geometry


def test_tiny_image_is_too_small() -> None:
    message = refused("TOO_SMALL", encode(Image.new("RGB", (8, 8), RED), "PNG"))
    assert "8x8" in message and "256" in message


def test_small_image_is_upscaled_to_min_side() -> None:
    out = prep(encode(Image.new("RGB", (100, 150), RED), "PNG"))
    assert (out.width, out.height) == (256, 384)
    assert decoded(out).size == (256, 384)


def test_large_image_is_downscaled_keeping_aspect() -> None:
    out = prep(encode(Image.new("RGB", (3000, 1000), RED), "PNG"))
    assert (out.width, out.height) == (2048, 683)


def test_image_within_limits_keeps_its_size() -> None:
    out = prep(encode(Image.new("RGB", (640, 480), RED), "PNG"))
    assert (out.width, out.height) == (640, 480)


@pytest.mark.parametrize("size", [(4000, 100), (100, 4000), (30, 1000)])
def test_extreme_aspect_ratio_is_refused(size: tuple[int, int]) -> None:
    message = refused("ASPECT_RATIO", encode(Image.new("RGB", size, RED), "PNG"))
    assert f"{size[0]}x{size[1]}" in message and "min_side 256" in message


# ------------------------------------------------------------------------------- byte limits


@pytest.mark.parametrize("as_base64", [False, True])
def test_too_many_bytes_steps_quality_then_scale_but_keeps_min_side(as_base64: bool) -> None:
    profile = ImageProfile(
        name="tight", min_side=256, max_side=1024, max_bytes=120_000, bytes_as_base64=as_base64
    )
    data = encode(noise_image(1024, 768), "PNG")
    assert len(data) > 2_000_000
    out = prep(data, profile)
    assert profile.encoded_size(len(out.data)) <= profile.max_bytes
    assert min(out.width, out.height) >= profile.min_side
    assert out.width < 1024  # noise at q55 still does not fit 1024x768: it had to shrink
    assert abs(out.width / out.height - 1024 / 768) < 0.01
    assert decoded(out).size == (out.width, out.height)


def test_png_profile_over_byte_limit_is_scaled_down() -> None:
    profile = ImageProfile(
        name="png-tight", min_side=128, max_side=1024, max_bytes=400_000, formats=("PNG",)
    )
    out = prep(encode(noise_image(800, 800), "PNG"), profile)
    assert len(out.data) <= profile.max_bytes and min(out.width, out.height) >= 128


def test_cannot_fit_bytes() -> None:
    profile = ImageProfile(name="hopeless", min_side=1000, max_side=1024, max_bytes=1024)
    message = refused("CANNOT_FIT_BYTES", encode(noise_image(1024, 1024), "PNG"), profile)
    assert "max_bytes 1024" in message and "hopeless" in message


# -------------------------------------------------------------------------- hostile / invalid


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(30_000, 30_000)


def test_decompression_bomb_is_refused_before_decoding(bomb: bytes) -> None:
    assert len(bomb) < 1_000_000  # 900 megapixels in a tiny file
    assert struct.unpack(">II", bomb[16:24]) == (30_000, 30_000)
    started = time.perf_counter()
    message = refused("DECOMPRESSION_BOMB", bomb)
    assert time.perf_counter() - started < 1.0  # decoding 900 MP would take far longer
    assert "900000000" in message


def test_our_pixel_limit_applies_from_the_header_alone() -> None:
    # The pixel data is garbage: decoding would fail with DECODE_FAILED, so getting
    # DECOMPRESSION_BOMB proves the refusal happened before any decoding.
    data = png_bomb(5000, 5000, valid_data=False)
    message = refused("DECOMPRESSION_BOMB", data, max_pixels=10_000_000)
    assert "25000000" in message and "10000000" in message
    refused("DECODE_FAILED", data, max_pixels=30_000_000)


def test_default_pixel_limit_is_100_megapixels() -> None:
    data = png_bomb(11_000, 10_000)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow's own, lower, warning level
        message = refused("DECOMPRESSION_BOMB", data)
    assert "110000000" in message


@pytest.mark.parametrize(
    "data",
    [b"", b"this is plain text, not an image at all" * 10, b"\x89PNG\r\n\x1a\n" + b"\0" * 50],
)
def test_non_image_bytes_fail_to_decode(data: bytes) -> None:
    refused("DECODE_FAILED", data)


def test_truncated_jpeg_fails_to_decode() -> None:
    data = encode(noise_image(600, 400), "JPEG", quality=90)
    refused("DECODE_FAILED", data[: len(data) // 2])


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, I am a private note: s3cr3t-token-XYZ\n" * 4,
        # A PNG whose first chunk is not IHDR: Pillow's own message quotes the chunk name.
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"sEcR", b"s3cr3t-token-XYZ"),
        # A valid header over a body that is someone's text.
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 300, 300, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", b"s3cr3t-token-XYZ" * 8),
        b"\xff\xd8\xff\xe0" + b"s3cr3t-token-XYZ" * 8,
    ],
)
def test_decode_errors_carry_no_file_content(data: bytes) -> None:
    """A manifest may point at any file the worker can read: no byte of it in the message."""
    with pytest.raises(ImageInputError) as caught:
        prepare_image(data, profile=JPEG_PROFILE, source_uri="/srv/notes.txt")
    message = str(caught.value)
    assert caught.value.code == "DECODE_FAILED"
    for fragment in (b"hello", b"s3cr3t", b"sEcR", b"XYZ"):
        assert fragment.decode() not in message
    assert "\\x" not in message and "b'" not in message and 'b"' not in message


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "TGA"])
def test_readable_but_disallowed_formats_are_named(fmt: str) -> None:
    data = encode(Image.new("RGB", (256, 256), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow can read it...
    message = refused("FORMAT_NOT_ALLOWED", data)  # ...but it is not on the list
    assert fmt in message


def test_allowed_formats_can_be_narrowed() -> None:
    data = encode(Image.new("RGB", (300, 300), RED), "JPEG")
    assert "JPEG" in refused("FORMAT_NOT_ALLOWED", data, allowed_formats=("PNG",))


# --------------------------------------------------------------------------- error & display


def test_error_str_pickle_and_kind() -> None:
    exc = ImageInputError("FETCH_TIMEOUT", "x timed out", transient=True)
    assert str(exc) == "FETCH_TIMEOUT: x timed out"
    again = pickle.loads(pickle.dumps(exc))
    assert (again.code, again.message, again.transient) == ("FETCH_TIMEOUT", "x timed out", True)
    assert exc.kind == "transient" and ImageInputError("X", "y").kind == "permanent"


def test_display_uri_hides_credentials_queries_and_inline_data() -> None:
    shown = display_uri("https://bob:hunter2@example.com/a/b.jpg?X-Amz-Signature=abc123#frag")
    assert "hunter2" not in shown and "abc123" not in shown and "bob" not in shown
    assert shown.startswith("https://***@example.com/a/b.jpg")
    long_data = "data:image/png;base64," + "A" * 12_000
    assert display_uri(long_data) == "data:image/png;base64,...(12022 chars)"


# ------------------------------------------------------------------------------ fetch: local


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client


async def test_fetch_data_uri_base64_and_percent_encoded(http: httpx.AsyncClient) -> None:
    png = small_png()
    b64 = base64.b64encode(png).decode()
    assert await fetch_bytes(f"data:image/png;base64,{b64}", http=http) == png
    unpadded = base64.urlsafe_b64encode(png).decode().rstrip("=")
    assert await fetch_bytes(f"DATA:image/png;BASE64,{unpadded}", http=http) == png
    quoted = urllib.parse.quote(png)
    assert await fetch_bytes(f"data:image/png,{quoted}", http=http) == png


@pytest.mark.parametrize(
    "uri",
    ["data:image/png;base64", "data:image/png;base64,@@not*base64!!" + "A" * 5000, "data:,"],
)
async def test_malformed_data_uri(http: httpx.AsyncClient, uri: str) -> None:
    with pytest.raises(ImageInputError) as info:
        await fetch_bytes(uri, http=http)
    assert info.value.code == "BAD_DATA_URI" and not info.value.transient
    assert "A" * 100 not in str(info.value)  # the payload is never echoed


async def test_data_uri_over_max_bytes(http: httpx.AsyncClient) -> None:
    uri = "data:image/png;base64," + base64.b64encode(small_png(size=600)).decode()
    with pytest.raises(ImageInputError, match="FETCH_TOO_LARGE"):
        await fetch_bytes(uri, http=http, max_bytes=100)


async def test_fetch_local_absolute_relative_and_file_url(
    http: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = small_png()
    path = tmp_path / "pic one.png"
    path.write_bytes(png)
    assert await fetch_bytes(str(path), http=http) == png
    assert await fetch_bytes(f"file://{path}", http=http) == png
    monkeypatch.chdir(tmp_path)
    assert await fetch_bytes("pic one.png", http=http) == png


async def test_fetch_local_errors(http: httpx.AsyncClient, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 5000)
    cases = {
        str(tmp_path / "missing.png"): "FETCH_NOT_FOUND",
        f"file://{tmp_path}/missing.png": "FETCH_NOT_FOUND",
        str(big): "FETCH_TOO_LARGE",
        str(tmp_path): "FETCH_NOT_A_FILE",
    }
    for uri, code in cases.items():
        with pytest.raises(ImageInputError) as info:
            await fetch_bytes(uri, http=http, max_bytes=1000)
        assert info.value.code == code, uri
        assert not info.value.transient


async def test_fetch_memory_fsspec(http: httpx.AsyncClient) -> None:
    png = small_png()
    fs = fsspec.filesystem("memory")
    fs.pipe("/test_images/pic.png", png)
    try:
        assert await fetch_bytes("memory://test_images/pic.png", http=http) == png
        with pytest.raises(ImageInputError, match="FETCH_NOT_FOUND"):
            await fetch_bytes("memory://test_images/nope.png", http=http)
    finally:
        fs.rm("/test_images", recursive=True)


@pytest.mark.parametrize(
    ("uri", "named"),
    [
        ("foo://x", "URI scheme 'foo' is not allowed"),
        ("gs://bucket/p.png", "URI scheme 'gs' is not allowed"),
        ("GCS://bucket/p.png", "URI scheme 'gcs' is not allowed"),
        ("ftp://user:hunter22@host/p.png", "URI scheme 'ftp' is not allowed"),
        ("simplecache::foo://x/y.png", "chained fsspec URLs ('simplecache::...')"),
        ("simplecache::s3://bucket/p.png", "chained fsspec URLs ('simplecache::...')"),
        ("nope::memory://a", "chained fsspec URLs ('nope::...')"),
        ("memory://a::http://h/p.png", "chained fsspec URLs ('memory::...')"),
        ("file:/tmp/p.png", "malformed file URL"),
        ("s3:bucket/p.png", "malformed s3 URL"),
    ],
)
async def test_unsupported_schemes_are_refused_before_any_io(
    http: httpx.AsyncClient, uri: str, named: str
) -> None:
    with pytest.raises(ImageInputError) as info:
        await fetch_bytes(uri, http=http)
    assert info.value.code == "UNSUPPORTED_SCHEME" and not info.value.transient
    assert named in info.value.message
    assert "hunter22" not in str(info.value)


async def test_empty_uri(http: httpx.AsyncClient) -> None:
    with pytest.raises(ImageInputError, match="BAD_URI"):
        await fetch_bytes("  ", http=http)


async def test_fsspec_reads_do_not_block_the_event_loop(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory:// whose reads block for a while, like a slow network filesystem."""
    plain_open = MemoryFileSystem._open

    def slow_open(self: MemoryFileSystem, path: str, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return plain_open(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", slow_open)
    fsspec.filesystem("memory").pipe("/slow/pic.png", small_png())
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        data = await fetch_bytes("memory://slow/pic.png", http=http)
    finally:
        task.cancel()
        fsspec.filesystem("memory").rm("/slow", recursive=True)
    assert data == small_png()
    assert ticks >= 10  # the loop kept running during the 0.3 s blocking read


# ------------------------------------------------------------------------------- fetch: HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.endless_sent = 0
        self.endless_done = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-stream is what some tests do on purpose

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


ENDLESS_CAP = 1 << 30  # "endless": 1 GiB, far more than any test reads


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/jpeg") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.hits[path] += 1
        if path.startswith("/img/"):
            body = self.server.files.get(path.removeprefix("/img/"))
            self._send(200, body) if body is not None else self._send(404)
        elif path.startswith("/slowimg/"):
            time.sleep(0.3)
            self._send(200, self.server.files[path.removeprefix("/slowimg/")])
        elif path.startswith("/status/"):
            self._send(int(path.removeprefix("/status/")), b"nope", "text/plain")
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, b"late")
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img/pic.png")
            self.end_headers()
        elif path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(ENDLESS_CAP))
            self.end_headers()
            self.wfile.write(b"\0" * 1024)
        elif path == "/endless":
            self._endless()
        else:
            self._send(404)

    def _endless(self) -> None:
        # HTTP/1.0 without Content-Length: the body ends when the server closes.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        chunk = b"\xff" * 65536
        try:
            while self.server.endless_sent < ENDLESS_CAP:
                self.wfile.write(chunk)
                self.server.endless_sent += len(chunk)
        except OSError:
            pass
        finally:
            self.server.endless_done.set()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    srv.files["pic.png"] = small_png()
    srv.files["shared.jpg"] = encode(noise_image(900, 700, seed=3), "JPEG", quality=90)
    srv.files["junk.jpg"] = b"not an image" * 50
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


async def fetch_error(uri: str, client: httpx.AsyncClient, **kw: Any) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        await fetch_bytes(uri, http=client, **kw)
    return info.value


async def test_http_image_and_redirect(server: _Server, http: httpx.AsyncClient) -> None:
    assert await fetch_bytes(f"{server.base}/img/pic.png", http=http) == server.files["pic.png"]
    assert await fetch_bytes(f"{server.base}/redirect", http=http) == server.files["pic.png"]


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (404, "FETCH_NOT_FOUND", False),
        (410, "FETCH_NOT_FOUND", False),
        (403, "FETCH_HTTP_403", False),
        (400, "FETCH_HTTP_400", False),
        (500, "FETCH_HTTP_500", True),
        (503, "FETCH_HTTP_503", True),
        (429, "FETCH_HTTP_429", True),
    ],
)
async def test_http_status_classification(
    server: _Server, http: httpx.AsyncClient, status: int, code: str, transient: bool
) -> None:
    exc = await fetch_error(f"{server.base}/status/{status}", http)
    assert (exc.code, exc.transient) == (code, transient)
    assert str(status) in exc.message


async def test_http_error_message_hides_credentials(
    server: _Server, http: httpx.AsyncClient
) -> None:
    port = server.server_address[1]
    exc = await fetch_error(f"http://me:s3cret@127.0.0.1:{port}/status/404?token=abc999", http)
    assert "s3cret" not in str(exc) and "abc999" not in str(exc)
    assert "/status/404" in str(exc)


async def test_http_timeout_is_transient(server: _Server) -> None:
    async with httpx.AsyncClient(timeout=0.2) as client:
        started = time.perf_counter()
        exc = await fetch_error(f"{server.base}/slow", client)
    assert (exc.code, exc.transient) == ("FETCH_TIMEOUT", True)
    assert time.perf_counter() - started < 1.2


async def test_http_connection_refused_is_transient(http: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exc = await fetch_error(f"http://127.0.0.1:{port}/x.jpg", http)
    assert (exc.code, exc.transient) == ("FETCH_CONNECTION", True)


async def test_http_endless_stream_is_aborted_while_streaming(
    server: _Server, http: httpx.AsyncClient
) -> None:
    server.endless_done.clear()
    server.endless_sent = 0
    exc = await fetch_error(f"{server.base}/endless", http, max_bytes=1_000_000)
    assert (exc.code, exc.transient) == ("FETCH_TOO_LARGE", False)
    assert "aborted" in exc.message
    assert server.endless_done.wait(10), "server kept streaming after the client gave up"
    # Only what fit in socket buffers went out beyond our 1 MB; nowhere near the full GiB.
    assert server.endless_sent < 64 * 1024 * 1024


async def test_http_declared_length_over_limit(server: _Server, http: httpx.AsyncClient) -> None:
    exc = await fetch_error(f"{server.base}/declared-huge", http, max_bytes=1_000_000)
    assert exc.code == "FETCH_TOO_LARGE" and "Content-Length" in exc.message


async def test_fetch_and_prepare_over_http(server: _Server, http: httpx.AsyncClient) -> None:
    uri = f"{server.base}/img/shared.jpg"
    out = await fetch_and_prepare(uri, http=http, profile=JPEG_PROFILE)
    assert (out.width, out.height) == (900, 700) and out.source_uri == uri
    with pytest.raises(ImageInputError, match="DECODE_FAILED"):
        await fetch_and_prepare(f"{server.base}/img/junk.jpg", http=http, profile=JPEG_PROFILE)


# -------------------------------------------------------------------------------------- cache


async def test_cache_single_flight_for_concurrent_gets(
    server: _Server, http: httpx.AsyncClient
) -> None:
    path = "/img/shared.jpg"
    before = server.hits[path]
    cache = PreparedImageCache()
    uri = server.base + path
    results = await asyncio.gather(
        *(cache.get(uri, http=http, profile=JPEG_PROFILE) for _ in range(20))
    )
    assert server.hits[path] - before == 1
    assert all(r is results[0] for r in results)
    assert (cache.misses, cache.hits, len(cache)) == (1, 19, 1)

    other = await cache.get(uri, http=http, profile=PNG_PROFILE)  # different profile: new entry
    assert server.hits[path] - before == 2
    assert other.mime == "image/png" and len(cache) == 2

    assert await cache.get(uri, http=http, profile=JPEG_PROFILE) is results[0]
    assert server.hits[path] - before == 2
    assert (cache.misses, cache.hits) == (2, 20)


async def test_cache_remembers_permanent_failures_only(
    server: _Server, http: httpx.AsyncClient
) -> None:
    cache = PreparedImageCache()
    for path, code, fetches in [
        ("/status/404", "FETCH_NOT_FOUND", 1),
        ("/img/junk.jpg", "DECODE_FAILED", 1),
        ("/status/503", "FETCH_HTTP_503", 3),
    ]:
        before = server.hits[path]
        for _ in range(3):
            with pytest.raises(ImageInputError) as info:
                await cache.get(server.base + path, http=http, profile=JPEG_PROFILE)
            assert info.value.code == code
        assert server.hits[path] - before == fetches, path


async def test_cache_caller_cancellation_does_not_cancel_the_shared_load(
    server: _Server, http: httpx.AsyncClient
) -> None:
    path = "/slowimg/pic.png"
    before = server.hits[path]
    cache = PreparedImageCache()
    first = asyncio.create_task(cache.get(server.base + path, http=http, profile=JPEG_PROFILE))
    second = asyncio.create_task(cache.get(server.base + path, http=http, profile=JPEG_PROFILE))
    await asyncio.sleep(0.05)
    first.cancel()
    result = await second
    assert first.cancelled()
    assert result.width == 300 and server.hits[path] - before == 1


async def test_cache_is_bounded_by_bytes_lru(http: httpx.AsyncClient) -> None:
    uris = [
        "data:image/png;base64,"
        + base64.b64encode(encode(noise_image(300, 300, s), "PNG")).decode()
        for s in range(3)
    ]
    first = await PreparedImageCache().get(uris[0], http=http, profile=JPEG_PROFILE)
    cache = PreparedImageCache(max_bytes=int(len(first.data) * 2.5))
    for uri in uris:
        await cache.get(uri, http=http, profile=JPEG_PROFILE)
    assert len(cache) == 2 and cache.size_bytes <= cache.max_bytes
    await cache.get(uris[2], http=http, profile=JPEG_PROFILE)  # most recent: still held
    assert (cache.misses, cache.hits) == (3, 1)
    await cache.get(uris[0], http=http, profile=JPEG_PROFILE)  # oldest: evicted, prepared again
    assert (cache.misses, cache.hits) == (4, 1)


# ------------------------------------------------------------------- resize speed-ups (prep)


def _gradient(width: int, height: int, *, noise: float = 0.0, seed: int = 0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([40 + 150 * x / width, 60 + 120 * y / height, 200 - 100 * x / width], -1)
    if noise:
        arr += np.random.default_rng(seed).normal(0, noise, (height, width, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _stripes(width: int, height: int, period: float = 3.0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    wave = 60 * np.sin(2 * np.pi * (x + 0.3 * y) / period)
    return Image.fromarray(
        np.clip(np.asarray(_gradient(width, height)) + wave[..., None], 0, 255).astype(np.uint8)
    )


@pytest.fixture
def two_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Band-parallel resizing on, with two workers, whatever this machine's core count."""
    monkeypatch.setattr(resize, "_BAND_WORKERS", 2)


@pytest.mark.parametrize(
    ("src", "out"),
    [
        ((3000, 2000), (2048, 1365)),  # JPEG draft of a 6000x4000 photo -> 2048 (columns)
        ((3000, 2000), (2000, 1333)),  # -> Tencent's 2000 (columns: the rows do not split)
        ((2400, 1600), (1638, 1092)),  # rows
    ],
)
@pytest.mark.parametrize(
    "resample",
    [Image.Resampling.HAMMING, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS],
)
def test_band_parallel_resize_equals_a_single_resize(
    two_bands: None,
    src: tuple[int, int],
    out: tuple[int, int],
    resample: Image.Resampling,
) -> None:
    img = noise_image(*src, seed=src[0])
    assert out[0] * out[1] >= resize._BAND_MIN_PIXELS
    assert resize._band_boxes(src, out) is not None  # the parallel path is really taken
    banded = resize.banded_resize(img, out, resample)
    single = img.resize(out, resample)
    assert banded.size == out and banded.mode == "RGB"
    assert ImageChops.difference(banded, single).getbbox() is None


def test_band_parallel_resize_is_exact_on_many_sizes(
    two_bands: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resize, "_BAND_MIN_PIXELS", 0)
    rng = np.random.default_rng(7)
    filters = sorted(resize._BAND_FILTERS)
    split = 0
    for index in range(160):
        sw, sh = (int(v) for v in rng.integers(40, 500, 2))
        w, h = int(rng.integers(20, sw + 1)), int(rng.integers(20, sh + 1))
        resample = filters[index % len(filters)]
        img = noise_image(sw, sh, seed=index)
        split += resize._band_boxes((sw, sh), (w, h)) is not None
        banded = np.asarray(resize.banded_resize(img, (w, h), resample))
        assert np.array_equal(banded, np.asarray(img.resize((w, h), resample))), (
            (sw, sh),
            (w, h),
            resample,
        )
    assert split > 50
    # Other filters (BOX's hard edges) are never split.
    assert resize.banded_resize(noise_image(300, 300), (200, 200), Image.Resampling.BOX) == (
        noise_image(300, 300).resize((200, 200), Image.Resampling.BOX)
    )


def test_small_resizes_and_reducing_gap_stay_single_calls(
    two_bands: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pool() -> Any:
        raise AssertionError("the band pool must not be used")

    monkeypatch.setattr(resize, "_band_executor", no_pool)
    small = noise_image(600, 400)
    assert resize.banded_resize(small, (300, 200), Image.Resampling.LANCZOS).size == (300, 200)
    big = noise_image(6000, 600)  # 4.6x with reducing_gap 2: Pillow reduces first
    out = resize.banded_resize(big, (1300, 130), Image.Resampling.LANCZOS, reducing_gap=2.0)
    expected = big.resize((1300, 130), Image.Resampling.LANCZOS, reducing_gap=2.0)
    assert ImageChops.difference(out, expected).getbbox() is None


def _filter_used(monkeypatch: pytest.MonkeyPatch, data: bytes) -> list[Image.Resampling]:
    used: list[Image.Resampling] = []
    real = resize.banded_resize

    def spy(im: Image.Image, size: tuple[int, int], resample: Any, **kw: Any) -> Image.Image:
        used.append(resample)
        return real(im, size, resample, **kw)

    monkeypatch.setattr(prepare, "banded_resize", spy)
    out = prep(data)
    assert max(out.width, out.height) == JPEG_PROFILE.max_side
    return used


_PROBE_CASES: dict[str, Any] = {
    "smooth": (lambda: _gradient(3000, 2000), Image.Resampling.HAMMING),
    "faint-noise": (lambda: _gradient(3000, 2000, noise=2), Image.Resampling.HAMMING),
    "noisy": (lambda: _gradient(3000, 2000, noise=6), Image.Resampling.LANCZOS),
    "dense-stripes": (lambda: _stripes(3000, 2000, period=3.0), Image.Resampling.LANCZOS),
    "stripes": (lambda: _stripes(3000, 2000, period=6.0), Image.Resampling.LANCZOS),
}


@pytest.mark.parametrize("case", sorted(_PROBE_CASES))
def test_non_draft_residual_downscale_uses_a_cheaper_filter_only_when_the_probe_agrees(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    make, expected = _PROBE_CASES[case]
    # BMP: no JPEG draft, so the 3000 -> 2048 (1.46x) resize is the whole downscale.
    assert _filter_used(monkeypatch, encode(make(), "BMP")) == [expected]


def test_bicubic_is_a_candidate_only_after_a_jpeg_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    noisy = _gradient(3000, 2000, noise=6)
    assert resize.residual_filter(noisy, 1.46) == Image.Resampling.LANCZOS
    assert (
        resize.residual_filter(noisy, 1.46, resize.DRAFT_PROBE_CANDIDATES)
        == Image.Resampling.BICUBIC
    )
    # 6000 wide: drafted to 3000 by the decoder, then 3000 -> 2048 after a passing probe. The
    # Pillow path, as for JPEGs libvips does not take (CMYK, a non-sRGB profile, no pyvips).
    monkeypatch.setattr(prepare, "_vips_source", lambda *_: None)
    jpeg = encode(_gradient(6000, 1600, noise=12), "JPEG", quality=90)
    assert _filter_used(monkeypatch, jpeg) == [Image.Resampling.BICUBIC]


def test_probe_keeps_lanczos_exactly_on_dense_texture() -> None:
    img = _stripes(3000, 2000, period=2.5)
    assert resize.residual_filter(img, 3000 / 2048) == Image.Resampling.LANCZOS
    out = prep(encode(img, "BMP"), PNG_PROFILE)  # lossless output: compare pixels exactly
    expected = img.resize((2048, 1365), Image.Resampling.LANCZOS)
    assert ImageChops.difference(decoded(out).convert("RGB"), expected).getbbox() is None


# Every built-in profile, the refiner's included.
PROFILES = {spec.name: spec.profile for spec in (*BUILT_IN.values(), REFINER)}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_large_photo_fits_every_provider_profile(rotated_jpeg: bytes, name: str) -> None:
    profile = PROFILES[name]
    out = prep(rotated_jpeg, profile)
    assert image_profile_fits(out.data, profile)
    img = decoded(out)
    assert img.size == (out.width, out.height)
    assert max(img.size) <= profile.max_side and min(img.size) >= profile.min_side
    assert img.width < img.height  # EXIF orientation 6 applied
    assert profile.encoded_size(len(out.data)) <= profile.max_bytes
