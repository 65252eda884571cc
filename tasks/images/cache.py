"""Each distinct input prepared once per run, however many rows ask for it. Prefect-free."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

import httpx

from providers.base import PreparedImage
from schemas.image_profile import ImageProfile
from tasks.images.fetch import DEFAULT_MAX_FETCH_BYTES, ImageInputError
from tasks.images.prepare import DEFAULT_MAX_PIXELS, fetch_and_prepare

__all__ = ["PreparedImageCache"]

_Key = tuple[str, ImageProfile]


class PreparedImageCache:
    """Single-flight, byte-bounded LRU of prepared images keyed by (uri, profile).

    Concurrent requests for one key share a single fetch+prepare. Permanent ``ImageInputError``s
    are remembered (a broken image stays broken for the run); transient ones are not, so a retry
    fetches again. The whole profile is part of the key, so a per-run override of a profile
    that keeps its name never reuses images fitted to the old limits.
    """

    def __init__(
        self,
        max_bytes: int = 512 * 1024 * 1024,
        *,
        max_failures: int = 10_000,
        fetch_max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_failures = max_failures
        self.fetch_max_bytes = fetch_max_bytes
        self.max_pixels = max_pixels
        self.hits = 0
        self.misses = 0
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
    ) -> PreparedImage:
        """The prepared image for (uri, profile), fetching and preparing it at most once."""
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
                task = loop.create_task(self._load(key, uri, http, profile, storage_options))
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
    ) -> PreparedImage:
        try:
            image = await fetch_and_prepare(
                uri,
                http=http,
                profile=profile,
                storage_options=storage_options,
                max_bytes=self.fetch_max_bytes,
                max_pixels=self.max_pixels,
            )
        except ImageInputError as exc:
            with self._lock:
                self._drop_inflight(key)
                if not exc.transient:
                    self._failures[key] = exc
                    while len(self._failures) > self.max_failures:
                        self._failures.popitem(last=False)
            raise
        except BaseException:
            with self._lock:
                self._drop_inflight(key)
            raise
        with self._lock:
            self._drop_inflight(key)
            self._store(key, image)
        return image

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
