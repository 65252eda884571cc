"""Each distinct input prepared once per run, however many rows ask for it, and not at all when
an earlier run prepared it from the same source (``tasks.images.sources``). Prefect-free."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

import httpx

from providers.base import PreparedImage
from schemas.image_profile import ImageProfile
from tasks.images.fetch import DEFAULT_MAX_FETCH_BYTES, ImageInputError, fetch_bytes
from tasks.images.prepare import DEFAULT_MAX_PIXELS, prepare_image
from tasks.images.sources import SourceId, SourceIndex, identify_source, source_key

__all__ = ["PreparedImageCache"]

_Key = tuple[str, ImageProfile]
# Sources named per run (a few hundred bytes each): past this the names are taken again.
_MAX_IDENTITIES = 200_000


class PreparedImageCache:
    """Single-flight, byte-bounded LRU of prepared images keyed by (uri, profile).

    Concurrent requests for one key share a single fetch+prepare. Permanent ``ImageInputError``s
    are remembered (a broken image stays broken for the run); transient ones are not, so a retry
    fetches again. The whole profile is part of the key, so a per-run override of a profile
    that keeps its name never reuses images fitted to the old limits.

    ``sha256`` answers with the prepared image's hash alone: from ``sources`` when the source
    is one an earlier run prepared (nothing fetched or decoded), else by preparing it. Every
    image prepared is remembered in ``sources``.
    """

    def __init__(
        self,
        max_bytes: int = 512 * 1024 * 1024,
        *,
        max_failures: int = 10_000,
        fetch_max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sources: SourceIndex | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.sources = sources if sources is not None else SourceIndex(None, "")
        self.max_failures = max_failures
        self.fetch_max_bytes = fetch_max_bytes
        self.max_pixels = max_pixels
        self.hits = 0
        self.misses = 0
        self.prepared = 0  # images decoded and fitted (each a prepare_image call)
        self.recognised = 0  # sha256 answered from the source index: nothing fetched
        self._identities: dict[str, SourceId | None] = {}  # uri -> source, per run
        self._identifying: dict[str, asyncio.Task[SourceId | None]] = {}
        self._entries: OrderedDict[_Key, PreparedImage] = OrderedDict()
        self._failures: OrderedDict[_Key, ImageInputError] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[PreparedImage]] = {}
        self._size = 0
        # Bookkeeping only (never held across an await): guards callers on other threads.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Total encoded bytes currently held."""
        return self._size

    async def get(
        self,
        uri: str,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile,
        storage_options: dict[str, Any] | None = None,
        data: bytes | None = None,
    ) -> PreparedImage:
        """The prepared image for (uri, profile), fetching and preparing it at most once.
        ``data``: the source's bytes when the caller already holds them."""
        key: _Key = (uri, profile)
        loop = asyncio.get_running_loop()
        with self._lock:
            image = self._entries.get(key)
            if image is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return image
            failure = self._failures.get(key)
            if failure is not None:
                self.hits += 1
                raise ImageInputError(failure.code, failure.message, transient=False)
            task = self._inflight.get(key)
            if task is not None and task.get_loop() is loop:
                self.hits += 1
            else:
                # A task from another event loop cannot be awaited here: load independently.
                self.misses += 1
                task = loop.create_task(self._load(key, uri, http, profile, storage_options, data))
                task.add_done_callback(_consume_exception)
                self._inflight[key] = task
        # shield: one caller being cancelled must not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(
        self,
        key: _Key,
        uri: str,
        http: httpx.AsyncClient,
        profile: ImageProfile,
        storage_options: dict[str, Any] | None,
        data: bytes | None,
    ) -> PreparedImage:
        try:
            # Named before it is read: a source changed in between is named as it was, so
            # the next run finds it changed and prepares it again.
            source = await self.identify(uri, http=http, storage_options=storage_options)
            if data is None and source is not None:
                data = source.data  # read to name it (http, data:): not fetched twice
            if data is None:
                data = await fetch_bytes(
                    uri, http=http, max_bytes=self.fetch_max_bytes, storage_options=storage_options
                )
            with self._lock:
                self.prepared += 1
            image = await asyncio.to_thread(
                prepare_image, data, profile=profile, source_uri=uri, max_pixels=self.max_pixels
            )
            if source is not None:
                self.sources.remember(source_key(source.identity, profile), image.sha256)
        except ImageInputError as exc:
            with self._lock:
                self._drop_inflight(key)
                self._remember_failure(key, exc)
            raise
        except BaseException:
            with self._lock:
                self._drop_inflight(key)
            raise
        with self._lock:
            self._drop_inflight(key)
            self._store(key, image)
        return image

    def peek(self, uri: str, profile: ImageProfile) -> PreparedImage | None:
        """The prepared image for (uri, profile) if this cache holds it; never loads."""
        with self._lock:
            return self._entries.get((uri, profile))

    async def identify(
        self, uri: str, *, http: httpx.AsyncClient, storage_options: dict[str, Any] | None
    ) -> SourceId | None:
        """The source behind ``uri``, named once per run (single-flight: rows asking at once
        share one stat or one GET; the bytes are handed to those callers, not kept)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if uri in self._identities:
                return self._identities[uri]
            task = self._identifying.get(uri)
            if task is None or task.get_loop() is not loop:
                task = loop.create_task(
                    identify_source(
                        uri,
                        http=http,
                        storage_options=storage_options,
                        max_bytes=self.fetch_max_bytes,
                    )
                )
                task.add_done_callback(lambda done, uri=uri: self._identified(uri, done))
                self._identifying[uri] = task
        return await asyncio.shield(task)

    def _identified(self, uri: str, task: asyncio.Task[SourceId | None]) -> None:
        with self._lock:
            if self._identifying.get(uri) is task:
                del self._identifying[uri]
            if task.cancelled() or task.exception() is not None:
                return  # a failed read is the caller's failure (remembered if permanent)
            source = task.result()
            if len(self._identities) >= _MAX_IDENTITIES:
                self._identities.clear()
            self._identities[uri] = SourceId(source.identity) if source is not None else None

    async def sha256(
        self,
        uri: str,
        *,
        http: httpx.AsyncClient,
        profile: ImageProfile,
        storage_options: dict[str, Any] | None = None,
    ) -> str:
        """The sha256 of (uri, profile)'s prepared image: from the source index when an
        earlier run prepared this very source (nothing fetched nor decoded), else prepared
        now (and kept, like ``get``). Raises ``ImageInputError`` as ``get`` does."""
        key: _Key = (uri, profile)
        with self._lock:
            image = self._entries.get(key)
            failure = self._failures.get(key)
        if image is not None:
            return image.sha256
        if failure is not None:
            raise ImageInputError(failure.code, failure.message, transient=False)
        try:
            source = await self.identify(uri, http=http, storage_options=storage_options)
        except ImageInputError as exc:
            with self._lock:
                self._remember_failure(key, exc)
            raise
        if source is not None:
            known = self.sources.get(source_key(source.identity, profile))
            if known is not None:
                with self._lock:
                    self.recognised += 1
                return known
        data = source.data if source is not None else None
        image = await self.get(
            uri, http=http, profile=profile, storage_options=storage_options, data=data
        )
        return image.sha256

    def _remember_failure(self, key: _Key, exc: ImageInputError) -> None:
        """A broken input stays broken for the run; a transient failure is tried again."""
        if not exc.transient:
            self._failures[key] = exc
            while len(self._failures) > self.max_failures:
                self._failures.popitem(last=False)

    def _drop_inflight(self, key: _Key) -> None:
        task = self._inflight.get(key)
        if task is not None and task is asyncio.current_task():
            del self._inflight[key]

    def _store(self, key: _Key, image: PreparedImage) -> None:
        size = len(image.data)
        if size > self.max_bytes:  # larger than the whole cache: hand it out, keep nothing
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self._size -= len(previous.data)
        self._entries[key] = image
        self._size += size
        while self._size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._size -= len(evicted.data)

    def clear(self) -> None:
        """Forget every entry and remembered failure (in-flight loads still complete)."""
        with self._lock:
            self._entries.clear()
            self._failures.clear()
            self._size = 0


def _consume_exception(task: asyncio.Task[PreparedImage]) -> None:
    # If every waiter was cancelled nobody reads the error; avoid "never retrieved" noise.
    if not task.cancelled():
        task.exception()
