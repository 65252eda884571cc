"""The per-row metadata contract: one record per manifest row and stage, written as Parquet.

A fixed Polars schema keeps every part file identical in column types (an all-null column is
still typed), so ``pl.scan_parquet("<lake>/metadata/**/*.parquet")`` reads every run together.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import polars as pl
from pydantic import BaseModel, ConfigDict, PrivateAttr


class Status(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the provider or an input failed for this row
    INVALID = "invalid"  # the manifest row itself is bad; nothing was attempted
    SKIPPED = "skipped"  # not attempted: a run-fatal error stopped submissions first


# The track of a row's own provider (from the manifest, a route or the run's default) and the
# providers it falls back to; a compared provider's track is named after the provider.
PRIMARY_TRACK = "primary"


class Stage(StrEnum):
    TRYON = "tryon"
    REFINE = "refine"


class ErrorKind(StrEnum):
    """How an error affects the run; shared by validation, preparation and every provider."""

    TRANSIENT = "transient"  # worth retrying: 5xx, timeouts, rate limits
    PERMANENT = "permanent"  # this row cannot succeed as given: record it and move on
    FATAL = "fatal"  # no row can succeed (bad key, no credits): stop submitting
    INVALID = "invalid"  # the manifest row failed validation


METADATA_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "row_id": pl.String(),
    "row_index": pl.Int64(),  # 0-based position in the manifest: tells duplicate ids apart
    "stage": pl.String(),
    "provider": pl.String(),
    # "primary": the row's own provider and its fallbacks; else the compared provider's name
    "track": pl.String(),
    "fallback_from": pl.String(),  # try-on: the provider whose failure sent the row here
    "fallback_to": pl.String(),  # try-on: where the row went on after this record's failure
    "coarse_provider": pl.String(),  # refine: the try-on provider whose result it refined
    "status": pl.String(),
    "error_kind": pl.String(),
    "error_code": pl.String(),
    "error_message": pl.String(),
    "output_uri": pl.String(),
    "mask_uri": pl.String(),
    "person_image": pl.String(),
    "garment_image": pl.String(),
    "lower_garment_image": pl.String(),
    "category": pl.String(),
    # The rest of the row's request, as the manifest gave it: with the input URIs, what
    # `tryon plan` matches to tell work already done without fetching an image.
    "prompt": pl.String(),
    "garment_description": pl.String(),
    "gender": pl.String(),
    "person_sha256": pl.String(),  # hashes of the prepared inputs actually sent
    "garment_sha256": pl.String(),
    "output_sha256": pl.String(),
    "attempts": pl.Int32(),
    "request_id": pl.String(),  # the provider's id for the call (or async task id)
    "cache_hit": pl.Boolean(),
    "work_key": pl.String(),  # stage + provider + parameters + input hashes (tasks/ledger.py)
    "reused_from_run": pl.String(),  # set when the work was done by an earlier, crashed run
    "started_at": pl.Datetime("us", "UTC"),
    "finished_at": pl.Datetime("us", "UTC"),
    "prepare_ms": pl.Float64(),  # fetch + decode + fit of the inputs
    "provider_ms": pl.Float64(),  # the provider call(s), retries included
    "download_ms": pl.Float64(),  # fetching the result before its URL expires
    "total_ms": pl.Float64(),
    # What this record's calls cost, in the run's currency: 0 when the vendor charged nothing,
    # null when the provider's price is unknown or the run counts no money.
    "cost": pl.Float64(),
}


class RowRecord(BaseModel):
    """One metadata record. Field names and order match ``METADATA_SCHEMA``."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    row_id: str | None
    row_index: int
    stage: Stage = Stage.TRYON
    provider: str
    track: str = PRIMARY_TRACK
    fallback_from: str | None = None
    fallback_to: str | None = None
    coarse_provider: str | None = None
    status: Status
    error_kind: ErrorKind | None = None
    error_code: str | None = None
    error_message: str | None = None
    output_uri: str | None = None
    mask_uri: str | None = None
    person_image: str | None = None
    garment_image: str | None = None
    lower_garment_image: str | None = None
    category: str | None = None
    prompt: str | None = None
    garment_description: str | None = None
    gender: str | None = None
    person_sha256: str | None = None
    garment_sha256: str | None = None
    output_sha256: str | None = None
    attempts: int = 0
    request_id: str | None = None
    cache_hit: bool | None = None
    work_key: str | None = None
    reused_from_run: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    prepare_ms: float | None = None
    provider_ms: float | None = None
    download_ms: float | None = None
    total_ms: float | None = None
    cost: float | None = None
    # Not a column: True when a committed earlier run's metadata already holds this record,
    # so this run reports the row as done without writing it again (no duplicates).
    _already_recorded: bool = PrivateAttr(default=False)

    @property
    def already_recorded(self) -> bool:
        return self._already_recorded

    def mark_already_recorded(self) -> None:
        self._already_recorded = True


def is_unfinished(
    status: Status | str, error_kind: ErrorKind | str | None, fallback_to: str | None = None
) -> bool:
    """Work a retry should redo: a failure, or a row a run-fatal error kept from running.

    Rows skipped as not applicable (e.g. no top garment to refine) and invalid rows are
    finished: running them again cannot change their outcome. A record whose row went on to
    a fallback provider is not the row's outcome: the fallback's record is.
    """
    if fallback_to is not None:
        return False
    return status == Status.FAILED or (status == Status.SKIPPED and error_kind == ErrorKind.FATAL)


def records_to_frame(records: list[RowRecord]) -> pl.DataFrame:
    """Records -> a DataFrame with exactly ``METADATA_SCHEMA`` (works for zero records too)."""
    rows = [r.model_dump(mode="python") for r in records]
    for row in rows:
        for key in ("stage", "status", "error_kind"):
            if row[key] is not None:
                row[key] = str(row[key])
    return pl.DataFrame(rows, schema=METADATA_SCHEMA, orient="row" if not rows else None)
