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
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.results import RowRecord
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


class WorkLedger:
    """Ledger reads and writes for one run. IO runs in threads; safe to share across rows."""

    def __init__(self, lake: Lake, run_id: str) -> None:
        self.lake = lake
        self.run_id = run_id
        self._committed: dict[str, bool] = {}

    def _path(self, folder: str, key: str) -> str:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a work key: {key!r}")
        return self.lake.path(folder, key[:2], f"{key}.json")

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            data = self.lake.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            parsed = json.loads(data)
        except ValueError:
            return None  # a torn write is no entry: the work is redone, never trusted half
        return parsed if isinstance(parsed, dict) else None

    # -- finished work ---------------------------------------------------------------------------
    async def done(self, key: str) -> DoneEntry | None:
        data = await asyncio.to_thread(self._read, self._path("work", key))
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
        entry.recorded[row_id] = self.run_id
        await self._write_entry(entry)

    async def _write_entry(self, entry: DoneEntry) -> None:
        data = json.dumps(entry.to_json(), sort_keys=True).encode()
        await self.lake.awrite_bytes(self._path("work", entry.key), data)

    async def recorded_elsewhere(self, entry: DoneEntry, row_id: str) -> str | None:
        """The committed other run whose metadata already holds this row's record, or None."""
        run = entry.recorded.get(row_id)
        if run is None or run == self.run_id:
            return None
        return run if await self.is_committed(run) else None

    async def is_committed(self, run_id: str) -> bool:
        if run_id not in self._committed:
            self._committed[run_id] = await asyncio.to_thread(self.lake.is_committed, run_id)
        return self._committed[run_id]

    # -- accepted async jobs ---------------------------------------------------------------------
    async def job(self, key: str) -> JobEntry | None:
        data = await asyncio.to_thread(self._read, self._path("jobs", key))
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
        await self.lake.awrite_bytes(self._path("jobs", key), data.encode())

    async def forget_job(self, key: str) -> None:
        """The job ended (its result is in ``work/``, or it failed): nothing to resume."""
        path = self._path("jobs", key)
        await asyncio.to_thread(self.lake.remove_if_exists, path)


def _job_json(entry: JobEntry) -> dict[str, str]:
    return {
        "key": entry.key,
        "provider": entry.provider,
        "job_id": entry.job_id,
        "run_id": entry.run_id,
        "submitted_at": entry.submitted_at,
    }
