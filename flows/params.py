"""The flow's parameters: what a user sets in the Prefect UI, a deployment or the CLI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from providers.registry import provider_spec
from tasks.chunk_settings import ChunkSettings
from tasks.fetch_guard import parse_allow_entry


class ProviderLimits(BaseModel):
    """Per-provider limits for one run. ``None`` takes the provider's documented default."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int | None = Field(
        default=None, ge=1, le=1024, description="Calls in flight for this run."
    )
    requests_per_second: float | None = Field(
        default=None, gt=0, description="Calls per second for this run."
    )
    global_max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Set the account-wide limit shared by all runs and workers "
        "(a Prefect global concurrency limit 'tryon-<provider>'); unset: keep it as it is.",
    )


class BatchParams(BaseModel):
    """Parameters of a batch run (the Prefect UI renders them as a form)."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(
        description="Manifest URI: CSV or Parquet, a local path or any fsspec URL."
    )
    lake: str = Field(default="./lake", description="Lake root: a local folder or an fsspec URL.")
    provider: str = Field(default="changeclothes", description="Provider for rows that name none.")
    chunk_size: int = Field(default=100, ge=1, le=10_000, description="Rows per Prefect task.")
    limits: ProviderLimits = Field(default_factory=ProviderLimits)
    max_attempts: int = Field(
        default=4, ge=1, le=20, description="Provider calls per row, at most."
    )
    refine: bool = Field(
        default=False, description="Chain the AILabTools refiner onto every coarse result."
    )
    refine_gender: Literal["woman", "man"] | None = Field(
        default=None, description="Gender for rows without one (the refiner requires it)."
    )
    refine_limits: ProviderLimits = Field(default_factory=ProviderLimits)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the lake, manifest and inputs."
    )
    fetch_allow: list[str] = Field(
        default_factory=list,
        description="Non-public destinations input image URLs may reach: CIDR networks "
        "(10.0.0.0/8, fd00::/8), single addresses or exact host names. Empty (default): "
        "loopback, private, CGNAT, link-local (cloud metadata), multicast and reserved "
        "addresses are refused, after DNS and on every redirect (FETCH_BLOCKED_ADDRESS).",
    )
    fetch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Read timeout of an input image fetch in seconds (connect: at most 10).",
    )

    def chunk_settings(self) -> ChunkSettings:
        """The run-wide part of what a chunk in another process needs (its share of slots,
        rate and any fatal error are filled in per chunk)."""
        return ChunkSettings(
            lake=self.lake,
            storage_options=self.storage_options,
            max_in_flight=1,
            refine=self.refine,
            refine_gender=self.refine_gender,
            max_attempts=self.max_attempts,
            fetch_allow=self.fetch_allow,
            fetch_timeout_s=self.fetch_timeout_s,
        )

    @field_validator("fetch_allow")
    @classmethod
    def _valid_fetch_allow(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(parse_allow_entry(entry) for entry in value))

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        return provider_spec(value).name

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Flow parameters are stored by Prefect and shown in its UI: never credentials."""
        found = sorted(_credential_keys(value))
        if found:
            raise ValueError(
                f"storage_options holds credentials ({', '.join(found)}): flow parameters are "
                "kept in Prefect's database and shown in its UI. Give them to the worker's "
                "environment instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                "AWS_SESSION_TOKEN; AWS_PROFILE or an instance role), and keep only "
                "non-secret options (endpoint_url, client_kwargs) here"
            )
        return value


_SECRET_KEY_WORDS = ("secret", "token", "password", "passwd", "credential", "sas")


def _credential_keys(options: object, prefix: str = "") -> list[str]:
    """Keys of ``options`` (nested dicts too) that name credentials (s3fs, gcsfs, adlfs...)."""
    found: list[str] = []
    if isinstance(options, dict):
        for key, item in options.items():
            name = str(key).lower()
            if name in ("key", "access_key", "access_key_id", "account_key") or any(
                word in name for word in _SECRET_KEY_WORDS
            ):
                found.append(f"{prefix}{key}")
            found += _credential_keys(item, f"{prefix}{key}.")
    return found


def public_params(params: BatchParams) -> dict[str, Any]:
    """Parameters safe to store: storage option values may hold credentials."""
    data = params.model_dump(mode="json")
    data["storage_options"] = sorted(params.storage_options)
    return data
