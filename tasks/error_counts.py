"""The errors that kept rows from succeeding, counted per stage and code with one example each:
what a chunk reports and what the end of a run shows."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from schemas.results import RowRecord, Stage, Status, is_unfinished
from schemas.summary import EXAMPLE_CHARS, ErrorCount

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
        unfinished = is_unfinished(record.status, record.error_kind, record.fallback_to)
        if not (record.status == Status.INVALID or unfinished):
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
