"""tasks/png.py: the parallel PNG writer decodes to exactly the pixels it was given."""

from __future__ import annotations

import random
import zlib
from io import BytesIO

import pytest
from PIL import Image, ImageDraw

from tasks.png import _adler32_combine, encode_rgb_png


def _noisy(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    im = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    draw = ImageDraw.Draw(im)  # flat areas and edges as well as noise
    draw.rectangle((0, 0, width // 2, height // 3), fill=(250, 250, 250))
    draw.line((0, height - 1, width - 1, 0), fill=(0, 0, 0), width=3)
    return im


def _decoded(data: bytes) -> Image.Image:
    im = Image.open(BytesIO(data))
    im.load()  # also checks every chunk's CRC and the zlib stream's Adler-32
    return im


@pytest.mark.parametrize(
    ("size", "bands"),
    [
        ((1, 1), None),
        ((7, 1), 4),  # more bands than rows
        ((1, 9), 3),
        ((33, 17), 2),
        ((33, 17), 5),  # uneven bands
        ((640, 2001), None),  # large: one band per core
        ((640, 2001), 8),
    ],
)
def test_the_pixels_decode_exactly(size: tuple[int, int], bands: int | None) -> None:
    image = _noisy(*size, seed=size[0] * 31 + size[1])
    back = _decoded(encode_rgb_png(image, bands=bands))
    assert back.format == "PNG"
    assert back.mode == "RGB"
    assert back.size == size
    assert back.tobytes() == image.tobytes()


def test_other_modes_are_converted_to_rgb() -> None:
    image = _noisy(50, 40).convert("L")
    back = _decoded(encode_rgb_png(image, bands=3))
    assert back.mode == "RGB"
    assert back.tobytes() == image.convert("RGB").tobytes()


def test_a_flat_canvas_compresses_and_levels_are_lossless() -> None:
    flat = Image.new("RGB", (800, 1400), "white")
    small = encode_rgb_png(flat, level=1, bands=2)
    assert len(small) < 800 * 1400 * 3 // 100
    stored = encode_rgb_png(flat, level=0, bands=2)
    assert len(stored) > 800 * 1400 * 3
    assert _decoded(stored).tobytes() == flat.tobytes()


def test_the_stream_checksum_is_the_whole_streams() -> None:
    rng = random.Random(7)
    for _ in range(200):
        a, b = rng.randbytes(rng.randrange(0, 70_000)), rng.randbytes(rng.randrange(0, 70_000))
        combined = _adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b))
        assert combined == zlib.adler32(a + b)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        encode_rgb_png(Image.new("RGB", (2, 2)), level=10)
