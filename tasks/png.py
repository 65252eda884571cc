"""Lossless PNG for large RGB canvases (the contact sheet), deflated on every core.

Pillow's PNG writer runs on one core and tries every scanline filter: on a 800 x 14,000 sheet it
took ~0.67 s at level 1 (~0.4 s even at level 0), at the very end of a run when nothing else is
left to do. Here the scanlines come from raw copies of the pixels, ~1 MiB of rows at a time,
with the "None" filter (the raw encoder's stride pads each row with the zero byte that is the
next row's filter type), horizontal bands are deflated in parallel threads (zlib releases the
GIL), and the raw deflate pieces are joined into one zlib stream: each band but the last ends
with a sync flush (byte-aligned, not final) and the stream's Adler-32 is combined from the
bands'. ~3x faster on two cores for a ~30% larger file; the pixels decode exactly the same.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from PIL import Image

__all__ = ["encode_rgb_png"]

_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_ADLER_BASE: Final = 65521
# Below this many pixels one band on the calling thread is quicker than starting threads.
_PARALLEL_MIN_PIXELS: Final = 1_000_000
# Rows are copied out of the image about this many bytes at a time.
_SLICE_BYTES: Final = 1 << 20


def encode_rgb_png(image: Image.Image, *, level: int = 1, bands: int | None = None) -> bytes:
    """``image`` (converted to RGB) as PNG bytes, deflated at ``level`` in ``bands`` parallel
    horizontal bands (default: one per core for a large image, else one)."""
    if not 0 <= level <= 9:
        raise ValueError(f"level must be 0-9, got {level}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    if width == 0 or height == 0:
        raise ValueError(f"cannot encode an empty image ({width}x{height})")
    if bands is None:
        cores = os.cpu_count() or 1
        bands = min(cores, 8) if width * height >= _PARALLEL_MIN_PIXELS else 1
    bands = max(1, min(bands, height))
    stride = 3 * width + 1
    rows_per_band = -(-height // bands)
    edges = [(top, min(height, top + rows_per_band)) for top in range(0, height, rows_per_band)]
    last = len(edges) - 1
    rows_per_slice = max(1, _SLICE_BYTES // stride)

    def deflate(index: int) -> tuple[list[bytes], int, int]:
        """Rows ``top:bottom`` as raw deflate pieces, their Adler-32 and their length, a slice
        of rows at a time (memory holds one slice's copy, not the image's)."""
        top, bottom = edges[index]
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw: no zlib header
        out: list[bytes] = []
        adler = 1  # Adler-32 of nothing
        for y in range(top, bottom, rows_per_slice):
            rows = rgb.crop((0, y, width, min(bottom, y + rows_per_slice)))
            # Each row's bytes and then one zero byte (the stride's padding): after a leading
            # zero, that is PNG's scanline layout, each row behind its filter type 0 (None).
            padded = memoryview(rows.tobytes("raw", "RGB", stride))
            for part in (b"\0", padded[:-1]):
                out.append(compressor.compress(part))
                adler = zlib.adler32(part, adler)
        out.append(compressor.flush(zlib.Z_FINISH if index == last else zlib.Z_SYNC_FLUSH))
        return out, adler, (bottom - top) * stride

    if last == 0:
        pieces = [deflate(0)]
    else:
        with ThreadPoolExecutor(max_workers=len(edges)) as pool:
            pieces = list(pool.map(deflate, range(len(edges))))
    adler = pieces[0][1]
    for _, piece_adler, piece_len in pieces[1:]:
        adler = _adler32_combine(adler, piece_adler, piece_len)
    # CMF 0x78: deflate, 32 KiB window; FLG 0x01: fastest level, no dictionary, check bits.
    idat = [b"\x78\x01", *(part for deflated, _, _ in pieces for part in deflated)]
    idat.append(struct.pack(">I", adler))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    # One copy of the compressed data: the IDAT chunk is assembled from its parts in the join.
    crc = zlib.crc32(b"IDAT")
    for part in idat:
        crc = zlib.crc32(part, crc)
    return b"".join(
        [
            _SIGNATURE,
            _chunk(b"IHDR", header),
            struct.pack(">I", sum(len(part) for part in idat)),
            b"IDAT",
            *idat,
            struct.pack(">I", crc),
            _chunk(b"IEND", b""),
        ]
    )


def _adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """Adler-32 of A + B from Adler-32(A), Adler-32(B) and len(B) (zlib's adler32_combine)."""
    rem = len2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 += (adler2 & 0xFFFF) + _ADLER_BASE - 1
    sum2 += (adler1 >> 16) + (adler2 >> 16) + _ADLER_BASE - rem
    sum1 %= _ADLER_BASE
    sum2 %= _ADLER_BASE
    return sum1 | (sum2 << 16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
