"""A run's estimate before it starts (``tryon plan``): per provider and stage, the rows to do,
the rows earlier runs already did (free), the calls, their cost and how long they should take.

Prefect-free, no provider call, no image fetched. A run knows work by the hashes of its
prepared inputs (``tasks.ledger.work_key``), which needs every image fetched and prepared; the
estimate matches each row's request as the manifest gives it (input URIs, category, prompt,
garment description, gender sent) against the succeeded records of the lake's committed runs,
per provider. What it can miss, and which way:

- an image changed in place under the same URI: counted done, but the run does it again (and
  pays): the estimate is low;
- the same image under another URI, or the same work recorded only in a crashed run's ledger:
  counted to do, but the run finds it done: the estimate is high;
- retries and fallbacks cannot be known before: calls are one per row and stage that is to do
  (a fallback provider's line shows what its rows would cost if every one came to it);
- the refiner redoes a row whose try-on is redone (its input is the new result).

Durations: rows to do x the provider's median call time in the lake's records / the calls in
flight (or the rate limit, when slower); unknown without recorded calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import polars as pl

from providers.registry import PROVIDERS, REFINER
from schemas.manifest_rows import ManifestRows
from schemas.results import PRIMARY_TRACK, Stage, Status, records_to_frame
from tasks.lake import Lake
from tasks.plan import RunPlan, provider_capability_checks
from tasks.scorecard import read_committed

__all__ = ["ESTIMATE_SCHEMA", "Limits", "estimate_run", "read_done_work", "totals"]

# A row's request as the manifest gives it, and as the metadata records it.
REQUEST: Final = (
    "person_image",
    "garment_image",
    "lower_garment_image",
    "category",
    "prompt",
    "garment_description",
    "gender",
)
_DONE_COLUMNS: Final = (
    "run_id",
    "stage",
    "provider",
    "status",
    "fallback_from",
    "coarse_provider",
    "attempts",
    "provider_ms",
    *REQUEST,
)
ESTIMATE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "provider": pl.String(),
    "stage": pl.String(),
    "track": pl.String(),
    "rows": pl.Int64(),  # rows this line's provider may get
    "done": pl.Int64(),  # of those, done by earlier committed runs: free
    "to_do": pl.Int64(),
    "calls": pl.Int64(),  # first attempts: one per row to do
    "price": pl.Float64(),  # per charged call; null: unknown
    "cost": pl.Float64(),  # calls x price; null: unknown
    "call_ms_p50": pl.Float64(),  # from the lake's records of this provider and stage
    "seconds": pl.Float64(),  # at the run's limits; null: no recorded calls
}


@dataclass(frozen=True, slots=True)
class Limits:
    """One account's limits for the run: calls in flight, and calls per second (or None)."""

    max_in_flight: int
    requests_per_second: float | None = None


def read_done_work(lake: Lake | None) -> pl.DataFrame:
    """The succeeded records of the lake's committed runs, with their requests (blocking)."""
    if lake is None:
        return records_to_frame([]).select(_DONE_COLUMNS)
    records = read_committed(lake, columns=_DONE_COLUMNS).records
    return records.filter(pl.col("status") == str(Status.SUCCEEDED))


def _requests(rows: ManifestRows, refine_gender: str | None) -> pl.DataFrame:
    """The rows' requests as a run sends them: the gender a refining run falls back on."""
    frame = rows.frame(REQUEST)
    return frame.with_columns(pl.col("gender").fill_null(pl.lit(refine_gender, pl.String())))


def _done(requests: pl.DataFrame, done: pl.DataFrame, condition: pl.Expr) -> pl.Series:
    """Per row of ``requests``, whether a record in ``done`` matching ``condition`` has its
    request (nulls match nulls: an absent prompt is the same absent prompt)."""
    found = done.filter(condition).select(REQUEST).unique()
    keyed = requests.select(REQUEST).with_row_index("__at")
    hit = keyed.join(found, on=list(REQUEST), how="semi", nulls_equal=True)["__at"]
    return keyed["__at"].is_in(hit.implode())


def _median_ms(done: pl.DataFrame, provider: str, stage: str) -> float | None:
    calls = done.filter(
        (pl.col("provider") == provider)
        & (pl.col("stage") == stage)
        & (pl.col("attempts").fill_null(0) > 0)
        & pl.col("provider_ms").is_not_null()
    )["provider_ms"]
    return float(calls.median()) if calls.len() else None  # type: ignore[arg-type]


def estimate_run(
    plan: RunPlan,
    *,
    done: pl.DataFrame,
    prices: Mapping[str, Decimal | None],
    limits: Mapping[str, Limits],
    refine: bool = False,
    refine_gender: str | None = None,
) -> pl.DataFrame:
    """One line per provider, stage and track of the run ``plan`` describes, with
    ``ESTIMATE_SCHEMA``'s columns. ``done``: ``read_done_work``."""
    lines: list[dict[str, object]] = []
    tracks: list[tuple[str, str, ManifestRows, Sequence[str]]] = [
        (name, PRIMARY_TRACK, rows, [f for f in plan.fallback if f != name])
        for name, rows in plan.rows_by_provider.items()
    ] + [(name, name, rows, []) for name, rows in plan.compare.items()]
    fallback_rows: dict[str, int] = {}
    for name, track, rows, fallbacks in tracks:
        requests = _requests(rows, refine_gender)
        doers = [name, *fallbacks]
        by_fallback = pl.col("provider").is_in(fallbacks) & pl.col("fallback_from").is_not_null()
        tried = pl.col("stage") == str(Stage.TRYON)
        tryon_done = _done(requests, done, tried & ((pl.col("provider") == name) | by_fallback))
        takes = _takes(requests, name) if track != PRIMARY_TRACK else pl.Series([True] * len(rows))
        to_do = takes & ~tryon_done
        lines.append(
            _line(name, Stage.TRYON, track, takes, tryon_done, to_do, done, prices, limits)
        )
        for fallback in fallbacks:  # at most every row that is to do could come to it
            fallback_rows[fallback] = fallback_rows.get(fallback, 0) + int(to_do.sum())
        if refine:
            applicable = requests["garment_image"].is_not_null() & (
                requests["category"] != "lower_body"
            ).fill_null(False)
            refined = (pl.col("stage") == str(Stage.REFINE)) & pl.col("coarse_provider").is_in(
                doers
            )
            refine_done = _done(requests, done, refined)
            refine_to_do = takes & applicable & (to_do | ~refine_done)
            lines.append(
                _line(
                    REFINER.name,
                    Stage.REFINE,
                    track,
                    takes & applicable,
                    takes & applicable & ~refine_to_do,
                    refine_to_do,
                    done,
                    prices,
                    limits,
                )
            )
    for fallback, rows_in in fallback_rows.items():
        lines.append(
            _line(
                fallback,
                Stage.TRYON,
                "fallback",
                pl.Series([True] * rows_in),
                pl.Series([False] * rows_in),
                pl.Series([True] * rows_in),
                done,
                prices,
                limits,
            )
        )
    return pl.DataFrame(lines, schema=ESTIMATE_SCHEMA, orient="row" if not lines else None)


def _takes(requests: pl.DataFrame, name: str) -> pl.Series:
    """Per row, whether provider ``name`` takes its request shape (``tasks.plan``'s rules)."""
    shapes = requests.select(
        pl.lit(name).alias("__provider"),
        pl.col("category"),
        pl.col("gender"),
        pl.col("garment_image").is_not_null().alias("garment_image"),
        pl.col("lower_garment_image").is_not_null().alias("lower_garment_image"),
    )
    checks = provider_capability_checks({name: PROVIDERS[name]})
    failing = pl.any_horizontal([when for when, _ in checks]) if checks else pl.lit(False)
    return shapes.select(~failing.fill_null(False))[:, 0]


def _line(
    provider: str,
    stage: Stage,
    track: str,
    rows: pl.Series,
    done_rows: pl.Series,
    to_do: pl.Series,
    done: pl.DataFrame,
    prices: Mapping[str, Decimal | None],
    limits: Mapping[str, Limits],
) -> dict[str, object]:
    calls = int(to_do.sum())
    price = prices.get(provider)
    p50 = _median_ms(done, provider, str(stage))
    limit = limits.get(provider)
    seconds = None
    if p50 is not None and limit is not None:
        seconds = calls * p50 / 1000 / max(1, limit.max_in_flight)
        if limit.requests_per_second:
            seconds = max(seconds, calls / limit.requests_per_second)
    return {
        "provider": provider,
        "stage": str(stage),
        "track": track,
        "rows": int(rows.sum()),
        "done": int(done_rows.sum()),
        "to_do": calls,
        "calls": calls,
        "price": None if price is None else float(price),
        "cost": None if price is None else float(price * calls),
        "call_ms_p50": p50,
        "seconds": None if seconds is None else round(seconds, 1),
    }


def totals(estimate: pl.DataFrame) -> dict[str, float | int | None]:
    """The run's calls and cost (unknown when a line with calls has an unknown price), and its
    duration: accounts work side by side, each account's lines one after another (a bound:
    the refiner's calls overlap the try-on's)."""
    own = estimate.filter(pl.col("track") != "fallback")
    with_calls = own.filter(pl.col("calls") > 0)
    cost = None if with_calls["cost"].is_null().any() else float(with_calls["cost"].sum())
    per_account = own.group_by("provider").agg(
        pl.when(pl.col("seconds").filter(pl.col("calls") > 0).is_null().any())
        .then(None)
        .otherwise(pl.col("seconds").sum())
        .alias("seconds")
    )
    seconds = per_account["seconds"]
    return {
        "calls": int(own["calls"].sum()),
        "cost": cost,
        "seconds": None if seconds.is_null().any() else float(seconds.max() or 0.0),
    }
