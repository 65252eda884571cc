"""Deterministic bench inputs: person and garment JPEGs, manifests, and 24-megapixel photos."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PEOPLE = 40
GARMENTS = 50
PERSON_SIZE = (768, 1024)
GARMENT_SIZE = (512, 512)
PHOTO_SIZE = (6000, 4000)


def _smooth_field(rng: np.random.Generator, size: tuple[int, int], coarse: int) -> np.ndarray:
    """A smooth random RGB field (float32, 0..255): a small noise image upsampled bicubically."""
    w, h = size
    small = rng.uniform(40, 215, size=(coarse, max(2, coarse * h // w), 3)).astype(np.uint8)
    up = Image.fromarray(small.transpose(1, 0, 2), "RGB").resize(size, Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def _shapes(
    rng: np.random.Generator, size: tuple[int, int], count: int, blur: float
) -> Image.Image:
    """Soft-edged ellipses and rectangles on a transparent layer."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = size
    for _ in range(count):
        x0, y0 = rng.uniform(-0.1 * w, w), rng.uniform(-0.1 * h, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h
        colour = (*(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(120, 230)))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return layer.filter(ImageFilter.GaussianBlur(blur)) if blur else layer


def _texture(rng: np.random.Generator, size: tuple[int, int], period: float) -> np.ndarray:
    """A fabric-like weave: two crossed sinusoids with a random angle, -1..1 (float32)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    return (np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / (period * 1.3))).astype(
        np.float32
    )


def synthetic_photo(seed: int, size: tuple[int, int], *, noise: float = 3.0) -> Image.Image:
    """Photo-like RGB: smooth lighting, soft shapes, a textured region, mild sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    # Roughly 1/f detail: smooth lighting plus finer octaves of lower amplitude.
    base = _smooth_field(rng, size, 6)
    for coarse, weight in ((40, 0.25), (250, 0.1), (1200, 0.05)):
        if coarse < w // 4:
            base += (_smooth_field(rng, size, coarse) - 127.5) * weight
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    shapes = _shapes(rng, size, 14, blur=max(1.0, w / 800))
    img.paste(shapes, (0, 0), shapes)
    arr = np.asarray(img, dtype=np.float32)
    # A textured patch (fabric) covering about a quarter of the frame, fading at its edges.
    tw, th = w // 2, h // 2
    tx, ty = int(rng.integers(0, w - tw)), int(rng.integers(0, h - th))
    weave = _texture(rng, (tw, th), period=rng.uniform(3.0, 9.0))
    fade = np.minimum.outer(np.hanning(th) ** 0.3, np.hanning(tw) ** 0.3).astype(np.float32)
    arr[ty : ty + th, tx : tx + tw] += (weave * fade * 18.0)[..., None]
    # Sensor-like noise: luminance plus a little chroma.
    arr += rng.normal(0, noise, size=(h, w, 1)).astype(np.float32)
    arr += rng.normal(0, noise / 3, size=(h, w, 3)).astype(np.float32)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def make_inputs(root: Path, *, seed: int = 20261121) -> tuple[list[Path], list[Path]]:
    """40 person and 50 garment JPEGs (within the changeclothes profile) under ``root``."""
    people_dir, garments_dir = root / "people", root / "garments"
    people_dir.mkdir(parents=True, exist_ok=True)
    garments_dir.mkdir(parents=True, exist_ok=True)
    people, garments = [], []
    for i in range(PEOPLE):
        path = people_dir / f"person-{i:03d}.jpg"
        synthetic_photo(seed + i, PERSON_SIZE, noise=2.0).save(path, "JPEG", quality=85)
        people.append(path)
    for j in range(GARMENTS):
        path = garments_dir / f"garment-{j:03d}.jpg"
        synthetic_photo(seed + 1000 + j, GARMENT_SIZE, noise=2.0).save(path, "JPEG", quality=85)
        garments.append(path)
    return people, garments


def write_manifest(path: Path, people: list[Path], garments: list[Path], rows: int) -> Path:
    """``rows`` rows cycling through every person x garment pair, unique ids, upper_body.

    Each row is a distinct piece of work (its own ``garment_description``): past 2,000 rows
    the pairs repeat, and the flow would otherwise (rightly) do each pair once.
    """
    pairs = [(p, g) for p in people for g in garments]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "person_image", "garment_image", "category", "garment_description"])
        for i in range(rows):
            person, garment = pairs[i % len(pairs)]
            writer.writerow(
                [
                    f"row-{i:06d}",
                    person.relative_to(path.parent).as_posix(),
                    garment.relative_to(path.parent).as_posix(),
                    "upper_body",
                    f"look {i}",
                ]
            )
    return path


def make_photos(root: Path, count: int, *, seed: int = 6000) -> list[Path]:
    """``count`` 6000x4000 photo-like JPEGs at quality 92."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = root / f"photo-{k}.jpg"
        synthetic_photo(seed + k, PHOTO_SIZE).save(path, "JPEG", quality=92)
        paths.append(path)
    return paths
