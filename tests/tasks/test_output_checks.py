"""``check_output``: each problem a result can have is refused with its own code and a message
giving the figure against the limit; photo-like try-ons, and results re-encoded or resized by a
provider, pass. ``store_result`` checks before it writes anything to the lake."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
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
from tasks.images import PreparedImageCache
from tasks.lake import Lake
from tasks.output_checks import (
    MAX_OUTPUT_PIXELS,
    MIN_OUTPUT_SIDE,
    check_output,
    image_extension,
)
from tasks.provider_calls import store_result
from tasks.run_context import Lane, RunContext
from tests.images import person_jpeg, prepared

SIZE = (768, 1024)
UPPER = (0.28, 0.18, 0.72, 0.52)  # an upper-body garment's share of the frame: 15%
SMALL = (0.40, 0.30, 0.60, 0.45)  # an accessory's: 3%


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
@pytest.mark.parametrize("kept", [0.5, 0.95])
def test_truncated_results_are_refused(photo: Image.Image, fmt: str, kept: float) -> None:
    whole = encode(photo, fmt)
    cut = whole[: int(len(whole) * kept)]
    if fmt == "JPEG":  # what a header check alone would let through
        Image.open(io.BytesIO(cut)).verify()
    assert refused(cut).code == "RESULT_NOT_AN_IMAGE"


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` and holds no pixels: decoding it would fail."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


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
