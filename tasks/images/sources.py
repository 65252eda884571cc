"""Recognise an input from its source, before fetching or decoding it. Prefect-free.

Work keys hash the *prepared* inputs (``tasks.ledger``), so without this a rerun would fetch
and prepare every image again only to learn that its work is done. ``identify_source`` names
a source cheaply, and ``SourceIndex`` maps that name and a provider's profile to the sha256
of what an earlier run prepared from it: a rerun of finished rows computes their work keys
from the index and neither fetches nor decodes.

What counts as the same source (anything else about it changing makes it a new one):

    local files    path, size, modification time, inode change time, inode
    s3://          bucket and key, ETag, size, version id
    http(s)://,    the bytes' sha256: the bytes are fetched (one GET), never decoded
    data:, memory://

So a local file rewritten in place is prepared again (its modification and change times
move), even with its old size and a restored modification time (``cp -p``, ``touch -d``:
the change time cannot be set back). An object rewritten under the same key has a new ETag.

The index lives in the lake as Parquet parts, ``sources/<run>-<random>.parquet``, each holding
what one chunk of one run prepared that the index did not know; a run reads them all once
when it starts (one listing and one GET per part) and merges them into one part once there
are many. An entry is a fact about the bytes prepared from a source, whoever wrote it, so
parts of runs that crashed count too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Final

import httpx
import polars as pl

from schemas.image_profile import ImageProfile
from schemas.uris import ImageRoute, classify_image_ref
from tasks.images.fetch import DEFAULT_MAX_FETCH_BYTES, fetch_bytes, route_filesystem
from tasks.lake import Lake

__all__ = ["SourceId", "SourceIndex", "identify_source", "source_key"]

logger = logging.getLogger(__name__)

SOURCES_DIR: Final = "sources"
# Past this many parts a run's start merges them into one (each part is a GET on S3).
MERGE_PARTS: Final = 64
_SCHEMA: Final = {"source": pl.String, "prepared_sha256": pl.String}


@dataclass(frozen=True, slots=True)
class SourceId:
    """What a source is, as far as a rerun can tell without decoding it."""

    identity: str  # e.g. "file:/data/p.jpg:size=..:mtime=..", "sha256:<hex>"
    data: bytes | None = None  # the bytes, when they had to be read to name the source


def source_key(identity: str, profile: ImageProfile) -> str:
    """The index key of ``identity`` prepared for ``profile`` (every field of it: a per-run
    override of a profile that keeps its name is another preparation)."""
    payload = json.dumps(
        {"source": identity, "profile": profile.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def content_identity(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def identify_source(
    uri: str,
    *,
    http: httpx.AsyncClient,
    storage_options: dict[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
) -> SourceId | None:
    """Name the source behind ``uri``; None when a file or object cannot be named (missing,
    refused, unreadable: reading it then reports why, as it always has). Sources named by
    their content are read here, so their ``ImageInputError`` is raised here."""
    verdict = classify_image_ref(uri) if uri else None
    if not isinstance(verdict, ImageRoute):
        return None
    if verdict.route in ("local", "file", "s3"):
        return await asyncio.to_thread(_stat_identity, verdict, dict(storage_options or {}))
    # http(s), data:, memory://: the content is the identity.
    data = await fetch_bytes(uri, http=http, max_bytes=max_bytes, storage_options=storage_options)
    return SourceId(content_identity(data), data)


def _stat_identity(route: ImageRoute, storage_options: dict[str, Any]) -> SourceId | None:
    try:
        if route.route == "s3":
            info = route_filesystem(route, storage_options).info(route.target)
            if info.get("type") != "file":
                return None
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
            if not etag:
                return None
            version = info.get("VersionId") or ""
            return SourceId(
                f"s3:{route.target}:etag={etag}:size={info.get('size')}:version={version}"
            )
        path = os.path.abspath(route.target)
        st = os.stat(path)
    except Exception:
        return None
    return SourceId(
        f"file:{path}:size={st.st_size}:mtime={st.st_mtime_ns}:ctime={st.st_ctime_ns}"
        f":ino={st.st_ino}"
    )


class SourceIndex:
    """(source, profile) -> the sha256 of the image prepared from it, for one run.

    ``load`` reads every part in the lake; ``remember`` adds what this run prepared;
    ``flush`` writes what is new as one part. Thread-safe bookkeeping.
    """

    def __init__(self, lake: Lake | None, run_id: str, known: dict[str, str] | None = None):
        self.lake = lake
        self.run_id = run_id
        self._known: dict[str, str] = dict(known or {})
        self._new: dict[str, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._known)

    @classmethod
    def load(cls, lake: Lake, run_id: str) -> SourceIndex:
        """Every part in ``lake`` (blocking IO: call it in a thread). A part that cannot be
        read is skipped: the index only saves work, it never decides an outcome."""
        folder = lake.path(SOURCES_DIR)
        try:
            paths = sorted(lake.fs.glob(folder + "/*.parquet"))
        except (FileNotFoundError, OSError):
            paths = []
        frames = []
        try:  # one GET a part on an object store
            blobs = dict(zip(paths, lake.read_many(paths), strict=True))
        except FileNotFoundError:  # another run's start merged some parts away meanwhile
            blobs = lake.fs.cat(paths, on_error="omit")
        for path in paths:
            blob = blobs.get(path)
            if blob is None:
                continue
            try:
                frames.append(pl.read_parquet(io.BytesIO(blob)).select(list(_SCHEMA)))
            except Exception:
                logger.warning("source index: skipped an unreadable part %s", path)
        known: dict[str, str] = {}
        if frames:
            merged = pl.concat(frames).unique(subset="source", keep="last")
            known = dict(
                zip(merged["source"].to_list(), merged["prepared_sha256"].to_list(), strict=True)
            )
        index = cls(lake, run_id, known)
        if len(paths) > MERGE_PARTS:
            index._merge(paths)
        return index

    def _merge(self, parts: list[str]) -> None:
        """Write everything known as one part, then drop the parts it replaces."""
        assert self.lake is not None
        self._write(dict(self._known), name=f"merged-{self.run_id}-{uuid.uuid4().hex[:8]}")
        for path in parts:
            # Another run's start may merge the same parts: either merged copy is whole.
            with contextlib.suppress(OSError):
                self.lake.remove_if_exists(path)

    def get(self, key: str) -> str | None:
        return self._known.get(key)

    def remember(self, key: str, sha256: str) -> None:
        with self._lock:
            if self._known.get(key) != sha256:
                self._known[key] = sha256
                self._new[key] = sha256

    def flush(self) -> str | None:
        """Write what this run learnt since the last flush as one part (blocking IO)."""
        with self._lock:
            new, self._new = self._new, {}
            # Unique across the processes of one run (Dask workers flush their own parts).
            name = f"{self.run_id}-{uuid.uuid4().hex[:16]}"
        if not new or self.lake is None:
            return None
        try:
            return self._write(new, name=name)
        except OSError:
            with self._lock:  # written with the next part
                self._new = {**new, **self._new}
            raise

    def _write(self, entries: dict[str, str], *, name: str) -> str:
        assert self.lake is not None
        frame = pl.DataFrame(
            {"source": list(entries), "prepared_sha256": list(entries.values())}, schema=_SCHEMA
        )
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        path = self.lake.path(SOURCES_DIR, posixpath.basename(f"{name}.parquet"))
        return self.lake.write_bytes(path, buffer.getvalue())
