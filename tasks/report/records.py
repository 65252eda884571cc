"""A run's records for its report: read back from the lake, grouped per row, counted.

Prefect-free. ``read_run_records`` reads what one run reports (its metadata, plus the records
``write_report_records`` kept for rows an earlier run recorded); ``group_rows`` pairs each
manifest row's stages; ``count_statuses`` and ``group_failures`` are the report's tallies.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Final

import polars as pl

from schemas.manifest import is_safe_id
from schemas.results import RowRecord, Stage, Status, records_to_frame
from tasks.lake import Lake, LakePathError

__all__ = [
    "MESSAGE_CHARS",
    "FailureGroup",
    "SheetRow",
    "StatusCount",
    "count_statuses",
    "group_failures",
    "group_rows",
    "read_run_records",
    "write_report_records",
]

# Error messages are cut here on the sheet's image (the page and the metadata have them whole).
MESSAGE_CHARS: Final = 300


@dataclass(frozen=True, slots=True)
class SheetRow:
    """One manifest row: its try-on record and, when the run refined, its refine record."""

    row_index: int
    tryon: RowRecord | None
    refine: RowRecord | None
    prompt: str | None = None  # a prompt row's text (not in the records: from the manifest)

    @property
    def row_id(self) -> str | None:
        record = self.tryon or self.refine
        return record.row_id if record else None

    @property
    def status(self) -> Status:
        """The row's worst outcome over its stages, for colouring."""
        statuses = [r.status for r in (self.tryon, self.refine) if r is not None]
        for worst in (Status.INVALID, Status.FAILED, Status.SKIPPED):
            if worst in statuses:
                return worst
        return Status.SUCCEEDED


def group_rows(records: Iterable[RowRecord]) -> list[SheetRow]:
    """Records -> one ``SheetRow`` per manifest row, in manifest order.

    Keyed by ``row_index`` (ids may repeat in a bad manifest). Should a (row, stage) be
    recorded twice, the record that finished last wins.
    """
    by_index: dict[int, dict[Stage, RowRecord]] = {}
    for record in records:
        stages = by_index.setdefault(record.row_index, {})
        held = stages.get(record.stage)
        if held is None or _finished_key(record) >= _finished_key(held):
            stages[record.stage] = record
    return [
        SheetRow(row_index=index, tryon=stages.get(Stage.TRYON), refine=stages.get(Stage.REFINE))
        for index, stages in sorted(by_index.items())
    ]


def _finished_key(record: RowRecord) -> float:
    return record.finished_at.timestamp() if record.finished_at else float("-inf")


def read_run_records(lake: Lake, run_id: str) -> list[RowRecord]:
    """Every record one run reports, read back from the lake (blocking).

    The run's metadata (published once committed, else still staged under the run), plus the
    records kept by ``write_report_records``: rows whose record an earlier committed run's
    metadata already holds, so this run's metadata does not repeat them.
    """
    if lake.is_committed(run_id):
        metadata = lake.path("metadata", f"run_id={run_id}")
    else:
        metadata = lake.path("runs", run_id, "parts")
    held = _read_records(lake, _report_dir(lake, run_id))
    for record in held:  # kept only for the report: an earlier run's metadata holds them
        record.mark_already_recorded()
    return _read_records(lake, metadata) + held


def write_report_records(lake: Lake, run_id: str, part: str, records: list[RowRecord]) -> str:
    """Keep records for the run's report that its metadata will not hold (blocking).

    For rows done and recorded by an earlier committed run (``already_recorded``): the
    contact sheet still shows them, the metadata dataset stays free of duplicates.
    """
    if not is_safe_id(part):
        raise LakePathError(f"part name {part!r} is unsafe for a path")
    buffer = BytesIO()
    records_to_frame(records).write_parquet(buffer)
    return lake.write_bytes(
        posixpath.join(_report_dir(lake, run_id), f"{part}.parquet"), buffer.getvalue()
    )


def _report_dir(lake: Lake, run_id: str) -> str:
    if not is_safe_id(run_id):
        raise LakePathError(f"run id {run_id!r} is unsafe for a path")
    return lake.path("runs", run_id, "report")


def _read_records(lake: Lake, folder: str) -> list[RowRecord]:
    records = []
    for file in sorted(lake.fs.glob(folder + "/*.parquet")):
        with lake.fs.open(file, "rb") as handle:
            frame = pl.read_parquet(handle)
        # Only known fields: a part written by an older or newer schema still reads.
        columns = [c for c in frame.columns if c in RowRecord.model_fields]
        records.extend(
            RowRecord.model_validate(row) for row in frame.select(columns).iter_rows(named=True)
        )
    return records


@dataclass(frozen=True, slots=True)
class StatusCount:
    provider: str
    stage: str
    status: str
    records: int


def count_statuses(records: Iterable[RowRecord]) -> list[StatusCount]:
    """Records per (provider, stage, status), sorted; one record per row and stage."""
    counts = Counter((r.provider, str(r.stage), str(r.status)) for r in records)
    return [StatusCount(p, stage, status, n) for (p, stage, status), n in sorted(counts.items())]


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Rows that did not succeed, sharing a stage, a status and an error code."""

    stage: str
    status: str
    error_code: str | None
    error_kind: str | None
    records: int
    example_row_ids: tuple[str, ...]
    example_message: str | None


def group_failures(records: Iterable[RowRecord], *, examples: int = 5) -> list[FailureGroup]:
    """Non-succeeded records grouped by (stage, status, error code), largest group first."""
    groups: dict[tuple[str, str, str | None], list[RowRecord]] = {}
    for record in records:
        if record.status != Status.SUCCEEDED:
            key = (str(record.stage), str(record.status), record.error_code)
            groups.setdefault(key, []).append(record)
    result = []
    for (stage, status, code), members in groups.items():
        members.sort(key=lambda r: r.row_index)
        first = members[0]
        result.append(
            FailureGroup(
                stage=stage,
                status=status,
                error_code=code,
                error_kind=str(first.error_kind) if first.error_kind else None,
                records=len(members),
                example_row_ids=tuple(_row_label(r) for r in members[:examples]),
                example_message=next((r.error_message for r in members if r.error_message), None),
            )
        )
    result.sort(key=lambda g: (-g.records, g.stage, g.status, g.error_code or ""))
    return result


def _row_label(record: RowRecord) -> str:
    return record.row_id if record.row_id else f"#{record.row_index + 1}"
