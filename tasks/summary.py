"""A run's summary from its chunks' outcomes: counts, calls, where things are, what stopped it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from schemas.results import PRIMARY_TRACK, Stage, Status
from schemas.summary import ErrorCount, RunSummary
from tasks.error_counts import top_errors
from tasks.lake import Lake
from tasks.money import Budget

if TYPE_CHECKING:
    from tasks.process import Lane, RunState
    from tasks.tryon import ChunkOutcome


def first_fatal(lanes: Sequence[Lane | None]) -> RunState | None:
    """The state of the first lane a run-fatal error stopped, if any."""
    return next((lane.state for lane in lanes if lane is not None and lane.state.fatal), None)


def summarize(
    *,
    run_id: str,
    provider: str,
    lake: Lake,
    outcomes: Sequence[ChunkOutcome],
    invalid_rows: int,
    total_rows: int,
    refine: bool,
    stopped: RunState | None,
    duration_s: float,
    errors: Sequence[ErrorCount] = (),
    budget: Budget | None = None,
    prices: Mapping[str, Decimal | None] | None = None,
) -> RunSummary:
    """``errors``: counted outside the chunks (the invalid rows). ``prices``: each account's
    in the run (the cost is unknown when one is)."""
    counts: Counter[str] = Counter({str(Status.INVALID): invalid_rows} if invalid_rows else {})
    refine_counts: Counter[str] = Counter()
    compare_counts: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        if outcome.track == PRIMARY_TRACK:
            counts.update(outcome.counts.get(Stage.TRYON, {}))
            refine_counts.update(outcome.counts.get(Stage.REFINE, {}))
        else:
            compared = compare_counts.setdefault(outcome.provider, Counter())
            compared.update(outcome.counts.get(Stage.TRYON, {}))
    fatal = stopped.fatal if stopped else None
    return RunSummary(
        run_id=run_id,
        provider=provider,
        lake=lake.uri,
        results_uri=lake.full_uri(lake.path("outputs")),
        metadata_uri=lake.metadata_glob(),
        summary_uri=lake.full_uri(lake.path("runs", run_id, "summary.json")),
        contact_sheet_uri=lake.full_uri(lake.run_path(run_id, "contact_sheet.html")),
        counts=dict(counts),
        refine_counts=dict(refine_counts) if refine else None,
        compare_counts={name: dict(c) for name, c in compare_counts.items()},
        fell_back=sum(o.fell_back for o in outcomes if o.track == PRIMARY_TRACK),
        unfinished=sum(o.unfinished for o in outcomes),
        already_done=sum(o.already_done for o in outcomes if o.track == PRIMARY_TRACK),
        total_rows=total_rows,
        provider_calls=sum(o.provider_calls for o in outcomes),
        duration_s=round(duration_s, 3),
        fatal_error=str(fatal) if fatal else None,
        fatal_at=(
            datetime.fromtimestamp(stopped.fatal_at, UTC) if stopped and stopped.fatal_at else None
        ),
        chunk_processes=sorted({o.process for o in outcomes}),
        top_errors=top_errors([errors, *(o.errors for o in outcomes)]),
        currency=budget.currency if budget else None,
        cost=(
            None
            if prices is None or None in prices.values()
            else round(sum(o.cost for o in outcomes), 6)
        ),
        budget=float(budget.limit) if budget and budget.limit is not None else None,
        budget_exhausted=bool(budget and budget.exhausted),
        unpriced=sorted(name for name, price in (prices or {}).items() if price is None),
    )


def commit_run(lake: Lake, summary: RunSummary) -> None:
    """Write the summary, then the commit marker: readers and reruns trust this run's metadata
    from the marker on. Blocking: run it in a thread."""
    run_id = summary.run_id
    lake.write_json(lake.path("runs", run_id, "summary.json"), summary.model_dump(mode="json"))
    lake.commit_run(run_id, {"run_id": run_id, "committed_at": datetime.now(UTC)})
