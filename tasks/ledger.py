"""The work ledger: what is already done, and which provider jobs are in flight, in the lake.

A rerun must never pay twice. Each stage of a row has a deterministic work key (``work_key``):
the stage, the provider, the parameters that shape its answer and the hashes of the prepared
inputs, so the same work is recognised whatever run, manifest or row id asks for it again.

    <lake>/work/<key>.json    written when a stage succeeded (or a row was found invalid): the
                              record that produced it, and which run's metadata records it
                              for which row id
    <lake>/jobs/<key>.json    written the moment a provider accepts an async job, before the
                              first poll: a rerun after a crash polls that job again instead of
                              submitting (and paying for) a new one
    <lake>/runs/<run>/_COMMITTED   the run's commit marker (see ``Lake.commit_run``)

Decision for a stage whose key is in the ledger: when another, committed run's metadata
already holds the record for this row id, nothing is written (no duplicate in the dataset);
otherwise the record is adopted into this run's metadata (a crashed run's finished work, or
this same run retried from the Prefect UI).

Lookups at scale (an object store answers each request in a round trip). At its first lookup
a run takes a ``LedgerSnapshot``: one listing of ``work/`` and of ``jobs/`` (paginated,
about one request per 1,000 keys), and the committed runs' metadata (``metadata/``, read
once, a GET per part, only runs whose ``_COMMITTED`` marker is there). Then:

- a key neither listed nor written by this run is not done, and has no job: no request;
- a key listed whose record a committed run's metadata holds (a succeeded record with that
  work key) is answered from that metadata: the entry, who produced it and which rows
  committed runs recorded it for, with no request per key;
- any other listed key (a crashed run's work, a fallback's redirect, an invalid or skipped
  row's finding) is read from ``work/`` as before: one GET;
- a job is deleted only when it was listed or recorded by this run.

A run that adds a key after the listing (another run on the same lake at the same time) is
not seen: the work may be done twice, as two runs of the same manifest at the same time
already may (README, "Reruns never pay twice"). Chunks run in other processes (Dask) do not
take the listing as the whole truth (``listing=False``): a key another process of the same
run wrote after it is still found, by a GET.

Memory stays bounded: keys are kept as 32-byte digests, the committed records as one Polars
frame with an index by key (records are built one at a time, when a row asks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import posixpath
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from schemas.manifest import is_safe_id
from schemas.results import METADATA_SCHEMA, RowRecord
from tasks.lake import Lake

LEDGER_VERSION = 1


def work_key(**parts: str | int | float | None) -> str:
    """A stable key over named parts (order-independent, ``None`` kept distinct from "")."""
    payload = json.dumps({"v": LEDGER_VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(slots=True)
class DoneEntry:
    key: str
    record: RowRecord  # the record of the stage as its producing run wrote it
    produced_by: str  # run id that did the work
    recorded: dict[str, str] = field(default_factory=dict)  # row id -> run id holding its record
    # Read from committed runs' metadata: every run in ``recorded`` is committed, and the
    # record holds what a reuse needs only (``partial``).
    committed: bool = False
    partial: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "produced_by": self.produced_by,
            "recorded": self.recorded,
            "record": self.record.model_dump(mode="json"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DoneEntry:
        return cls(
            key=data["key"],
            record=RowRecord.model_validate(data["record"]),
            produced_by=data["produced_by"],
            recorded=dict(data.get("recorded", {})),
        )


@dataclass(frozen=True, slots=True)
class JobEntry:
    key: str
    provider: str
    job_id: str
    run_id: str
    submitted_at: str


# The committed records a snapshot keeps: finished work (all columns: an adopted entry is the
# record itself). That is a success, or a finding final whatever run makes it (an invalid
# row, a row a provider or the refiner cannot take: skipped as permanent). Failed records,
# and rows a run-fatal error skipped, carry their work key too and are not done. Only keys
# listed in work/ are looked up here at all.
_FINISHED = (
    (pl.col("status") == "succeeded")
    | (pl.col("status") == "invalid")
    | ((pl.col("status") == "skipped") & (pl.col("error_kind") == "permanent"))
)
_RECORD_FIELDS = frozenset(RowRecord.model_fields)
# What a snapshot keeps of each record: what a reuse copies, who recorded it for which row.
# The rest (paths, prompts, timings) would be most of its memory at 100,000 rows; an entry
# adopted for another row reads the whole record from work/ first (``WorkLedger.adopt``).
_SNAPSHOT_COLUMNS = (
    "work_key", "run_id", "row_id", "row_index", "stage", "provider", "track", "status",
    "error_kind", "fallback_from", "output_uri", "mask_uri", "person_sha256",
    "garment_sha256", "output_sha256", "request_id", "cache_hit", "reused_from_run",
)  # fmt: skip


_WORK_KEY = re.compile(r"[0-9a-f]{64}")


def _digest(key: str) -> bytes:
    """A work key as its 32 bytes; ``ValueError`` unless it is one (lower-case hex)."""
    if not _WORK_KEY.fullmatch(key):
        raise ValueError(f"not a work key: {key!r}")
    return bytes.fromhex(key)


def _listed_keys(lake: Lake, folder: str) -> set[bytes]:
    """The work keys with an entry under ``folder`` (``work/`` or ``jobs/``), as digests."""
    keys = set()
    for path in lake.list_files(lake.path(folder)):
        name = posixpath.basename(path)
        if name.endswith(".json") and len(name) == 69:
            with contextlib.suppress(ValueError):
                keys.add(bytes.fromhex(name[:64]))
    return keys


class LedgerSnapshot:
    """What the lake's ledger held when a run first looked (see the module docstring): the
    keys listed in ``work/`` and ``jobs/``, plus those this run wrote since, and the committed
    runs' succeeded records by work key. Shared by a run's ledgers in one process."""

    def __init__(self) -> None:
        self.work: set[bytes] = set()
        self.jobs: set[bytes] = set()
        self.committed_runs: set[str] = set()
        self.records = pl.DataFrame()
        self._rows: dict[bytes, tuple[int, int]] = {}  # key -> (first row, count) in records
        self._loaded = False
        self._lock = threading.Lock()
        self.stats: dict[str, float | int] = {}

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self, lake: Lake) -> None:
        """List the ledger and read the committed metadata, once (blocking; thread-safe)."""
        with self._lock:
            if self._loaded:
                return
            t0 = time.perf_counter()
            work, jobs = _listed_keys(lake, "work"), _listed_keys(lake, "jobs")
            self.work |= work
            self.jobs |= jobs
            self._read_committed(lake)
            self.stats = {
                "work_keys": len(work),
                "job_keys": len(jobs),
                "committed_runs": len(self.committed_runs),
                "committed_records": self.records.height,
                "load_s": round(time.perf_counter() - t0, 3),
            }
            self._loaded = True

    def _read_committed(self, lake: Lake) -> None:
        parts: dict[str, list[str]] = {}
        for path in lake.list_files(lake.metadata_dir()):
            folder = posixpath.basename(posixpath.dirname(path))
            if folder.startswith("run_id=") and path.endswith(".parquet"):
                parts.setdefault(folder.removeprefix("run_id="), []).append(path)
        # Parts of a run killed while committing are in metadata/ without its marker.
        committed = [run for run in sorted(parts) if is_safe_id(run) and lake.is_committed(run)]
        self.committed_runs = set(committed)
        paths = [path for run in committed for path in sorted(parts[run])]
        frames = []
        for data in lake.read_many(paths):
            frame = pl.read_parquet(io.BytesIO(data))
            if "work_key" not in frame.columns or "status" not in frame.columns:
                continue
            frame = align_metadata(frame).filter(_FINISHED & pl.col("work_key").is_not_null())
            if frame.height:
                frames.append(frame.select(_SNAPSHOT_COLUMNS))
        if not frames:
            return
        # The producing run's record first for each key (reused_from_run null), then others.
        records = (
            pl.concat(frames, how="vertical")
            .sort(["work_key", pl.col("reused_from_run").is_not_null(), "run_id"])
            .rechunk()
        )
        index: dict[bytes, tuple[int, int]] = {}
        keys = records["work_key"].to_list()
        start = 0
        for i in range(1, len(keys) + 1):
            if i == len(keys) or keys[i] != keys[start]:
                with contextlib.suppress(ValueError):
                    index[bytes.fromhex(keys[start])] = (start, i - start)
                start = i
        self.records, self._rows = records, index

    def entry(self, key: str, digest: bytes) -> DoneEntry | None:
        """The entry committed runs' metadata gives for ``key``, or None."""
        found = self._rows.get(digest)
        if found is None:
            return None
        first, count = found
        columns = self.records.columns
        producer = dict(zip(columns, self.records.row(first), strict=True))
        recorded: dict[str, str] = {}
        for i in range(first, first + count):
            row = self.records.row(i, named=True) if i != first else producer
            # An invalid row without an id is recorded under its number (tasks.tryon).
            row_id = row["row_id"] if row["row_id"] is not None else f"#{row['row_index']}"
            recorded[row_id] = row["run_id"]
        record = RowRecord.model_validate(
            {name: value for name, value in producer.items() if name in _RECORD_FIELDS}
        )
        return DoneEntry(
            key=key,
            record=record,
            produced_by=producer["reused_from_run"] or producer["run_id"],
            recorded=recorded,
            committed=True,
            partial=True,
        )


# A run's snapshot, shared by the ledgers of the run in this process while any holds it.
_SNAPSHOTS: weakref.WeakValueDictionary[tuple[str, str, int], LedgerSnapshot] = (
    weakref.WeakValueDictionary()
)
_SNAPSHOTS_LOCK = threading.Lock()


def _shared_snapshot(lake: Lake, run_id: str) -> LedgerSnapshot:
    key = (lake.uri, run_id, id(lake.fs))
    with _SNAPSHOTS_LOCK:
        snapshot = _SNAPSHOTS.get(key)
        if snapshot is None:
            snapshot = _SNAPSHOTS[key] = LedgerSnapshot()
        return snapshot


class WorkLedger:
    """Ledger reads and writes for one run. IO runs off the event loop; safe to share across
    rows. ``listing``: look up through the run's snapshot (the flow's own process); False:
    every lookup reads the lake, one GET per key (a chunk in another process, which cannot
    see what the run's other processes write after its listing)."""

    def __init__(self, lake: Lake, run_id: str, *, listing: bool = True) -> None:
        self.lake = lake
        self.run_id = run_id
        self.listing = listing
        self.snapshot = _shared_snapshot(lake, run_id)
        self._committed: dict[str, bool] = {}

    def _path(self, folder: str, key: str) -> str:
        if not _WORK_KEY.fullmatch(key):
            raise ValueError(f"not a work key: {key!r}")
        return self.lake.path(folder, key[:2], f"{key}.json")

    async def _snapshot(self) -> LedgerSnapshot:
        if not self.snapshot.loaded:
            await asyncio.to_thread(self.snapshot.load, self.lake)
            for run in self.snapshot.committed_runs:
                self._committed[run] = True
        return self.snapshot

    async def _read(self, path: str) -> dict[str, Any] | None:
        try:
            data = await self.lake.aread_bytes(path)
        except FileNotFoundError:
            return None
        try:
            parsed = json.loads(data)
        except ValueError:
            return None  # a torn write is no entry: the work is redone, never trusted half
        return parsed if isinstance(parsed, dict) else None

    # -- finished work ---------------------------------------------------------------------------
    async def done(self, key: str) -> DoneEntry | None:
        digest = _digest(key)
        if self.listing:
            snapshot = await self._snapshot()
            if digest not in snapshot.work:
                return None  # not in the ledger when the run looked, nor written by it since
            entry = snapshot.entry(key, digest)
            if entry is not None:
                return entry
        data = await self._read(self._path("work", key))
        if data is None:
            return None
        try:
            return DoneEntry.from_json(data)
        except (KeyError, ValueError):
            return None

    async def mark_done(self, key: str, record: RowRecord) -> DoneEntry:
        """This run did the work for ``record``'s row and records it in its metadata."""
        assert record.row_id is not None
        entry = DoneEntry(
            key=key,
            record=record.model_copy(),
            produced_by=self.run_id,
            recorded={record.row_id: self.run_id},
        )
        await self._write_entry(entry)
        return entry

    async def adopt(self, entry: DoneEntry, row_id: str) -> None:
        """This run records ``entry``'s work for ``row_id`` in its own metadata."""
        if entry.partial:  # from the snapshot: the entry in work/ has the whole record
            data = await self._read(self._path("work", entry.key))
            with contextlib.suppress(KeyError, ValueError, TypeError):
                if data is not None:
                    whole = DoneEntry.from_json(data)
                    entry.record, entry.partial = whole.record, False
                    entry.recorded = {**whole.recorded, **entry.recorded}
        entry.recorded[row_id] = self.run_id
        await self._write_entry(entry)

    async def _write_entry(self, entry: DoneEntry) -> None:
        data = json.dumps(entry.to_json(), sort_keys=True).encode()
        await self.lake.awrite_bytes(self._path("work", entry.key), data)
        self.snapshot.work.add(_digest(entry.key))

    async def recorded_elsewhere(self, entry: DoneEntry, row_id: str) -> str | None:
        """The committed other run whose metadata already holds this row's record, or None."""
        run = entry.recorded.get(row_id)
        if run is None or run == self.run_id:
            return None
        if entry.committed:  # read from committed runs' metadata: no marker to check
            return run
        return run if await self.is_committed(run) else None

    async def is_committed(self, run_id: str) -> bool:
        if run_id not in self._committed:
            self._committed[run_id] = await asyncio.to_thread(self.lake.is_committed, run_id)
        return self._committed[run_id]

    # -- accepted async jobs ---------------------------------------------------------------------
    async def job(self, key: str) -> JobEntry | None:
        if self.listing and _digest(key) not in (await self._snapshot()).jobs:
            return None
        data = await self._read(self._path("jobs", key))
        if data is None:
            return None
        try:
            return JobEntry(**data)
        except TypeError:
            return None

    async def record_job(self, key: str, provider: str, job_id: str) -> None:
        entry = JobEntry(
            key=key,
            provider=provider,
            job_id=job_id,
            run_id=self.run_id,
            submitted_at=datetime.now(UTC).isoformat(),
        )
        data = json.dumps(_job_json(entry))
        self.snapshot.jobs.add(_digest(key))  # before the write: a crash leaves it to forget
        await self.lake.awrite_bytes(self._path("jobs", key), data.encode())

    async def forget_job(self, key: str) -> None:
        """The job ended (its result is in ``work/``, or it failed): nothing to resume."""
        digest = _digest(key)
        if self.listing and digest not in (await self._snapshot()).jobs:
            return  # never listed, never recorded by this run: nothing to delete
        await self.lake.aremove_if_exists(self._path("jobs", key))
        self.snapshot.jobs.discard(digest)


def align_metadata(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` (a metadata part) with exactly ``METADATA_SCHEMA``'s columns and types: a
    column an older part lacks is null."""
    present = set(frame.columns)
    return frame.select(
        pl.col(name).cast(dtype) if name in present else pl.lit(None, dtype=dtype).alias(name)
        for name, dtype in METADATA_SCHEMA.items()
    )


def _job_json(entry: JobEntry) -> dict[str, str]:
    return {
        "key": entry.key,
        "provider": entry.provider,
        "job_id": entry.job_id,
        "run_id": entry.run_id,
        "submitted_at": entry.submitted_at,
    }
