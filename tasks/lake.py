"""The lake: result images, per-row metadata (Parquet) and run summaries, through fsspec.

Pure IO helpers, no Prefect. Paths are built only from validated ids and fixed names, and
every path is checked to stay under the lake root before anything is written.

Layout:
    outputs/<sha256>.<ext>                  result images and masks, content-addressed
    inputs/<sha256>.<ext>                   prepared inputs staged for URL-only providers
    metadata/run_id=<run_id>/<part>.parquet one record per row and stage, committed runs only
    runs/<run_id>/parts/<part>.parquet      a run's parts until it commits
    runs/<run_id>/{started,summary}.json    parameters, counts, timings
    runs/<run_id>/_COMMITTED                the commit marker, written last
    work/, jobs/                            the work ledger (tasks/ledger.py)

Commit protocol (dlt's filesystem pattern): a run writes its metadata parts under its own
``runs/<run_id>/parts/``; at the end it copies them to ``metadata/run_id=<run_id>/`` (fixed
names: a retried run overwrites, never duplicates) and writes ``_COMMITTED`` last. So
``pl.scan_parquet("<lake>/metadata/**/*.parquet")`` sees only finished runs, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        options = dict(storage_options or {})
        if uri.split("://", 1)[0] in ("s3", "s3a"):
            # Presigned URLs (inputs staged for URL-only providers) must be SigV4: botocore
            # still signs SigV2 in us-east-1, which S3 refuses for buckets made since 2020.
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("signature_version", "s3v4")
            options["config_kwargs"] = config
        fs, root = fsspec.core.url_to_fs(uri, **options)
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

    def output_path(self, sha256: str, extension: str) -> str:
        """Where a result image lives: named by its content, so a retry or a rerun that gets
        the same bytes writes the same object, and nothing a provider says names a path."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise LakePathError(f"not a sha256 digest: {sha256!r}")
        if not extension.isalnum():
            raise LakePathError(f"unsafe extension {extension!r}")
        return self.path("outputs", f"{sha256}.{extension}")

    def run_path(self, run_id: str, *parts: str) -> str:
        if not is_safe_id(run_id):
            raise LakePathError(f"run id {run_id!r} is unsafe for a path")
        return self.path("runs", run_id, *parts)

    def metadata_dir(self) -> str:
        return self.path("metadata")

    def metadata_glob(self) -> str:
        return self.full_uri(self.metadata_dir()) + "/**/*.parquet"

    # -- writes (sync; async wrappers below keep the event loop free) --------------------------
    def write_bytes(self, path: str, data: bytes) -> str:
        # No makedirs on object stores: s3fs's would create a mistyped bucket; the local
        # filesystem makes parents itself (auto_mkdir).
        self.fs.pipe_file(path, data)
        return self.full_uri(path)

    def write_metadata(self, run_id: str, part: str, records: list[RowRecord]) -> str:
        """Write one Parquet part, with the fixed metadata schema, to the run's staging folder
        (published by ``commit_run``); returns its URI."""
        path = self.run_path(run_id, "parts", f"{part}.parquet")
        frame = records_to_frame(records)
        with self.fs.open(path, "wb") as handle:
            frame.write_parquet(handle)
        return self.full_uri(path)

    def write_json(self, path: str, payload: dict[str, Any]) -> str:
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        return self.write_bytes(path, data)

    # -- commit ---------------------------------------------------------------------------------
    def commit_marker(self, run_id: str) -> str:
        return self.run_path(run_id, "_COMMITTED")

    def is_committed(self, run_id: str) -> bool:
        return bool(self.fs.exists(self.commit_marker(run_id)))

    def commit_run(self, run_id: str, payload: dict[str, Any]) -> str:
        """Publish the run's staged parts to ``metadata/run_id=<run_id>/`` and write the
        marker last. A retried run replaces its parts in place and drops parts it no longer
        has; the marker is rewritten with the retry's payload."""
        staged = self.run_path(run_id, "parts")
        published = self.path("metadata", f"run_id={run_id}")
        parts = sorted(self.fs.glob(staged + "/*.parquet")) if self.fs.exists(staged) else []
        names = {posixpath.basename(p) for p in parts}
        for part in parts:
            self.fs.copy(part, posixpath.join(published, posixpath.basename(part)))
        if self.fs.exists(published):
            for old in self.fs.glob(published + "/*.parquet"):
                if posixpath.basename(old) not in names:
                    self.fs.rm_file(old)
        marker = self.commit_marker(run_id)
        data = json.dumps({**payload, "parts": sorted(names)}, sort_keys=True, default=str)
        try:
            with self.fs.open(marker, "xb") as handle:  # exclusive: one commit per run...
                handle.write(data.encode())
        except FileExistsError:  # ...unless the same run is retried: then it recommits
            self.fs.pipe_file(marker, data.encode())
        return self.full_uri(marker)

    def read_uri(self, uri: str) -> bytes:
        """Bytes of an object this lake wrote (``full_uri`` form), guarded to the root."""
        path = self.fs._strip_protocol(uri)
        if path != self.root and not path.startswith(self.root.rstrip("/") + "/"):
            raise LakePathError(f"{uri!r} is not in the lake")
        return bytes(self.fs.cat_file(path))

    def remove_if_exists(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def read_metadata(self, run_id: str | None = None) -> pl.DataFrame:
        """Read the committed metadata dataset back (all runs, or one)."""
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
