"""flows.progress: a caller's sinks reach the runs it starts, and only those."""

from __future__ import annotations

import asyncio
from typing import Any

from flows.progress import watchers, watching


class Sink:
    def started(self, total: int) -> None: ...

    def row_done(self, record: Any) -> None: ...


def test_sinks_are_seen_inside_the_block_only_and_nest() -> None:
    outer, inner = Sink(), Sink()
    assert watchers() == ()
    with watching(outer):
        assert watchers() == (outer,)
        with watching(inner):
            assert watchers() == (outer, inner)
        assert watchers() == (outer,)
    assert watchers() == ()


def test_a_run_started_in_the_block_sees_the_sink_and_a_concurrent_one_does_not() -> None:
    mine = Sink()

    async def seen() -> tuple[Any, ...]:
        await asyncio.sleep(0)
        return watchers()

    async def both() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        other = asyncio.create_task(seen())  # started before the block: its own context
        with watching(mine):
            in_block = asyncio.create_task(seen())
        return await in_block, await other

    assert asyncio.run(both()) == ((mine,), ())
