"""The lake: result images, per-row metadata (Parquet) and run summaries, through fsspec.

Pure IO helpers, no Prefect. Paths are built only from validated ids and fixed names, and
every path is checked to stay under the lake root before anything is written.

Layout:
    outputs/<sha256>.<ext>                  result images and masks, content-addressed
    inputs/<sha256>.<ext>                   prepared inputs staged for URL-only providers
    metadata/run_id=<run_id>/<part>.parquet one record per row and stage, committed runs only
    runs/<run_id>/parts/<part>.parquet      a run's parts until it commits
    runs/<run_id>/{started,summary}.json    parameters, counts, timings, top error codes
    runs/<run_id>/_COMMITTED                the commit marker, written last
    runs/<run_id>/contact_sheet.{html,jpg}  every row's images and outcome (tasks/report)
    runs/<run_id>/report/<part>.parquet     records of rows earlier runs recorded, for the sheet
    work/, jobs/                            the work ledger (tasks/ledger.py)

Commit protocol (dlt's filesystem pattern): a run writes its metadata parts under its own
``runs/<run_id>/parts/``; at the end it copies them to ``metadata/run_id=<run_id>/`` (fixed
names: a retried run overwrites, never duplicates) and writes ``_COMMITTED`` last. So
``pl.scan_parquet("<lake>/metadata/**/*.parquet")`` sees only finished runs, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import io
import json
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import polars as pl
from fsspec.asyn import AsyncFileSystem
from fsspec.asyn import sync as fsspec_sync
from fsspec.implementations.local import LocalFileSystem

from schemas.manifest import is_safe_id
from schemas.results import RowRecord, records_to_frame

# A local lake writes each file here first and renames it into place (``Lake.write_bytes``).
_PARTIAL = "_partial"
# Objects read at once by ``Lake.read_many`` (each a GET on an object store).
_READ_BATCH = 64

T = TypeVar("T")


class LakePathError(ValueError):
    """A path would leave the lake root."""


class LakeNotUsable(OSError):
    """The lake cannot take this run's files (``Lake.probe_writable``). ``is_file``: its path,
    or a folder on it, is a file."""

    def __init__(self, message: str, *, is_file: bool = False) -> None:
        super().__init__(message)
        self.is_file = is_file


def _reason(exc: BaseException) -> str:
    """An OS or storage error in a few words, on one line: "permission denied", "no such
    file or folder", else its type and first line."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "not found (no such folder or bucket)"
    if isinstance(exc, NotADirectoryError):
        return "a part of its path is a file"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return "read-only file system"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# Control characters (NUL above all: C APIs stop there, so "a\x00/../../x" may name another
# file than the one checked) never belong in a lake path.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _is_safe_component(part: str) -> bool:
    if not part or part.startswith("/") or "\\" in part or _CONTROL.search(part):
        return False
    return all(segment not in ("", ".", "..") for segment in part.split("/"))


def _normalise_root(root: str) -> str:
    """The root without "." or ".." segments, repeated or trailing "/" ("/" stays "/")."""
    if not root:
        return root
    normal = posixpath.normpath(root)
    return "/" if normal.startswith("/") and not normal.strip("/") else normal.rstrip("/")


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
            # Normalised ("../lake" comes back as "/cwd/../lake"), as every joined path is.
            root = _normalise_root(fs._strip_protocol(root))
            display = root
        else:
            root = _normalise_root(root)
            display = fs.unstrip_protocol(root)
        return cls(fs=fs, root=root, uri=display)

    # -- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Join ``parts`` under the root; refuse anything that would resolve outside it.

        A component may hold "/" (nested folders) but no "..", ".", empty segment, leading
        "/", backslash (a separator on Windows and to some object-store tools) or control
        character such as NUL; the joined, normalised path must be under the root.
        """
        for part in parts:
            if not isinstance(part, str) or not _is_safe_component(part):
                raise LakePathError(f"unsafe lake path component {part!r}")
        return self.check_inside(posixpath.join(self.root, *parts))

    def check_inside(self, path: str) -> str:
        """``path`` normalised, if it is strictly under the root; else ``LakePathError``.

        Every write goes through this: nothing is written outside the lake root, whatever a
        row id, run id or provider says."""
        if not isinstance(path, str) or _CONTROL.search(path) or "\\" in path:
            raise LakePathError(f"unsafe lake path {path!r}")
        normal = posixpath.normpath(path)
        inside = self.root.rstrip("/") + "/"
        if normal != path.rstrip("/") or not normal.startswith(inside):
            raise LakePathError(f"path {path!r} is not under the lake root {self.root!r}")
        return normal

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
        """Write ``data`` whole or not at all: a reader (a rerun after kill -9) never finds a
        file cut short. An object store's PUT is atomic; on a local disk the bytes go to a
        temporary file first, renamed into place."""
        # No makedirs on object stores: s3fs's would create a mistyped bucket; the local
        # filesystem makes parents itself (auto_mkdir).
        path = self.check_inside(path)
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.pipe_file(path, data)
            return self.full_uri(path)
        staging = self.check_inside(self.path(_PARTIAL, uuid.uuid4().hex))
        self.fs.pipe_file(staging, data)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        os.replace(staging, path)  # atomic on one filesystem: the lake's folder
        return self.full_uri(path)

    def write_metadata(self, run_id: str, part: str, records: list[RowRecord]) -> str:
        """Write one Parquet part, with the fixed metadata schema, to the run's staging folder
        (published by ``commit_run``); returns its URI."""
        path = self.check_inside(self.run_path(run_id, "parts", f"{part}.parquet"))
        return self.write_bytes(path, _parquet_bytes(records))

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
            target = self.check_inside(posixpath.join(published, posixpath.basename(part)))
            self.fs.copy(part, target)
        if self.fs.exists(published):
            for old in self.fs.glob(published + "/*.parquet"):
                if posixpath.basename(old) not in names:
                    self.fs.rm_file(self.check_inside(old))
        marker = self.check_inside(self.commit_marker(run_id))
        data = json.dumps({**payload, "parts": sorted(names)}, sort_keys=True, default=str)
        try:
            with self.fs.open(marker, "xb") as handle:  # exclusive: one commit per run...
                handle.write(data.encode())
        except FileExistsError:  # ...unless the same run is retried: then it recommits
            self.fs.pipe_file(marker, data.encode())
        return self.full_uri(marker)

    # -- checks ---------------------------------------------------------------------------------
    def probe_writable(self) -> None:
        """Write an empty probe object under the root and delete it again (blocking).

        Raises ``LakeNotUsable`` saying what is wrong (the root is a file, permission denied,
        no such bucket...). Leaves nothing behind either way: on a local lake, the folders the
        probe had to create (the root and missing parents) are removed with it, so a run
        refused later for another reason has not created its lake.
        """
        if isinstance(self.fs, LocalFileSystem):
            self._probe_local()
            return
        probe = self.path(f".tryon-write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"")
        except Exception as exc:  # every backend raises its own types
            raise LakeNotUsable(f"the lake {self.uri} is not writable: {_reason(exc)}") from None
        try:
            self.fs.rm_file(probe)
        except Exception as exc:
            raise LakeNotUsable(
                f"the lake {self.uri} is writable but its probe {probe} could not be deleted: "
                f"{_reason(exc)}"
            ) from None

    def _probe_local(self) -> None:
        root, created = self.root, []
        existing = root
        while not os.path.lexists(existing):
            created.append(existing)
            parent = os.path.dirname(existing)
            if parent == existing:
                break
            existing = parent
        if not os.path.isdir(existing):
            if existing == root:
                raise LakeNotUsable(f"the lake {root} is a file, not a folder", is_file=True)
            raise LakeNotUsable(
                f"the lake {root} cannot be created: {existing} is a file", is_file=True
            )
        try:
            for folder in reversed(created):
                os.mkdir(folder)
            with tempfile.TemporaryFile(dir=root):
                pass  # created and removed: the folder takes new files
        except OSError as exc:
            raise LakeNotUsable(f"the lake {root} is not writable: {_reason(exc)}") from None
        finally:
            for folder in created:  # deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(folder)

    def read_uri(self, uri: str) -> bytes:
        """Bytes of an object this lake wrote (``full_uri`` form), guarded to the root."""
        try:
            path = self.check_inside(self.fs._strip_protocol(uri))
        except LakePathError:
            raise LakePathError(f"{uri!r} is not in the lake") from None
        return bytes(self.fs.cat_file(path, **self._one_get()))

    def _one_get(self) -> dict[str, Any]:
        """``cat_file``'s options for a whole object in one GET (s3fs would ask its size first,
        a HEAD, to split large reads)."""
        cat = getattr(self.fs, "_cat_file", None)
        if cat is not None and "max_concurrency" in inspect.signature(cat).parameters:
            return {"max_concurrency": 1}
        return {}

    def remove_if_exists(self, path: str) -> None:
        path = self.check_inside(path)
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

    # -- many objects at once ----------------------------------------------------------------
    def list_files(self, folder: str) -> list[str]:
        """Every file under ``folder`` (recursively; none if it does not exist). On an object
        store: one paginated listing, about one request per 1,000 objects."""
        folder = self.check_inside(folder)
        try:
            found = self.fs.find(folder)
        except FileNotFoundError:
            return []
        return [path for path in found if not posixpath.basename(path).startswith(".")]

    def read_many(self, paths: Sequence[str]) -> list[bytes]:
        """The bytes of ``paths`` (this lake's files), in order; one GET each on an object
        store, a batch at a time concurrently (blocking)."""
        checked = [self.check_inside(path) for path in paths]
        if not self._async_remote:
            return [bytes(self.fs.cat_file(path, **self._one_get())) for path in checked]
        fs: AsyncFileSystem = self.fs  # type: ignore[assignment]

        async def read_all() -> list[bytes]:
            out: list[bytes] = []
            for i in range(0, len(checked), _READ_BATCH):
                batch = checked[i : i + _READ_BATCH]
                out += await asyncio.gather(*(self._cat(path) for path in batch))
            return out

        return fsspec_sync(fs.loop, read_all)

    # -- async IO: on an object store, requests run on fsspec's own event loop, no thread ----
    @property
    def _async_remote(self) -> bool:
        return isinstance(self.fs, AsyncFileSystem) and not isinstance(self.fs, LocalFileSystem)

    async def _on_fs_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` (an async filesystem's request) on the filesystem's loop: many
        requests in flight at once without a thread each."""
        fs: AsyncFileSystem = self.fs  # type: ignore[assignment]
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, fs.loop))

    async def _cat(self, path: str) -> bytes:
        return bytes(await self.fs._cat_file(path, **self._one_get()))

    async def awrite_bytes(self, path: str, data: bytes) -> str:
        if not self._async_remote:
            return await asyncio.to_thread(self.write_bytes, path, data)
        path = self.check_inside(path)
        await self._on_fs_loop(self.fs._pipe_file(path, data))
        return self.full_uri(path)

    async def aread_bytes(self, path: str) -> bytes:
        """A lake file's bytes (one GET on an object store); ``FileNotFoundError`` if none."""
        path = self.check_inside(path)
        if not self._async_remote:
            return await asyncio.to_thread(lambda: bytes(self.fs.cat_file(path)))
        return await self._on_fs_loop(self._cat(path))

    async def aremove_if_exists(self, path: str) -> None:
        if not self._async_remote:
            await asyncio.to_thread(self.remove_if_exists, path)
            return
        path = self.check_inside(path)
        with contextlib.suppress(FileNotFoundError):
            await self._on_fs_loop(self.fs._rm_file(path))

    async def awrite_metadata(self, run_id: str, part: str, records: list[RowRecord]) -> str:
        path = self.check_inside(self.run_path(run_id, "parts", f"{part}.parquet"))
        return await self.awrite_bytes(path, await asyncio.to_thread(_parquet_bytes, records))


def _parquet_bytes(records: list[RowRecord]) -> bytes:
    """Records as one Parquet file, with the fixed metadata schema."""
    buffer = io.BytesIO()
    records_to_frame(records).write_parquet(buffer)
    return buffer.getvalue()
