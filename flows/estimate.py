"""What ``tryon plan`` and the ``tryon-plan`` flow compute: a run's estimate from its
parameters, with no provider call and no image fetched (``tasks.estimate``). Prefect-free, so
the command answers without starting a server."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import polars as pl

from flows.params import BatchParams
from providers.registry import PROVIDERS, REFINER, ProviderSpec
from schemas.manifest import ManifestError
from schemas.summary import RunNotStarted
from tasks.estimate import Limits, estimate_run, read_done_work, totals
from tasks.lake import Lake
from tasks.manifest import load_manifest, redact_uri
from tasks.money import run_prices
from tasks.plan import RunPlan, plan_run

__all__ = ["RunEstimate", "estimate_for"]


@dataclass(frozen=True, slots=True)
class RunEstimate:
    plan: RunPlan
    lines: pl.DataFrame  # tasks.estimate.ESTIMATE_SCHEMA
    currency: str
    calls: int
    cost: float | None  # None: a price in play is unknown
    seconds: float | None  # None: a provider with calls has no recorded call times
    prices: dict[str, Decimal | None]
    lake_runs: int  # committed runs the lake holds (what "done" was matched against)

    def to_json(self) -> dict[str, Any]:
        """The estimate as plain data: ``tryon plan --format json``, the flow's result."""
        return {
            "currency": self.currency,
            "calls": self.calls,
            "cost": self.cost,
            "seconds": self.seconds,
            "invalid_rows": len(self.plan.invalid),
            "lines": self.lines.to_dicts(),
        }


def _limits(spec: ProviderSpec, params: BatchParams) -> Limits:
    limits = params.refine_limits if spec is REFINER else params.limits
    return Limits(
        max_in_flight=limits.max_in_flight or spec.max_in_flight,
        requests_per_second=limits.requests_per_second or spec.requests_per_second,
    )


def estimate_for(params: BatchParams) -> RunEstimate:
    """The estimate of the run ``params`` describe (blocking). Raises ``RunNotStarted`` when
    the manifest is unusable or a price is malformed, as the run would."""
    try:
        report = load_manifest(
            params.manifest,
            storage_options=params.storage_options,
            known_providers=sorted(PROVIDERS),
            check_files=True,
        )
    except ManifestError as exc:
        raise RunNotStarted(f"{exc} ({redact_uri(params.manifest)})") from None
    plan = plan_run(report, **params.plan_options())
    specs = [PROVIDERS[name] for name in plan.providers()] + ([REFINER] if params.refine else [])
    try:
        prices = run_prices(specs, currency=params.currency, given=params.prices)
    except ValueError as exc:
        raise RunNotStarted(str(exc)) from None
    lake = Lake.open(params.lake, storage_options=params.storage_options)
    done = read_done_work(lake if lake.fs.exists(lake.metadata_dir()) else None)
    lines = estimate_run(
        plan,
        done=done,
        prices=prices,
        limits={spec.name: _limits(spec, params) for spec in specs},
        refine=params.refine,
        refine_gender=params.gender_for_refiner,
    )
    total = totals(lines)
    return RunEstimate(
        plan=plan,
        lines=lines,
        currency=params.currency,
        calls=int(total["calls"] or 0),
        cost=total["cost"],  # type: ignore[arg-type]
        seconds=total["seconds"],  # type: ignore[arg-type]
        prices=prices,
        lake_runs=done["run_id"].n_unique() if done.height else 0,
    )
