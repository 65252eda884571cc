"""A run's summary from its chunks' outcomes: counts, calls, where things are, what stopped it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from schemas.results import RowRecord, Stage, Status, is_unfinished
from schemas.summary import EXAMPLE_CHARS, ErrorCount, RunSummary
from tasks.lake import Lake

if TYPE_CHECKING:  # tasks.tryon counts its chunks' errors with ``count_errors``
    from tasks.process import Lane, RunState
    from tasks.tryon import ChunkOutcome

TOP_ERRORS: Final = 10  # (stage, code) pairs a summary keeps

# Where an error code comes from, for people: by prefix, else the provider that answered it.
_SOURCES: Final = (
    ("INVALID_ROW", "manifest"),
    ("FETCH_", "input fetch"),
    ("DECODE_", "input image"),
    ("BAD_", "input image"),
    ("UNSUPPORTED_", "input image"),
    ("IMAGE_", "input image"),
)


def error_source(stage: str, code: str, provider: str) -> str:
    """ "input fetch", "manifest"... or the provider, for the stage and code of a record."""
    source = next((name for prefix, name in _SOURCES if code.startswith(prefix)), provider)
    return f"refine, {source}" if stage == Stage.REFINE else source


def count_errors(records: Iterable[RowRecord]) -> list[ErrorCount]:
    """The records that keep a run from succeeding (failed, invalid, skipped by a run-fatal
    error), counted per (stage, error code) with the first one's message as the example."""
    counts: dict[tuple[str, str], ErrorCount] = {}
    for record in records:
        if not (record.status == Status.INVALID or is_unfinished(record.status, record.error_kind)):
            continue
        stage, code = str(record.stage), record.error_code or f"no code ({record.status})"
        held = counts.get((stage, code))
        if held is None:
            message = " ".join((record.error_message or "").split())
            if len(message) > EXAMPLE_CHARS:
                message = message[: EXAMPLE_CHARS - 3] + "..."
            counts[(stage, code)] = ErrorCount(
                stage=stage,
                code=code,
                count=1,
                source=error_source(stage, code, record.provider),
                example=message,
                example_row=record.row_id,
            )
        else:
            held.count += 1
    return list(counts.values())


def top_errors(groups: Iterable[Iterable[ErrorCount]], limit: int = TOP_ERRORS) -> list[ErrorCount]:
    """Counts from several chunks merged per (stage, code), largest first; the first example
    seen is kept."""
    merged: dict[tuple[str, str], ErrorCount] = {}
    for group in groups:
        for error in group:
            held = merged.get((error.stage, error.code))
            if held is None:
                merged[(error.stage, error.code)] = error.model_copy()
            else:
                held.count += error.count
    ranked = sorted(merged.values(), key=lambda e: (-e.count, e.stage != Stage.TRYON, e.code))
    return ranked[:limit]


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
) -> RunSummary:
    """``errors``: counted outside the chunks (the invalid rows)."""
    counts: Counter[str] = Counter({str(Status.INVALID): invalid_rows} if invalid_rows else {})
    refine_counts: Counter[str] = Counter()
    for outcome in outcomes:
        counts.update(outcome.counts.get(Stage.TRYON, {}))
        refine_counts.update(outcome.counts.get(Stage.REFINE, {}))
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
        unfinished=sum(o.unfinished for o in outcomes),
        already_done=sum(o.already_done for o in outcomes),
        total_rows=total_rows,
        provider_calls=sum(o.provider_calls for o in outcomes),
        duration_s=round(duration_s, 3),
        fatal_error=str(fatal) if fatal else None,
        fatal_at=(
            datetime.fromtimestamp(stopped.fatal_at, UTC) if stopped and stopped.fatal_at else None
        ),
        chunk_processes=sorted({o.process for o in outcomes}),
        top_errors=top_errors([errors, *(o.errors for o in outcomes)]),
    )


def commit_run(lake: Lake, summary: RunSummary) -> None:
    """Write the summary, then the commit marker: readers and reruns trust this run's metadata
    from the marker on. Blocking: run it in a thread."""
    run_id = summary.run_id
    lake.write_json(lake.path("runs", run_id, "summary.json"), summary.model_dump(mode="json"))
    lake.commit_run(run_id, {"run_id": run_id, "committed_at": datetime.now(UTC)})
