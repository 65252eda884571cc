"""What a prepared input image must satisfy before it is sent to one provider.

Each provider package declares its own profile (``providers/<name>/settings.py``) and its
``ProviderSpec`` carries it. Every figure can be overridden per run, so a user with a live
account can widen them.
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
