"""A run's records for its report: read back from the lake, grouped per row, counted.

Prefect-free. ``read_run_records`` reads what one run reports (its metadata, plus the records
``write_report_records`` kept for rows an earlier run recorded); ``group_rows`` pairs each
manifest row's stages; ``count_statuses`` and ``group_failures`` are the report's tallies.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Final

import polars as pl

from schemas.manifest import is_safe_id
from schemas.results import PRIMARY_TRACK, RowRecord, Stage, Status, records_to_frame
from tasks.lake import Lake, LakePathError

__all__ = [
    "MESSAGE_CHARS",
    "FailureGroup",
    "SheetRow",
    "SheetTrack",
    "StatusCount",
    "count_statuses",
    "group_failures",
    "group_rows",
    "read_run_records",
    "route_note",
    "stage_entries",
    "write_report_records",
]

# Error messages are cut here on the sheet's image (the page and the metadata have them whole).
MESSAGE_CHARS: Final = 300


@dataclass(frozen=True, slots=True)
class SheetTrack:
    """One track of a manifest row: its try-on records in the order the row went through
    them (each but the last fell back to the next), and the refine of its result."""

    name: str  # PRIMARY_TRACK, or the compared provider's name
    tryons: tuple[RowRecord, ...]
    refine: RowRecord | None = None

    @property
    def tryon(self) -> RowRecord | None:
        """The track's try-on outcome: the last record of its chain."""
        return self.tryons[-1] if self.tryons else None

    @property
    def records(self) -> tuple[RowRecord, ...]:
        return self.tryons + ((self.refine,) if self.refine is not None else ())


@dataclass(frozen=True, slots=True)
class SheetRow:
    """One manifest row: its try-on record and, when the run refined, its refine record.

    ``tryon`` and ``refine`` are the primary track's outcome; ``tracks`` holds every track,
    the primary first (when it has records), then compared providers' by name."""

    row_index: int
    tryon: RowRecord | None
    refine: RowRecord | None
    prompt: str | None = None  # a prompt row's text (not in the records: from the manifest)
    tracks: tuple[SheetTrack, ...] = ()

    @property
    def row_id(self) -> str | None:
        record = self.tryon or self.refine
        if record is None:
            record = next((r for t in self.tracks for r in t.records), None)
        return record.row_id if record else None

    @property
    def primary(self) -> SheetTrack | None:
        return self.track(PRIMARY_TRACK)

    def track(self, name: str) -> SheetTrack | None:
        return next((t for t in self.tracks if t.name == name), None)

    @property
    def status(self) -> Status:
        """The row's worst outcome over its stages and tracks, for colouring. A record that
        fell back is not an outcome: the record it fell back to is."""
        outcomes = [self.tryon, self.refine]
        outcomes += [r for t in self.tracks if t.name != PRIMARY_TRACK for r in (t.tryon, t.refine)]
        statuses = [r.status for r in outcomes if r is not None]
        for worst in (Status.INVALID, Status.FAILED, Status.SKIPPED):
            if worst in statuses:
                return worst
        return Status.SUCCEEDED


def group_rows(records: Iterable[RowRecord]) -> list[SheetRow]:
    """Records -> one ``SheetRow`` per manifest row, in manifest order.

    Keyed by ``row_index`` (ids may repeat in a bad manifest), then by track. Should a
    (row, track, stage) be recorded twice, the record that finished last wins; a try-on chain
    that fell back keeps one record per provider (the last finished), in fallback order.
    """
    by_index: dict[int, dict[str, list[RowRecord]]] = {}
    for record in records:
        by_index.setdefault(record.row_index, {}).setdefault(record.track, []).append(record)
    rows = []
    for index, by_track in sorted(by_index.items()):
        tracks = [
            _track(name, by_track[name])
            for name in sorted(by_track, key=lambda n: (n != PRIMARY_TRACK, n))
        ]
        primary = tracks[0] if tracks[0].name == PRIMARY_TRACK else None
        rows.append(
            SheetRow(
                row_index=index,
                tryon=primary.tryon if primary else None,
                refine=primary.refine if primary else None,
                tracks=tuple(tracks),
            )
        )
    return rows


def _track(name: str, records: list[RowRecord]) -> SheetTrack:
    refine: RowRecord | None = None
    tryons: list[RowRecord] = []
    for record in records:
        if record.stage == Stage.REFINE:
            refine = _later(refine, record)
        else:
            tryons.append(record)
    return SheetTrack(name, _chain(tryons), refine)


def _later(held: RowRecord | None, record: RowRecord) -> RowRecord:
    """The one of two records of the same thing that finished last (``record`` on a tie)."""
    return record if held is None or _finished_key(record) >= _finished_key(held) else held


def _chain(records: list[RowRecord]) -> tuple[RowRecord, ...]:
    """A track's try-on records in the order the row went through them.

    Without any fallback, one record: the last finished (a row recorded twice). With
    fallbacks, one per provider, from the first (no ``fallback_from`` among them) along
    ``fallback_to``; any record the links do not reach follows, by start time.
    """
    if not records:
        return ()
    if not any(r.fallback_from or r.fallback_to for r in records):
        last: RowRecord | None = None
        for record in records:
            last = _later(last, record)
        assert last is not None
        return (last,)
    by_provider: dict[str, RowRecord] = {}
    for record in records:
        by_provider[record.provider] = _later(by_provider.get(record.provider), record)
    ordered = sorted(by_provider.values(), key=_started_key)
    chain: list[RowRecord] = []
    for first in ordered:
        if first.fallback_from in by_provider or first in chain:
            continue
        step: RowRecord | None = first
        while step is not None and step not in chain:
            chain.append(step)
            step = by_provider.get(step.fallback_to) if step.fallback_to else None
    chain += [r for r in ordered if r not in chain]  # a loop in the links: nothing is lost
    return tuple(chain)


def _started_key(record: RowRecord) -> float:
    return record.started_at.timestamp() if record.started_at else float("-inf")


def _finished_key(record: RowRecord) -> float:
    return record.finished_at.timestamp() if record.finished_at else float("-inf")


def stage_entries(
    row: SheetRow, *, refined: bool, compared: Sequence[str] = ()
) -> list[tuple[str, RowRecord | None]]:
    """What a row's status lists, in order, as (label, record or None when it did not run):
    every try-on of the primary track's chain, its refine, then each compared track's."""
    primary = row.primary
    entries: list[tuple[str, RowRecord | None]] = [
        ("try-on", record) for record in (primary.tryons if primary else ())
    ] or [("try-on", row.tryon)]
    if refined:
        entries.append(("refine", row.refine))
    for name in compared:
        track = row.track(name)
        tryons = track.tryons if track else ()
        entries += [("compare try-on", record) for record in tryons] or [("compare try-on", None)]
        if refined:
            entries.append(("compare refine", track.refine if track else None))
    return entries


def route_note(record: RowRecord) -> str:
    """Where a try-on record sits in a fallback chain: "from X", "fell back to Y", both, or
    "" outside any chain."""
    parts = []
    if record.fallback_from:
        parts.append(f"from {record.fallback_from}")
    if record.fallback_to:
        parts.append(f"fell back to {record.fallback_to}")
    return ", ".join(parts)


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


# Fields without a default (a null is passed as such: ``row_id`` of an id-less invalid row).
_REQUIRED: Final = frozenset(n for n, f in RowRecord.model_fields.items() if f.is_required())


def _read_records(lake: Lake, folder: str) -> list[RowRecord]:
    records = []
    # One string object per distinct value (paths, run and provider names repeat across
    # rows), and no null passed (the field's default is the same None): ~1 KB less a record,
    # 100 MB at 100,000 rows.
    strings: dict[str, str] = {}
    same = strings.setdefault
    for file in sorted(lake.fs.glob(folder + "/*.parquet")):
        with lake.fs.open(file, "rb") as handle:
            frame = pl.read_parquet(handle)
        # Only known fields: a part written by an older or newer schema still reads.
        columns = [c for c in frame.columns if c in RowRecord.model_fields]
        records.extend(
            RowRecord.model_validate(
                {
                    k: same(v, v) if type(v) is str else v
                    for k, v in row.items()
                    if v is not None or k in _REQUIRED
                }
            )
            for row in frame.select(columns).iter_rows(named=True)
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
