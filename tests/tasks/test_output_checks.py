"""``check_output``: each problem a result can have is refused with its own code and a message
giving the figure against the limit; photo-like try-ons, and results re-encoded or resized by a
provider, pass. ``store_result`` checks before it writes anything to the lake.

Every test runs three times: every format decoded by Pillow, the default (libvips for PNG), and
libvips for every format it may take; the verdicts may not depend on the decoder. Damaged
results get Pillow's verdict whichever decoder is asked first."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import SecretStr

from bench.data import synthetic_photo
from providers.base import ProviderError, TryOnResult
from providers.changeclothes.client import ChangeClothesClient
from schemas.results import ErrorKind, RowRecord, Status
from tasks import output_checks
from tasks.images import PreparedImageCache, vips
from tasks.lake import Lake
from tasks.output_checks import (
    MAX_OUTPUT_PIXELS,
    MIN_OUTPUT_SIDE,
    VIPS_FORMATS,
    check_output,
    image_extension,
)
from tasks.provider_calls import store_result
from tasks.run_context import Lane, RunContext
from tests.images import person_jpeg, prepared

SIZE = (768, 1024)
UPPER = (0.28, 0.18, 0.72, 0.52)  # an upper-body garment's share of the frame: 15%
SMALL = (0.40, 0.30, 0.60, 0.45)  # an accessory's: 3%
PILLOW: frozenset[str] = frozenset()
ALL_VIPS = frozenset({"JPEG", "PNG", "WEBP"})
DECODINGS = {"pillow": PILLOW, "default": VIPS_FORMATS, "vips": ALL_VIPS}


@pytest.fixture(autouse=True, params=list(DECODINGS))
def decoding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The formats libvips decodes in this test (``check_output``'s default, so
    ``store_result`` too). Tests that compare decoders themselves parametrize it away."""
    monkeypatch.setattr(output_checks, "VIPS_FORMATS", DECODINGS[request.param])
    return str(request.param)


ACROSS_DECODERS = pytest.mark.parametrize("decoding", ["each"])  # runs once, compares all three


def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 85} if fmt in ("JPEG", "WEBP") else {}) | params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A photo-like person picture (smooth light, soft shapes, fabric texture, noise)."""
    return synthetic_photo(20261121, SIZE, noise=2.0)


@pytest.fixture(scope="module")
def other_photo() -> Image.Image:
    return synthetic_photo(20266121, SIZE, noise=2.0)


def edited(
    image: Image.Image, region: tuple[float, ...], edit: Callable[[Any], Any]
) -> Image.Image:
    """``image`` with ``edit`` applied to the pixels of ``region`` (fractions of the frame)."""
    pixels = np.asarray(image, dtype=np.float32).copy()
    h, w = pixels.shape[:2]
    left, top, right, bottom = region
    rows, cols = slice(round(top * h), round(bottom * h)), slice(round(left * w), round(right * w))
    pixels[rows, cols] = edit(pixels[rows, cols])
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def refused(data: bytes, *, person: bytes | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        check_output(data, person=person)
    error = info.value
    assert (error.kind, error.provider) == (ErrorKind.PERMANENT, "result")
    assert len(error.message) < 160 and "\\x" not in error.message  # figures, never bytes
    return error


# -- results that pass -----------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "extension"), [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_a_photo_like_try_on_passes_and_is_named_by_its_format(
    photo: Image.Image, other_photo: Image.Image, fmt: str, extension: str
) -> None:
    region = np.asarray(other_photo, dtype=np.float32)[184:532, 215:553]
    result = edited(photo, UPPER, lambda _: region)
    assert check_output(encode(result, fmt), person=encode(photo)) == extension


@pytest.mark.parametrize(
    ("region", "edit"),
    [
        pytest.param(UPPER, lambda px: px + 15, id="garment-a-shade-brighter"),
        pytest.param(
            UPPER,
            lambda px: px.mean(axis=2, keepdims=True) * 0.5 + px * 0.5 + [20, -10, -10],
            id="garment-recoloured",
        ),
        pytest.param(UPPER, lambda px: px[..., [1, 2, 0]], id="garment-hues-rotated"),
        pytest.param(SMALL, lambda px: 255 - px, id="accessory-sized-change"),
    ],
)
def test_subtle_photo_like_try_ons_are_not_taken_for_the_person_unchanged(
    photo: Image.Image, region: tuple[float, ...], edit: Callable[[Any], Any]
) -> None:
    result = encode(edited(photo, region, edit), "WEBP", quality=82)
    assert check_output(result, person=encode(photo)) == "webp"


def test_a_garment_of_another_colour_but_equal_brightness_is_a_change() -> None:
    """A grey-level comparison would call this unchanged: red and green of one luminance."""
    red, green = (200, 40, 40), (40, 122, 40)
    assert abs(Image.new("RGB", (1, 1), red).convert("L").getpixel((0, 0)) - 88) <= 1
    assert abs(Image.new("RGB", (1, 1), green).convert("L").getpixel((0, 0)) - 88) <= 1
    person = person_jpeg(shirt=red, size=(600, 900))
    result = Image.open(io.BytesIO(person_jpeg(shirt=green, size=(600, 900))))
    assert check_output(encode(result, "WEBP"), person=person) == "webp"


def test_a_low_contrast_picture_is_not_blank(photo: Image.Image) -> None:
    faint = Image.blend(Image.new("RGB", SIZE, (128, 128, 128)), photo, 0.1)
    assert check_output(encode(faint), person=None) == "jpg"


def test_a_person_that_does_not_decode_only_skips_the_unchanged_check(
    photo: Image.Image,
) -> None:
    assert check_output(encode(photo), person=b"\xff\xd8\xff not really a jpeg") == "jpg"


# -- results refused, one code per problem ---------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"not an image", b"<html><body>502</body></html>"])
def test_bytes_that_are_no_image(data: bytes) -> None:
    error = refused(data)
    assert error.code == "RESULT_NOT_AN_IMAGE"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("kept", [0.05, 0.5, 0.95, 0.999])
def test_truncated_results_are_refused(photo: Image.Image, fmt: str, kept: float) -> None:
    whole = encode(photo, fmt)
    cut = whole[: int(len(whole) * kept)]
    if fmt == "JPEG":  # what a header check alone would let through
        Image.open(io.BytesIO(cut)).verify()
    assert refused(cut).code == "RESULT_NOT_AN_IMAGE"


@pytest.mark.parametrize("kept", [0.3, 0.9])
def test_a_truncated_webp_is_refused_even_with_its_container_size_mended(
    photo: Image.Image, kept: float
) -> None:
    """The RIFF header gives the file's length: one cut and re-labelled holds a short bitstream."""
    cut = bytearray(encode(photo, "WEBP")[: int(len(encode(photo, "WEBP")) * kept)])
    cut[4:8] = struct.pack("<I", len(cut) - 8)
    assert refused(bytes(cut)).code == "RESULT_NOT_AN_IMAGE"


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        chunks.append((data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, body) for kind, body in chunks)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` and holds no pixels: decoding it would fail."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return png_from_chunks([(b"IHDR", header), (b"IEND", b"")])


def test_a_png_cut_inside_its_pixels_with_a_clean_end_is_refused(photo: Image.Image) -> None:
    """The last IDAT chunk's data cut short, the chunk list closed properly after it."""
    chunks = png_chunks(encode(photo, "PNG"))
    kind, body = chunks[-2]
    assert kind == b"IDAT"
    chunks[-2] = (kind, body[: len(body) // 2])
    assert refused(png_from_chunks(chunks)).code == "RESULT_NOT_AN_IMAGE"


@pytest.mark.parametrize("side", [8000, 30000])  # 64 MP; 900 MP (past Pillow's own limit)
def test_pixel_bombs_are_refused_from_the_header(side: int) -> None:
    error = refused(png_header(side, side))
    assert error.code == "OUTPUT_TOO_LARGE"
    assert str(MAX_OUTPUT_PIXELS) in error.message
    # Under the limit the same kind of file is decoded, and fails as what it is.
    assert refused(png_header(6000, 6000)).code == "RESULT_NOT_AN_IMAGE"


def test_thumbnails_are_refused(photo: Image.Image) -> None:
    error = refused(encode(photo.resize((100, 133))))
    assert error.code == "OUTPUT_TOO_SMALL"
    assert error.message == "result is 100x133 px: short side 100 px, at least 128 expected"
    at_limit = photo.resize((MIN_OUTPUT_SIDE, MIN_OUTPUT_SIDE * 4 // 3))
    assert check_output(encode(at_limit), person=None) == "jpg"


def test_banners_are_refused_unless_the_person_is_as_elongated(photo: Image.Image) -> None:
    error = refused(encode(photo.resize((1024, 160))), person=encode(photo))
    assert error.code == "OUTPUT_BAD_ASPECT"
    assert error.message == "result is 1024x160 px: aspect 6.40:1, at most 4.00:1 expected"
    assert check_output(encode(photo.resize((800, 200))), person=None) == "jpg"  # 4:1
    strip = photo.resize((1000, 200))  # 5:1 person: a 5:1 result is its own shape
    result = edited(strip, (0.3, 0.2, 0.6, 0.8), lambda px: 255 - px)
    assert check_output(encode(result), person=encode(strip)) == "jpg"


def flat(colour: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    return Image.new(mode, SIZE, colour)


def watermarked(image: Image.Image) -> Image.Image:
    """A small tag in a corner, as vendors stamp results (1.5% of the frame)."""
    ImageDraw.Draw(image).rectangle((560, 990, 760, 1020), fill=(255, 255, 255))
    return image


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        pytest.param(flat((0, 0, 0)), "WEBP", id="black"),
        pytest.param(flat((255, 255, 255)), "JPEG", id="white"),
        pytest.param(flat((90, 140, 200)), "PNG", id="one-colour"),
        pytest.param(watermarked(flat((0, 0, 0))), "JPEG", id="black-with-a-watermark"),
        pytest.param(flat((0, 0, 0, 0), "RGBA"), "PNG", id="transparent"),
    ],
)
def test_blank_results_are_refused(image: Image.Image, fmt: str) -> None:
    error = refused(encode(image, fmt), person=person_jpeg())
    assert error.code == "OUTPUT_BLANK"
    assert error.message.startswith("result is uniform: grey-level spread ")
    assert error.message.endswith(", at least 4 expected")


def test_the_person_returned_byte_for_byte_is_refused() -> None:
    person = person_jpeg()
    error = refused(person, person=person)
    assert error.code == "OUTPUT_UNCHANGED"
    assert error.message == "result is the person image as sent, byte for byte"


def re_encodings(image: Image.Image) -> list[tuple[str, bytes]]:
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    return [
        ("webp", encode(image, "WEBP", quality=82)),
        ("webp-q40", encode(image, "WEBP", quality=40)),
        ("png", encode(image, "PNG")),
        ("jpeg-q50-half-size", encode(half, "JPEG", quality=50)),
    ]


@pytest.mark.parametrize("person_kind", ["photo", "drawn"])
def test_the_person_re_encoded_or_resized_is_refused(photo: Image.Image, person_kind: str) -> None:
    image = photo if person_kind == "photo" else Image.open(io.BytesIO(person_jpeg()))
    person = encode(image.convert("RGB"), quality=90)
    for name, result in re_encodings(image.convert("RGB")):
        error = refused(result, person=person)
        assert error.code == "OUTPUT_UNCHANGED", name
        assert "0.0% of the picture changed by more than 12 levels" in error.message, name


def test_the_person_returned_upright_from_an_exif_rotated_input_is_refused(
    photo: Image.Image,
) -> None:
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # EXIF 6: shown rotated back
    exif = Image.Exif()
    exif[0x0112] = 6
    person = encode(stored, exif=exif.tobytes())
    assert refused(encode(photo, "WEBP"), person=person).code == "OUTPUT_UNCHANGED"


def test_masks_may_be_flat_but_must_decode() -> None:
    mask = encode(Image.new("L", SIZE, 0), "PNG")
    assert image_extension(mask) == "png"
    assert refused(mask[: len(mask) // 2]).code == "RESULT_NOT_AN_IMAGE"


# -- decoders: libvips where it is cheaper, Pillow's verdicts everywhere ---------------------


def verdict(data: bytes, person: bytes | None, formats: frozenset[str]) -> str:
    try:
        return check_output(data, person=person, vips_formats=formats)
    except ProviderError as error:
        return error.code


def verdicts(data: bytes, person: bytes | None = None) -> dict[str, str]:
    return {name: verdict(data, person, formats) for name, formats in DECODINGS.items()}


@pytest.fixture
def loaders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The libvips loaders the checks ask for, in order."""
    asked: list[str] = []
    real = vips.vips()

    class Loaders:
        def __getattr__(self, name: str) -> Any:
            asked.append(name)
            return getattr(real.Image, name)

    fake = SimpleNamespace(Image=Loaders(), Source=real.Source, Error=real.Error)
    monkeypatch.setattr(output_checks, "vips", lambda: fake)
    return asked


@ACROSS_DECODERS
def test_libvips_reads_only_what_pillow_identified_through_that_formats_loader(
    photo: Image.Image, loaders: list[str]
) -> None:
    small = photo.resize((384, 512))
    for fmt, extension in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        loaders.clear()
        assert verdict(encode(small, fmt), None, VIPS_FORMATS) == extension
        assert loaders == (["pngload_source"] if fmt == "PNG" else []), fmt
        loaders.clear()
        assert verdict(encode(small, fmt), None, ALL_VIPS) == extension
        assert loaders == [f"{fmt.lower()}load_source"], fmt
    loaders.clear()
    for data in (
        encode(small.convert("P"), "GIF"),
        encode(small, "BMP"),
        encode(small, "TIFF"),
        b"not an image",
        png_header(8000, 8000),  # refused from the header first
    ):
        verdict(data, None, ALL_VIPS)
    assert loaders == []


@ACROSS_DECODERS
def test_a_result_libvips_refuses_gets_pillows_verdict(
    photo: Image.Image, loaders: list[str]
) -> None:
    """A checksum libvips holds to and Pillow does not: libvips refuses, Pillow decodes."""
    chunks = png_chunks(encode(photo, "PNG"))
    data = bytearray(encode(photo, "PNG"))
    first_idat = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    end_of_first_idat = 8 + sum(12 + len(body) for _, body in chunks[: first_idat + 1])
    data[end_of_first_idat - 1] ^= 0xFF  # the first IDAT's CRC
    pyvips = vips.vips()
    with pytest.raises(pyvips.Error):
        pyvips.Image.pngload_buffer(bytes(data), fail_on="warning").avg()
    assert verdicts(bytes(data)) == dict.fromkeys(DECODINGS, "png")
    assert "pngload_source" in loaders


def damaged(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one kind of damage: bits flipped, a run zeroed or cut out, or its end."""
    out = bytearray(data)
    where = rng.randrange(len(out))
    match rng.randrange(4):
        case 0:
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        case 1:
            run = rng.randint(1, 256)
            out[where : where + run] = bytes(len(out[where : where + run]))
        case 2:
            del out[where : where + rng.randint(1, 256)]
        case _:
            del out[max(where, 16) :]
    return bytes(out)


@ACROSS_DECODERS
@pytest.mark.parametrize("kind", ["JPEG", "PNG", "PNG-RGBA", "PNG-P", "WEBP", "WEBP-RGBA"])
def test_damaged_results_get_pillows_verdict(photo: Image.Image, kind: str) -> None:
    """libvips fails on any damage it notices, and Pillow then judges; what libvips does not
    notice must be what Pillow accepts too. (JPEG only with the default decoders: libvips'
    1/8-scale decode lets a few bit flips through that Pillow refuses, one reason JPEG stays
    with Pillow.)"""
    image = photo.resize((256, 384))
    if kind.endswith("RGBA"):
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    elif kind.endswith("-P"):
        image = image.quantize(64)
    data = encode(image, kind.split("-")[0])
    rng = random.Random(kind)
    for attempt in range(40):
        bad = damaged(data, rng)
        found = verdicts(bad)
        assert found["default"] == found["pillow"], (attempt, found)
        if kind != "JPEG":
            assert found["vips"] == found["pillow"], (attempt, found)


def flattened(image: Image.Image) -> Image.Image:
    """``image`` with a gradient alpha."""
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(image.size))
    return rgba


@ACROSS_DECODERS
def test_every_mode_gets_the_same_verdict_from_every_decoder(photo: Image.Image) -> None:
    """What libvips reads as Pillow does (grey, palette, alpha, transparency), and what it does
    not and so goes to Pillow (16-bit, CMYK), at sizes a scaled decode does not divide."""
    person = encode(photo, quality=90)
    odd = photo.resize((517, 771))
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    pixels = np.asarray(odd)
    interlaced = (
        vips.vips()
        .Image.new_from_memory(pixels.tobytes(), odd.width, odd.height, 3, "uchar")
        .pngsave_buffer(interlace=True)
    )
    results = {
        "grey-png": encode(photo.convert("L"), "PNG"),
        "grey-jpeg": encode(photo.convert("L")),
        "1-bit-png": encode(photo.convert("1"), "PNG"),
        "palette-png": encode(photo.quantize(64), "PNG"),
        "palette-transparency-png": encode(photo.quantize(64), "PNG", transparency=3),
        "grey-transparency-png": encode(photo.convert("L"), "PNG", transparency=128),
        "rgb-transparency-png": encode(photo, "PNG", transparency=(10, 20, 30)),
        "grey-alpha-png": encode(flattened(photo).convert("LA"), "PNG"),
        "alpha-png": encode(flattened(photo), "PNG"),
        "alpha-webp": encode(flattened(photo), "WEBP"),
        "transparent-webp": encode(flat((0, 0, 0, 0), "RGBA"), "WEBP"),
        "16-bit-png": encode(grey16, "PNG"),
        "cmyk-jpeg": encode(photo.convert("CMYK")),
        "progressive-jpeg": encode(photo, progressive=True),
        "lossless-webp": encode(photo, "WEBP", lossless=True),
        "interlaced-png": interlaced,
        "interlaced-png-cut": interlaced[: len(interlaced) * 2 // 3],
        **{f"odd-size-{fmt}": encode(odd, fmt) for fmt in ("JPEG", "PNG", "WEBP")},
    }
    for name, data in results.items():
        found = verdicts(data, person)
        assert len(set(found.values())) == 1, (name, found)
    # The person re-encoded at an odd size, each format against a person in each other.
    for fmt in ("JPEG", "PNG", "WEBP"):
        for person_fmt in ("JPEG", "PNG", "WEBP"):
            found = verdicts(encode(odd, fmt, quality=60), encode(odd, person_fmt, quality=95))
            assert set(found.values()) == {"OUTPUT_UNCHANGED"}, (fmt, person_fmt, found)


@ACROSS_DECODERS
@pytest.mark.parametrize("size", [(768, 1024), (517, 771)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "PNG-RGBA"])
def test_the_thumbnail_hardly_depends_on_the_decoder(
    photo: Image.Image, size: tuple[int, int], fmt: str
) -> None:
    """Within a level or two; a size the 1/8 scale does not divide gives the last thumbnail
    row and column a few more (libvips edge-extends a partial block, Pillow averages it)."""
    image = photo.resize(size)
    data = encode(flattened(image) if fmt.endswith("RGBA") else image, fmt.split("-")[0])
    thumbs = [
        np.asarray(output_checks._decode(data, "result", formats).thumb, dtype=np.int16)
        for formats in (PILLOW, ALL_VIPS)
    ]
    difference = np.abs(thumbs[0] - thumbs[1]).max(axis=2)
    assert difference[:-1, :-1].max() <= 2
    assert difference.max() <= (2 if size[0] % 8 == 0 and size[1] % 8 == 0 else 8)


def with_late_exif(png: bytes) -> bytes:
    """``png`` with its eXIf chunk moved after the pixels (where PNG allows it)."""
    chunks = png_chunks(png)
    exif = next(chunk for chunk in chunks if chunk[0] == b"eXIf")
    chunks.remove(exif)
    chunks.insert(len(chunks) - 1, exif)
    return png_from_chunks(chunks)


@ACROSS_DECODERS
def test_an_orientation_in_a_png_after_its_pixels_still_counts(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = with_late_exif(encode(photo.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif))
    assert Image.open(io.BytesIO(stored)).info.get("exif") is None  # not in the header
    assert set(verdicts(encode(photo, "WEBP"), stored).values()) == {"OUTPUT_UNCHANGED"}
    assert set(verdicts(stored, encode(photo)).values()) == {"OUTPUT_UNCHANGED"}


def test_persons_alternating_are_kept_apart(photo: Image.Image, other_photo: Image.Image) -> None:
    first, second = encode(photo), encode(other_photo)
    result = encode(photo, "WEBP")
    for _ in range(2):
        assert refused(result, person=first).code == "OUTPUT_UNCHANGED"
        assert check_output(result, person=second) == "webp"
        assert refused(result, person=bytes(bytearray(first))).code == "OUTPUT_UNCHANGED"


# -- libvips as the checks use it (set up in tasks.images.vips) --------------------------------


@ACROSS_DECODERS
def test_the_real_libvips_keeps_no_cache_and_refuses_untrusted_loaders() -> None:
    pyvips = vips.vips()
    assert pyvips.cache_get_max() == 0 and pyvips.cache_get_max_mem() == 0
    with pytest.raises(pyvips.Error):
        pyvips.Image.csvload_source(pyvips.Source.new_from_memory(b"1,2\n3,4\n"))


# -- store_result: checked before the lake is written ----------------------------------------


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[RunContext]:
    async with httpx.AsyncClient() as http:
        client = ChangeClothesClient(http=http, api_key=SecretStr("unused"), base_url="http://x")
        yield RunContext(
            run_id="run-1",
            lane=Lane(client=client, max_in_flight=1),
            http=http,
            lake=Lake.open(str(tmp_path / "lake")),
            images=PreparedImageCache(),
        )


def record() -> RowRecord:
    return RowRecord(
        run_id="run-1", row_id="r", row_index=0, provider="changeclothes", status=Status.SUCCEEDED
    )


def outputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "lake").rglob("*") if p.is_file())


async def test_store_result_refuses_a_bad_result_before_writing_it(
    ctx: RunContext, tmp_path: Path, photo: Image.Image
) -> None:
    person = prepared(encode(photo))
    unchanged = TryOnResult(result_data=encode(photo, "WEBP"))
    blank = TryOnResult(result_data=encode(flat((0, 0, 0)), "WEBP"))
    for result, code in ((unchanged, "OUTPUT_UNCHANGED"), (blank, "OUTPUT_BLANK")):
        row = record()
        with pytest.raises(ProviderError) as info:
            await store_result(ctx, ctx.lane, result, row, person=person)
        assert info.value.code == code
        assert row.output_uri is None and row.output_sha256 is None
    assert not [name for name in outputs(tmp_path) if not name.startswith(".")]


async def test_store_result_writes_a_good_result(
    ctx: RunContext, tmp_path: Path, photo: Image.Image
) -> None:
    person = prepared(encode(photo))
    tried_on = edited(photo, UPPER, lambda px: 255 - px)
    row = record()
    await store_result(
        ctx, ctx.lane, TryOnResult(result_data=encode(tried_on, "WEBP")), row, person=person
    )
    assert row.output_uri is not None and row.output_uri.endswith(".webp")
    assert f"{row.output_sha256}.webp" in outputs(tmp_path)
    # Without the person the unchanged check cannot run: the other checks still do.
    unchanged = TryOnResult(result_data=encode(photo, "WEBP", quality=70))
    await store_result(ctx, ctx.lane, unchanged, record())
    with pytest.raises(ProviderError, match="OUTPUT_UNCHANGED"):
        await store_result(ctx, ctx.lane, unchanged, record(), person=person)
