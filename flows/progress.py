"""Who watches a run's rows finish, besides its Prefect progress artifact: a caller's sinks.

A flow's parameters are what Prefect stores and shows in its UI, so a live object such as the
CLI's progress bar cannot be one. The caller hands its sink to the runs it starts through the
context instead: ``with watching(bar): asyncio.run(tryon_batch(params))``. The binding lasts
for the block and is seen only by what runs inside it (concurrent runs elsewhere in the
process do not see each other's sinks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tasks.process import ProgressSink

_WATCHERS: ContextVar[tuple[ProgressSink, ...]] = ContextVar("tryon_progress", default=())


@contextmanager
def watching(sink: ProgressSink) -> Iterator[None]:
    """Show ``sink`` the rows of the runs started inside this block."""
    token = _WATCHERS.set((*_WATCHERS.get(), sink))
    try:
        yield
    finally:
        _WATCHERS.reset(token)


def watchers() -> tuple[ProgressSink, ...]:
    """The sinks the caller of the current run asked to be shown its rows."""
    return _WATCHERS.get()
