"""``ChunkSettings``: what a chunk running in another process needs to rebuild its run's
context. Plain data, Prefect-free, so the flow's parameters (``flows.params``) can be built and
checked without importing Prefect (``tryon run`` answers a run that cannot start at once).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChunkSettings", "LaneShare"]


class LaneShare(BaseModel):
    """A chunk's share of one more provider account's leased slots (a fallback provider)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    max_in_flight: int = Field(default=1, ge=1)
    requests_per_second: float | None = Field(default=None, gt=0)
    fatal: dict[str, Any] | None = None  # a run-fatal error another chunk already hit


class ChunkSettings(BaseModel):
    """What a chunk needs to rebuild its run's context in another process. Plain data: it
    travels as a task parameter (never credentials: those come from the worker's environment
    or Prefect Secret blocks)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lake: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    max_in_flight: int = Field(ge=1, description="This chunk's share of the run's slots.")
    requests_per_second: float | None = Field(default=None, gt=0)
    refine: bool = False
    refine_max_in_flight: int = Field(default=1, ge=1)
    refine_requests_per_second: float | None = Field(default=None, gt=0)
    refine_gender: Literal["woman", "man"] | None = None
    max_attempts: int = Field(default=4, ge=1)
    fetch_allow: list[str] = Field(default_factory=list)  # BatchParams.fetch_allow, checked
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    # A run-fatal error another chunk already hit: this chunk records its rows as not
    # attempted instead of calling the provider again.
    fatal: dict[str, Any] | None = None
    refine_fatal: dict[str, Any] | None = None
    track: str = "primary"  # schemas.results.PRIMARY_TRACK, or the compared provider's name
    fallbacks: list[LaneShare] = Field(default_factory=list)  # in the order rows try them
    # Each account's price per charged call (a decimal string), for the records' cost.
    prices: dict[str, str | None] = Field(default_factory=dict)
