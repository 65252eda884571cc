"""Image limits per provider: what a prepared input image must satisfy before it is sent.

Figures marked (doc) come from the provider's documentation in shared/seeds; (ext) from the
vendor's public pages; (conservative) are our own defaults where the vendor documents nothing.
Every figure can be overridden per run, so a user with a live account can widen them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ImageFormat = Literal["JPEG", "PNG", "WEBP"]


class ImageProfile(BaseModel):
    """Constraints a prepared image must meet for one provider."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    min_side: int = Field(ge=1, description="Shortest side must be >= this (pixels).")
    max_side: int = Field(ge=1, description="Longest side must be <= this (pixels).")
    max_bytes: int = Field(ge=1024, description="Encoded file size must be <= this.")
    formats: tuple[ImageFormat, ...] = Field(
        default=("JPEG",), description="Allowed output formats, preferred first."
    )
    jpeg_quality: int = Field(default=90, ge=30, le=100)
    # Some providers count base64 size, not raw bytes (Tencent: <8 MB as base64).
    bytes_as_base64: bool = False

    @model_validator(mode="after")
    def _sides_ordered(self) -> ImageProfile:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        return self

    def encoded_size(self, raw_len: int) -> int:
        """The size the provider measures for a payload of ``raw_len`` raw bytes."""
        return 4 * ((raw_len + 2) // 3) if self.bytes_as_base64 else raw_len


# ChangeClothesAI documents no limits (doc 000): conservative defaults, overridable.
CHANGECLOTHES = ImageProfile(
    name="changeclothes", min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024
)
# Tencent AI Art ChangeClothes (doc 002): each side >512 and <3000 px (its error text also
# mentions 2000x2000, so we stay under that), <8 MB measured as base64.
TENCENT = ImageProfile(
    name="tencent",
    min_side=513,
    max_side=2000,
    max_bytes=8_000_000,  # vendors' "MB" may be decimal: the smaller reading is safe under both
    bytes_as_base64=True,
)
# HiDream documents no limits (doc 003): conservative defaults.
HIDREAM = ImageProfile(name="hidream", min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024)
# AILabTools try-on (ext) and refiner (doc 004): >150 and <4096 px, <=5 MB
# (the try-on page says 3-5 MB depending on the model: 3 MB to be safe).
AILAB = ImageProfile(
    name="ailab", min_side=151, max_side=4095, max_bytes=3_000_000, formats=("JPEG", "PNG")
)
AILAB_REFINER = ImageProfile(
    name="ailab_refiner",
    min_side=151,
    max_side=4095,
    max_bytes=5_000_000,
    formats=("JPEG", "PNG"),
)

PROFILES: dict[str, ImageProfile] = {
    p.name: p for p in (CHANGECLOTHES, TENCENT, HIDREAM, AILAB, AILAB_REFINER)
}
