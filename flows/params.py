"""The flow's parameters: what a user sets in the Prefect UI, a deployment or the CLI.

Prefect builds the deployment's parameter form from these models' JSON schema, so every field
has a title and a description written as help for the person filling the form (plain text: the
UI renders descriptions as Markdown, which swallows anything in angle brackets), and nothing
the form would show as an optional "None" type: a limit of 0 takes the provider's own, and the
refiner's gender is a choice with an explicit "unset".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from providers.registry import PROVIDERS, all_specs, provider_spec
from schemas.manifest import CATEGORIES
from tasks.chunk_settings import ChunkSettings
from tasks.fetch_guard import parse_allow_entry

# The form's choice list: every registered provider, plugins included (computed when this
# module is imported, so at deploy time on the machine that deploys).
PROVIDER_NAMES: Final[list[str]] = sorted(PROVIDERS)

Gender = Literal["woman", "man"]
RefineGender = Literal["unset", "woman", "man"]


class ProviderLimits(BaseModel):
    """Limits on the calls to one provider. A limit left at 0 keeps the provider's default."""

    model_config = ConfigDict(extra="forbid", title="Provider limits")

    max_in_flight: int = Field(
        default=0,
        ge=0,
        le=1024,
        title="Calls in flight",
        description="Calls this run makes at the same time. "
        "0 (default): the provider's own limit, as listed in the README.",
    )
    requests_per_second: float = Field(
        default=0,
        ge=0,
        title="Calls per second",
        description="Most calls per second this run makes. 0 (default): the provider's own "
        "rate limit, if it has one (the built-in providers have none).",
    )
    global_max_in_flight: int = Field(
        default=0,
        ge=0,
        le=4096,
        title="Calls in flight, whole account",
        description="Sets the limit shared by every run and worker on this provider account "
        "(the Prefect global concurrency limit named after it, e.g. tryon-changeclothes). "
        "0 (default): leave that limit as it is.",
    )

    @field_validator("max_in_flight", "requests_per_second", "global_max_in_flight", mode="before")
    @classmethod
    def _none_is_default(cls, value: object) -> object:
        """Callers written when these were optional pass None for the default."""
        return 0 if value is None else value


class BatchParams(BaseModel):
    """A try-on batch: which manifest, which lake, which provider, and how hard to call it."""

    model_config = ConfigDict(extra="forbid", title="Try-on batch")

    manifest: str = Field(
        title="Manifest",
        description="The manifest to run: a CSV or Parquet file, as a path (relative paths "
        "start from the worker's working folder) or a URL such as "
        "s3://bucket/manifests/today.parquet.",
    )
    lake: str = Field(
        default="./lake",
        title="Lake",
        description="Where results and metadata are written: a folder, or a URL such as "
        "s3://bucket/lake.",
    )
    provider: str = Field(
        default="changeclothes",
        title="Provider",
        description="The try-on provider for every row whose provider column is empty.",
        json_schema_extra={"enum": PROVIDER_NAMES},
    )
    route: dict[str, str] = Field(
        default_factory=dict,
        title="Provider by category",
        description="The provider for rows of a category whose provider column is empty, "
        "e.g. dresses: hidream. A row's provider column still wins; categories not listed "
        "take the run's provider.",
    )
    fallback: list[str] = Field(
        default_factory=list,
        title="Fallback providers",
        description="Providers to try in order when a row's provider fails for a reason the "
        "next one may not share (its own refusals, an unusable result, no credits, a bad key, "
        "retries spent). A bad input (fetch, decode, size) does not fall back.",
        json_schema_extra={"items": {"enum": PROVIDER_NAMES}},
    )
    compare: list[str] = Field(
        default_factory=list,
        title="Compare with",
        description="Providers every valid row also goes to, side by side with its own "
        "provider: one result and one metadata record per row and provider.",
        json_schema_extra={"items": {"enum": PROVIDER_NAMES}},
    )
    chunk_size: int = Field(
        default=100,
        ge=1,
        le=10_000,
        title="Rows per chunk",
        description="Rows handled by one Prefect task run.",
    )
    limits: ProviderLimits = Field(
        default_factory=ProviderLimits,
        title="Limits",
        description="Limits on the calls to the try-on provider.",
    )
    max_attempts: int = Field(
        default=4,
        ge=1,
        le=20,
        title="Attempts per row",
        description="Most calls made for one row, retries included.",
    )
    refine: bool = Field(
        default=False,
        title="Refine",
        description="Also run the AILabTools refiner on every try-on result.",
    )
    refine_gender: RefineGender = Field(
        default="unset",
        title="Gender for the refiner",
        description="The gender the refiner uses for rows whose gender column is empty. "
        "unset (default): such rows are invalid when refining.",
    )
    refine_limits: ProviderLimits = Field(
        default_factory=ProviderLimits,
        title="Refiner limits",
        description="Limits on the calls to the refiner.",
    )
    currency: str = Field(
        default="USD",
        title="Currency",
        description="The currency of prices, costs and the budget (ISO 4217, e.g. USD). A "
        "provider whose published price is in another currency counts as unknown unless "
        "its price is given below.",
    )
    prices: dict[str, float] = Field(
        default_factory=dict,
        title="Prices per call",
        description="Price per charged call by provider (ailab_refiner for the refiner), in "
        "the currency above, e.g. changeclothes: 0.05. Not given: the TRYON_PRICES variable "
        "where the flow runs, else the vendor's published price; else unknown.",
    )
    budget: float = Field(
        default=0,
        ge=0,
        title="Budget",
        description="Most this run may spend, in the currency above: it stops calling before "
        "a call could pass it, and the rest are skipped (BUDGET_EXHAUSTED); a rerun goes on "
        "from there. 0 (default): no cap. Needs every price in play to be known.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        title="Storage options",
        description="fsspec options for the lake, the manifest and the input images, such as "
        "endpoint_url. Never credentials: the worker's environment holds those.",
    )
    fetch_allow: list[str] = Field(
        default_factory=list,
        title="Private image hosts allowed",
        description="Non-public places input image URLs may reach: networks (10.0.0.0/8, "
        "fd00::/8), single addresses or exact host names. Empty (default): loopback, "
        "private, shared (CGNAT), link-local (cloud metadata), multicast and reserved "
        "addresses are refused, after DNS and on every redirect.",
    )
    fetch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        title="Image fetch timeout (seconds)",
        description="How long an input image URL may go without sending data (connecting "
        "takes at most 10 seconds).",
    )

    @property
    def gender_for_refiner(self) -> Gender | None:
        """The refiner's gender for rows without one, or None."""
        return None if self.refine_gender == "unset" else self.refine_gender

    def plan_options(self) -> dict[str, Any]:
        """``tasks.plan.plan_run``'s options for this run: where its rows go."""
        return {
            "default_provider": self.provider,
            "refine": self.refine,
            "refine_gender": self.gender_for_refiner,
            "route": self.route,
            "compare": self.compare,
            "fallback": self.fallback,
        }

    def chunk_settings(self, prices: Mapping[str, Decimal | None] | None = None) -> ChunkSettings:
        """The run-wide part of what a chunk in another process needs (its share of slots,
        rate and any fatal error are filled in per chunk); ``prices``: the run's, settled."""
        return ChunkSettings(
            prices={k: None if v is None else str(v) for k, v in (prices or {}).items()},
            lake=self.lake,
            storage_options=self.storage_options,
            max_in_flight=1,
            refine=self.refine,
            refine_gender=self.gender_for_refiner,
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

    @field_validator("fallback", "compare")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(provider_spec(name).name for name in value))

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, value: str) -> str:
        code = value.strip().upper()
        if len(code) != 3 or not code.isalpha():
            raise ValueError(f"currency must be an ISO 4217 code such as USD, not {value!r}")
        return code

    @field_validator("prices")
    @classmethod
    def _priced_accounts(cls, value: dict[str, float]) -> dict[str, float]:
        accounts = {spec.name for spec in all_specs()}
        for name, amount in value.items():
            if name not in accounts:
                known = ", ".join(sorted(accounts))
                raise ValueError(f"prices: unknown provider {name!r} (known: {known})")
            if not amount >= 0 or amount == float("inf"):
                raise ValueError(f"prices: {name} must cost 0 or more, not {amount}")
        return value

    @field_validator("route")
    @classmethod
    def _known_routes(cls, value: dict[str, str]) -> dict[str, str]:
        for category in value:
            if category not in CATEGORIES:
                raise ValueError(
                    f"route: unknown category {category!r} (expected one of: "
                    f"{', '.join(CATEGORIES)})"
                )
        return {category: provider_spec(name).name for category, name in value.items()}

    @field_validator("refine_gender", mode="before")
    @classmethod
    def _unset_for_none(cls, value: object) -> object:
        """Callers written when this was optional pass None for unset."""
        return "unset" if value is None else value

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


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def run_name(params: BatchParams, *, at: datetime, kind: str = "") -> str:
    """A flow run's name people can tell apart in the UI: the manifest's file name without its
    extension, the provider (and the refiner), an optional kind, and the UTC start time, e.g.
    ``manifest-changeclothes-20250601T140322Z`` (``...-vs-hidream-...`` when comparing)."""
    stem = PurePosixPath(urlsplit(params.manifest).path).stem
    stem = _NAME_UNSAFE.sub("-", stem).strip("-")[:40] or "manifest"
    parts = [stem, params.provider + ("+refine" if params.refine else "")]
    if params.compare:
        parts.append("vs-" + "-".join(params.compare))
    if kind:
        parts.append(kind)
    parts.append(at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ"))
    return "-".join(parts)
