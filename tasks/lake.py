"""The lake: result images, per-row metadata (Parquet) and run summaries, through fsspec.

Pure IO helpers, no Prefect. Paths are built only from validated ids and fixed names, and
every path is checked to stay under the lake root before anything is written.

Layout (one run):
    <lake>/results/<run_id>/<row_id>/<stage>.<ext>          result image
    <lake>/results/<run_id>/<row_id>/<stage>-mask.<ext>     mask, when the provider returns one
    <lake>/metadata/run_id=<run_id>/part-<n>.parquet        one record per row and stage
    <lake>/runs/<run_id>/summary.json                       counts, parameters, timings
"""

from __future__ import annotations

import asyncio
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem

from schemas.manifest import is_safe_id
from schemas.results import RowRecord, records_to_frame


class LakePathError(ValueError):
    """A path would leave the lake root."""


@dataclass(frozen=True, slots=True)
class Lake:
    fs: fsspec.AbstractFileSystem
    root: str  # the root path as the filesystem sees it (no protocol)
    uri: str  # the root as the user wrote it, normalised (with protocol for remote stores)

    @classmethod
    def open(cls, uri: str, *, storage_options: dict[str, Any] | None = None) -> Lake:
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            fs = LocalFileSystem(auto_mkdir=True)
            root = fs._strip_protocol(root)
            display = root
        else:
            root = root.rstrip("/")
            display = fs.unstrip_protocol(root)
        return cls(fs=fs, root=root.rstrip("/"), uri=display)

    # -- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Join ``parts`` under the root; refuse anything that would resolve outside it."""
        for part in parts:
            if not part or part.startswith("/") or "\\" in part:
                raise LakePathError(f"unsafe lake path component {part!r}")
        joined = posixpath.normpath(posixpath.join(self.root, *parts))
        if joined != self.root and not joined.startswith(self.root.rstrip("/") + "/"):
            raise LakePathError(f"path {'/'.join(parts)!r} leaves the lake root")
        return joined

    def full_uri(self, path: str) -> str:
        """The URI a reader outside this process can open (local paths stay plain paths)."""
        return path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(path)

    def result_path(self, run_id: str, row_id: str, name: str) -> str:
        for value, what in ((run_id, "run id"), (row_id, "row id")):
            if not is_safe_id(value):
                raise LakePathError(f"{what} {value!r} is unsafe for a path")
        return self.path("results", run_id, row_id, name)

    def metadata_dir(self) -> str:
        return self.path("metadata")

    def metadata_glob(self) -> str:
        return self.full_uri(self.metadata_dir()) + "/**/*.parquet"

    # -- writes (sync; async wrappers below keep the event loop free) --------------------------
    def write_bytes(self, path: str, data: bytes) -> str:
        parent = posixpath.dirname(path)
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(path, data)
        return self.full_uri(path)

    def write_metadata(self, run_id: str, part: str, records: list[RowRecord]) -> str:
        """Write one Parquet part with the fixed metadata schema; returns its URI."""
        path = self.path("metadata", f"run_id={run_id}", f"{part}.parquet")
        frame = records_to_frame(records)
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as handle:
            frame.write_parquet(handle)
        return self.full_uri(path)

    def write_json(self, path: str, payload: dict[str, Any]) -> str:
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        return self.write_bytes(path, data)

    def read_metadata(self, run_id: str | None = None) -> pl.DataFrame:
        """Read the metadata dataset back (all runs, or one)."""
        base = (
            self.path("metadata") if run_id is None else self.path("metadata", f"run_id={run_id}")
        )
        files = sorted(self.fs.glob(base + "/**/*.parquet"))
        if not files:
            return records_to_frame([])
        frames = []
        for file in files:
            with self.fs.open(file, "rb") as handle:
                frames.append(pl.read_parquet(handle))
        return pl.concat(frames, how="vertical")

    async def awrite_bytes(self, path: str, data: bytes) -> str:
        return await asyncio.to_thread(self.write_bytes, path, data)

    async def awrite_metadata(self, run_id: str, part: str, records: list[RowRecord]) -> str:
        return await asyncio.to_thread(self.write_metadata, run_id, part, records)
