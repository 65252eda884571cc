"""Emulator configuration: result lifetime, accounts, and per-provider fault plans."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BadOutput = Literal["blank", "unchanged", "tiny", "wide", "corrupt"]
"""A successful result the fault plan swaps for one a result check must catch: ``blank`` a
black frame, ``unchanged`` the person input re-encoded, ``tiny`` a 64 px thumbnail, ``wide`` a
6.4:1 banner, ``corrupt`` the result's first half (it stops decoding half way)."""


class FaultPlan(BaseModel):
    """Faults one provider's endpoints inject. Random draws come from a seeded RNG."""

    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(default=0.0, ge=0.0, description="Added to every vendor call.")
    latency_jitter_s: float = Field(default=0.0, ge=0.0, description="Uniform +/- on latency.")
    error_rate_5xx: float = Field(default=0.0, ge=0.0, le=1.0, description="HTTP 503, non-JSON.")
    error_rate_429: float = Field(default=0.0, ge=0.0, le=1.0, description="HTTP 429.")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After sent with a 429.")
    timeout_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="Calls that hang.")
    timeout_s: float = Field(default=600.0, gt=0.0, description="How long a hanging call hangs.")
    credits: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Credits left before the credit-exhausted code: one per successful call, or the"
            " vendor's own count where it bills in credits (ailab: 10 a try-on, 25 a refine)."
            " None: unlimited."
        ),
    )
    forced_codes: list[int | str] = Field(
        default_factory=list,
        description="A queue: the next calls answer these vendor codes (ints or strings).",
    )
    bad_outputs: list[BadOutput] = Field(
        default_factory=list,
        description="A queue: the next successful results are replaced by these bad outputs.",
    )
    bad_output_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Successful results (past the queue) replaced by a `bad_output` one.",
    )
    bad_output: BadOutput = Field(
        default="blank", description="What `bad_output_rate` replaces results with."
    )
    # Asynchronous providers: how a submitted job moves queued -> running -> done/failed.
    job_queued_s: float = Field(default=0.3, ge=0.0, description="Time a job spends queued.")
    job_running_s: float = Field(default=0.7, ge=0.0, description="Time a job spends running.")
    async_failure_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Jobs that end failed instead of done."
    )

    @field_validator("bad_outputs", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``blank,unchanged`` as well as a list: what a ``--fault`` option gives as a string."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class EmulatorConfig(BaseModel):
    """Everything the emulator needs; the defaults give a well-behaved, fault-free server."""

    model_config = ConfigDict(extra="forbid")

    result_ttl_s: float = Field(default=3600.0, gt=0.0, description="Result URLs expire after.")
    faults: dict[str, FaultPlan] = Field(
        default_factory=dict, description="Per provider name; providers not named get no faults."
    )
    seed: int = Field(default=0, description="Seeds fault draws and random result seeds.")
    fast_mode: bool = Field(
        default=False,
        description="Skip decoding: check image signatures only and return pre-rendered results.",
    )
    deleted_user_keys: list[str] = Field(
        default_factory=list, description="Tokens of accounts that no longer exist."
    )
    trial_keys: dict[str, int] = Field(
        default_factory=dict, description="Trial tokens and how many successful calls each gets."
    )
    blocked_words: list[str] = Field(
        default_factory=lambda: ["nsfw", "nude", "naked", "porn"],
        description="Whole words that make a text field harmful content.",
    )
    composite_max_side: int = Field(default=768, ge=64, le=4096)
    composite_cache_size: int = Field(default=512, ge=1, description="Composites kept (LRU).")
    max_stored_results: int = Field(
        default=50_000, ge=1, description="Result files kept; the oldest go first past this."
    )
    fetch_timeout_s: float = Field(default=15.0, gt=0.0, description="For image URLs in requests.")
    echo_credentials: bool = Field(
        default=False,
        description=(
            "Authentication errors quote the credential received, as some vendors' do: "
            "for testing that clients redact error text."
        ),
    )
    result_name_prefix: str = Field(
        default="",
        description=(
            "Put before each result file's token in result URLs, e.g. '..%2F..%2Fescape-' to "
            "hand out hostile file names (the files are still served)."
        ),
    )
    max_image_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)

    def fault_plan(self, provider: str) -> FaultPlan:
        return self.faults.get(provider) or FaultPlan()


def faults_from_options(
    specs: list[str], *, providers: list[str], latency_s: float | None = None
) -> dict[str, FaultPlan]:
    """``tryon emulator --fault`` options -> fault plans.

    Each spec is ``PROVIDER.FIELD=VALUE`` (``hidream.error_rate_5xx=0.1``,
    ``changeclothes.forced_codes=[10005]``, ``ailab.bad_outputs=blank,unchanged``) or
    ``all.FIELD=VALUE`` for every provider; values are JSON where they parse as JSON, else
    strings. ``latency_s`` sets every provider's latency.
    """
    import json

    fields: dict[str, dict[str, object]] = {name: {} for name in providers}
    if latency_s is not None:
        for name in providers:
            fields[name]["latency_s"] = latency_s
    for spec in specs:
        target, sep, raw = spec.partition("=")
        provider, dot, field = target.partition(".")
        if not (sep and dot and field):
            raise ValueError(f"fault {spec!r}: expected PROVIDER.FIELD=VALUE")
        if provider != "all" and provider not in fields:
            raise ValueError(f"fault {spec!r}: unknown provider {provider!r} ({providers})")
        if field not in FaultPlan.model_fields:
            raise ValueError(
                f"fault {spec!r}: unknown field {field!r} ({', '.join(FaultPlan.model_fields)})"
            )
        try:
            value: object = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        for name in providers if provider == "all" else [provider]:
            fields[name][field] = value
    return {name: FaultPlan(**values) for name, values in fields.items() if values}
