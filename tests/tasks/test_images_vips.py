"""tasks.images.vips: which images libvips prepares, and that they come out as Pillow's would."""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from providers.registry import BUILT_IN, REFINER
from schemas.image_profile import ImageProfile
from tasks.images import ImageInputError, prepare, prepare_image
from tasks.images import vips as vips_module
from tasks.images.vips import VipsDeclined, fit_jpeg, jpeg_frame, vips, vips_jpeg

PROFILE = ImageProfile(name="t-vips", min_side=128, max_side=512, max_bytes=4 * 1024 * 1024)
PROFILES = {spec.name: spec.profile for spec in (*BUILT_IN.values(), REFINER)}
RED = (255, 0, 0)


def encode(img: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def photo(width: int = 1200, height: int = 800, seed: int = 0) -> Image.Image:
    """Smooth gradients, soft noise and a red marker in the stored top-left corner."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([30 + 0 * x, 60 + 150 * x / width, 60 + 150 * y / height], -1)
    arr += rng.normal(0, 4, arr.shape)
    arr[: height // 6, : width // 6] = RED
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image | None = None, **params: Any) -> bytes:
    return encode(photo() if img is None else img, "JPEG", quality=92, **params)


def prep(data: bytes, profile: ImageProfile = PROFILE) -> Any:
    return prepare_image(data, profile=profile, source_uri="test://vips")


def prep_pillow(
    data: bytes, monkeypatch: pytest.MonkeyPatch, profile: ImageProfile = PROFILE
) -> Any:
    """The same preparation through Pillow only (the path before libvips)."""
    with monkeypatch.context() as patch:
        patch.setattr(prepare, "_vips_source", lambda *_: None)
        return prep(data, profile)


@pytest.fixture
def vips_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every ``fit_jpeg`` ("bytes") and ``fit_jpeg_pixels`` ("pixels") call, or "declined"."""
    calls: list[tuple[str, Any]] = []

    def spy(name: str, kind: str) -> Any:
        real = getattr(prepare, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = real(*args, **kwargs)
            except VipsDeclined as exc:
                calls.append(("declined", exc))
                raise
            calls.append((kind, result))
            return result

        return call

    monkeypatch.setattr(prepare, "fit_jpeg", spy("fit_jpeg", "bytes"))
    monkeypatch.setattr(prepare, "fit_jpeg_pixels", spy("fit_jpeg_pixels", "pixels"))
    return calls


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def assert_close(a: bytes, b: bytes, mean: float = 1.5) -> None:
    """Two preparations of one image: same size, within JPEG noise of each other."""
    pa, pb = pixels(a), pixels(b)
    assert pa.shape == pb.shape
    assert np.abs(pa - pb).mean() < mean


# ------------------------------------------------------------------------------- set-up


def test_libvips_is_configured_for_untrusted_input_and_flat_memory(tmp_path: Path) -> None:
    pyvips = vips()
    assert pyvips.cache_get_max() == 0 and pyvips.cache_get_max_mem() == 0
    assert 1 <= pyvips.concurrency_get() <= 2 or os.environ.get("VIPS_CONCURRENCY")
    assert vips() is pyvips  # configured once
    table = tmp_path / "table.csv"
    table.write_text("1,2\n3,4\n")
    with pytest.raises(pyvips.Error, match="blocked"):  # libvips marks csvload untrusted
        pyvips.Image.csvload(str(table))


def test_without_pyvips_everything_goes_through_pillow(
    monkeypatch: pytest.MonkeyPatch, vips_calls: list[tuple[str, Any]]
) -> None:
    data = jpeg()
    expected = prep_pillow(data, monkeypatch)
    monkeypatch.setattr(vips_module, "_module", None)
    monkeypatch.setattr(vips_module, "_failed", True)
    out = prep(data)
    assert [kind for kind, _ in vips_calls] == ["declined"]
    assert out.data == expected.data


# ------------------------------------------------------------------------ which images


def test_jpeg_frame_reads_the_frame_header() -> None:
    img = photo(300, 200)
    assert jpeg_frame(jpeg(img))[:5] == (0xC0, 8, 300, 200, 3)
    assert jpeg_frame(jpeg(img, progressive=True))[:5] == (0xC2, 8, 300, 200, 3)
    assert jpeg_frame(jpeg(img.convert("L")))[:5] == (0xC0, 8, 300, 200, 1)
    assert jpeg_frame(jpeg(img.convert("CMYK")))[:5] == (0xC0, 8, 300, 200, 4)
    data = jpeg(img)
    for broken in (b"", b"\xff\xd8", data[:20], b"\xff\xd8\xff\xda\x00\x02", encode(img, "PNG")):
        assert jpeg_frame(broken) is None
    # A lossless (SOF3) frame is read, and refused by vips_jpeg.
    sof = data.index(b"\xff\xc0")
    lossless = data[:sof] + b"\xff\xc3" + data[sof + 2 :]
    assert jpeg_frame(lossless)[:5] == (0xC3, 8, 300, 200, 3)
    with Image.open(io.BytesIO(lossless)) as im:
        assert vips_jpeg(lossless, im) is None
    with Image.open(io.BytesIO(data)) as im:
        assert vips_jpeg(data, im) is not None


def _segments(data: bytes) -> list[int]:
    """The markers before the first scan."""
    markers, pos = [], 2
    while data[pos + 1] != 0xDA:
        markers.append(data[pos + 1])
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return markers


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("progressive", [False, True])
def test_libvips_gets_no_metadata_and_the_same_pixels(mode: str, progressive: bool) -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    exif[0x0112] = 6
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = jpeg(
        photo(300, 200).convert(mode),
        progressive=progressive,
        exif=exif,
        icc_profile=srgb,
        comment=b"private note",
    )
    # An Adobe segment (transform 1: YCbCr), which libjpeg reads: kept.
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01"
    data = data[:2] + adobe + data[2:]
    assert {0xE1, 0xE2, 0xFE, 0xEE} <= set(_segments(data))
    frame = jpeg_frame(data)
    assert frame is not None
    kept = _segments(frame.decodable)
    assert not {0xE1, 0xE2, 0xFE} & set(kept) and 0xEE in kept and 0xE0 in kept
    assert b"SecretCam" not in frame.decodable and b"private" not in frame.decodable
    assert frame.decodable.endswith(data[data.index(b"\xff\xda") :])
    with Image.open(io.BytesIO(data)) as a, Image.open(io.BytesIO(frame.decodable)) as b:
        assert a.mode == b.mode == mode
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("case", "taken"),
    [
        ("rgb", True),
        ("progressive", True),
        ("restart-markers", True),
        ("grey", True),
        ("srgb-icc", True),
        ("mpo", True),
        ("cmyk", False),
        ("adobe-rgb-icc", False),
        ("png", False),
        ("webp", False),
        ("no-resize", False),
        ("upscale", False),
    ],
)
def test_which_images_libvips_prepares(
    case: str,
    taken: bool,
    monkeypatch: pytest.MonkeyPatch,
    vips_calls: list[tuple[str, Any]],
) -> None:
    img = photo()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    # A valid ICC profile that is not sRGB (its description says so).
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    data = {
        "rgb": lambda: jpeg(img),
        "progressive": lambda: jpeg(img, progressive=True),
        "restart-markers": lambda: jpeg(img, restart_marker_rows=1),
        "grey": lambda: jpeg(img.convert("L")),
        "srgb-icc": lambda: jpeg(img, icc_profile=srgb),
        "mpo": lambda: encode(img, "MPO", save_all=True, append_images=[photo(seed=1)]),
        "cmyk": lambda: jpeg(img.convert("CMYK")),
        "adobe-rgb-icc": lambda: jpeg(img, icc_profile=lab),
        "png": lambda: encode(img, "PNG"),
        "webp": lambda: encode(img, "WEBP"),
        "no-resize": lambda: jpeg(photo(500, 300)),
        "upscale": lambda: jpeg(photo(200, 100)),
    }[case]()
    out = prep(data)
    assert bool(vips_calls) == taken
    assert all(kind == "bytes" for kind, _ in vips_calls)
    assert Image.open(io.BytesIO(out.data)).mode == "RGB"
    if taken:
        assert_close(out.data, prep_pillow(data, monkeypatch).data)


# ----------------------------------------------------------------- same result as Pillow


def _downscaled(size: tuple[int, int], profile: ImageProfile) -> bool:
    try:
        return prepare._fit_size(*size, profile=profile, shown="t")[0] < size[0]
    except ImageInputError:  # an aspect ratio the profile cannot take
        return False


_SIZE_CASES = [
    (name, size)
    for name in sorted(PROFILES)
    for size in [(6000, 4000), (4001, 2999), (1999, 1333), (2731, 4097), (5000, 700)]
    if _downscaled(size, PROFILES[name])
]


@pytest.mark.parametrize(("name", "size"), _SIZE_CASES)
def test_sizes_are_exactly_pillows(
    name: str,
    size: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
    vips_calls: list[tuple[str, Any]],
) -> None:
    profile = PROFILES[name]
    data = jpeg(Image.new("RGB", size, (90, 120, 30)))
    out = prep(data, profile)
    assert vips_calls
    target = prepare._fit_size(*size, profile=profile, shown="t")
    assert (out.width, out.height) == target == Image.open(io.BytesIO(out.data)).size
    expected = prep_pillow(data, monkeypatch, profile)
    assert (out.width, out.height) == (expected.width, expected.height)


def test_output_is_close_to_the_pillow_path(
    monkeypatch: pytest.MonkeyPatch, vips_calls: list[tuple[str, Any]]
) -> None:
    data = jpeg(photo(3000, 2000))
    for profile in (PROFILE, PROFILES["changeclothes"], PROFILES["tencent"]):
        out = prep(data, profile)
        assert_close(out.data, prep_pillow(data, monkeypatch, profile).data)
    assert vips_calls and all(kind == "bytes" for kind, _ in vips_calls)
    img = Image.open(io.BytesIO(out.data))
    assert img.format == "JPEG" and img.mode == "RGB"
    assert "exif" not in img.info and "icc_profile" not in img.info
    assert out.sha256 == hashlib.sha256(out.data).hexdigest() and out.mime == "image/jpeg"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_as_pillow_exif_transpose(
    orientation: int, monkeypatch: pytest.MonkeyPatch, vips_calls: list[tuple[str, Any]]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(photo(1200, 800), exif=exif.tobytes())
    out = prep(data)
    assert vips_calls
    expected = prep_pillow(data, monkeypatch)
    assert (out.width, out.height) == (expected.width, expected.height)
    assert_close(out.data, expected.data)
    # The marker (stored top-left) lands where exif_transpose puts it.
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).resize((out.width, out.height))
    img = Image.open(io.BytesIO(out.data))
    assert 0x0112 not in img.getexif()
    for x in (0.05, 0.95):
        for y in (0.05, 0.95):
            xy = (int(img.width * x), int(img.height * y))
            got, want = img.getpixel(xy), upright.getpixel(xy)
            assert all(abs(a - b) <= 30 for a, b in zip(got, want, strict=True)), (xy, got, want)


def test_grey_jpeg_comes_out_rgb_with_the_same_pixels(
    monkeypatch: pytest.MonkeyPatch, vips_calls: list[tuple[str, Any]]
) -> None:
    data = jpeg(photo().convert("L"))
    out = prep(data)
    assert vips_calls
    arr = pixels(out.data)
    assert arr.shape[2] == 3 and Image.open(io.BytesIO(out.data)).mode == "RGB"
    assert_close(out.data, prep_pillow(data, monkeypatch).data)


def test_mpo_uses_the_first_picture(vips_calls: list[tuple[str, Any]]) -> None:
    first, second = Image.new("RGB", (1200, 800), RED), Image.new("RGB", (1200, 800), (0, 0, 255))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = Image.open(io.BytesIO(prep(data).data))
    assert vips_calls
    assert all(abs(a - b) <= 4 for a, b in zip(out.getpixel((100, 100)), RED, strict=True))


def test_metadata_is_not_carried_over(vips_calls: list[tuple[str, Any]]) -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = jpeg(exif=exif, icc_profile=srgb, comment=b"private note")
    out = prep(data)
    assert vips_calls
    assert b"SecretCam" not in out.data and b"private note" not in out.data
    img = Image.open(io.BytesIO(out.data))
    assert not {"exif", "icc_profile", "comment"} & set(img.info)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_other_output_formats_take_the_fitted_pixels(
    fmt: str, vips_calls: list[tuple[str, Any]]
) -> None:
    profile = ImageProfile(name="f", min_side=64, max_side=512, max_bytes=1 << 22, formats=(fmt,))
    out = prep(jpeg(), profile)
    assert [kind for kind, _ in vips_calls] == ["pixels"]
    assert Image.open(io.BytesIO(out.data)).format == fmt and (out.width, out.height) == (512, 341)


def test_over_the_byte_limit_falls_back_to_lower_quality(
    vips_calls: list[tuple[str, Any]],
) -> None:
    data = jpeg(photo(2400, 1600))
    first = prep(data)
    profile = PROFILE.model_copy(update={"max_bytes": int(len(first.data) * 0.8)})
    out = prep(data, profile)
    assert [kind for kind, _ in vips_calls] == ["bytes", "bytes", "pixels"]
    assert len(out.data) <= profile.max_bytes and (out.width, out.height) == (512, 341)


# ---------------------------------------------------------------- damaged or odd data


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_refused(progressive: bool, vips_calls: list[tuple[str, Any]]) -> None:
    data = jpeg(progressive=progressive)
    for cut in (len(data) // 2, len(data) - 10):  # (only the end marker cut: both take it)
        with pytest.raises(ImageInputError) as info:
            prep(data[:cut])
        assert info.value.code == "DECODE_FAILED"
    assert [kind for kind, _ in vips_calls] == ["declined", "declined"]


def test_a_libjpeg_warning_hands_the_verdict_to_pillow(
    monkeypatch: pytest.MonkeyPatch, vips_calls: list[tuple[str, Any]]
) -> None:
    # Bytes before the end marker: libjpeg warns ("extraneous bytes"), Pillow accepts.
    data = jpeg(progressive=True)
    damaged = data[:-2] + b"\x00" * 40 + data[-2:]
    out = prep(damaged)
    assert [kind for kind, _ in vips_calls] == ["declined"]
    assert out.data == prep_pillow(damaged, monkeypatch).data


def test_declined_messages_carry_no_file_content() -> None:
    data = jpeg()
    sos = data.index(b"\xff\xda")
    hostile = data[: sos + 40] + b"s3cr3t-token-XYZ" * 64
    with pytest.raises(VipsDeclined) as info:
        fit_jpeg(hostile, size=(1200, 800), target=(512, 341), orientation=1, quality=90)
    assert info.value.args == ("libvips refused the data (Error)",)
    assert "s3cr3t" not in str(info.value) and "XYZ" not in str(info.value)
    try:  # Pillow decides: it may take garbage scan data (libjpeg only warns), or refuse it
        prepare_image(hostile, profile=PROFILE, source_uri="/srv/notes.jpg")
    except ImageInputError as exc:
        assert exc.code == "DECODE_FAILED" and "s3cr3t" not in str(exc)


def test_header_mismatch_is_declined() -> None:
    with pytest.raises(VipsDeclined):
        fit_jpeg(jpeg(), size=(1300, 800), target=(512, 315), orientation=1, quality=90)


# ------------------------------------------------------------------------ determinism


def test_same_bytes_in_same_bytes_out_whatever_the_threads() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(photo(3000, 2000, seed=5), exif=exif.tobytes())
    pyvips = vips()
    before = pyvips.concurrency_get()
    digests = set()
    try:
        for threads in (1, 2, 4):
            pyvips.concurrency_set(threads)
            digests |= {prep(data).sha256 for _ in range(2)}
            with ThreadPoolExecutor(4) as pool:  # several preparations at once, as in a run
                digests |= {out.sha256 for out in pool.map(lambda _: prep(data), range(6))}
    finally:
        pyvips.concurrency_set(before)
    assert len(digests) == 1
