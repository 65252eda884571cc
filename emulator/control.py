"""A typed client for the emulator's control endpoints (``/_emulator/...``).

``EmulatorControl`` (blocking, for fixtures, flow tests and benchmarks) and
``AsyncEmulatorControl`` (for tests that drive async clients on their own loop) send the same
requests and parse the same answers (``emulator.stats``, the models the server builds its
answers from); only the I/O differs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Self, TypeVar, overload

import httpx
from pydantic import TypeAdapter

from emulator.config import FaultPlan
from emulator.stats import (
    CALLS_PATH,
    FAULTS_PATH,
    RESET_PATH,
    STATS_PATH,
    CallLog,
    EmulatorCall,
    EmulatorStats,
    JobContents,
    ProviderStats,
)

__all__ = [
    "AsyncEmulatorControl",
    "CallLog",
    "EmulatorCall",
    "EmulatorControl",
    "EmulatorStats",
    "JobContents",
    "ProviderStats",
]

T = TypeVar("T")

FaultFields = Mapping[str, object]


@dataclass(frozen=True, slots=True)
class _Request(Generic[T]):
    """One control call, independent of the I/O that sends it."""

    method: str
    path: str
    parse: Callable[[Any], T]
    body: object = None
    params: dict[str, str] = field(default_factory=dict)

    def arguments(self, base_url: str) -> dict[str, Any]:
        """For ``httpx.Client.request`` and ``httpx.AsyncClient.request`` alike."""
        return {
            "method": self.method,
            "url": base_url + self.path,
            "json": self.body,
            "params": self.params or None,
        }


_fault_plans: Callable[[Any], dict[str, FaultPlan]] = TypeAdapter(
    dict[str, FaultPlan]
).validate_python


def _stats_request() -> _Request[EmulatorStats]:
    return _Request("GET", STATS_PATH, EmulatorStats.model_validate)


def _reset_request(faults: bool) -> _Request[EmulatorStats]:
    return _Request("POST", RESET_PATH, EmulatorStats.model_validate, {"faults": faults})


def _faults_request(body: Mapping[str, FaultFields] | None) -> _Request[dict[str, FaultPlan]]:
    if body is None:
        return _Request("GET", FAULTS_PATH, _fault_plans)
    return _Request("POST", FAULTS_PATH, _fault_plans, {k: dict(v) for k, v in body.items()})


def _calls_request(since: int | None) -> _Request[CallLog]:
    params = {} if since is None else {"since": str(since)}
    return _Request("GET", CALLS_PATH, CallLog.model_validate, params=params)


def _fault_body(
    target: str | Mapping[str, FaultFields], fields: dict[str, object]
) -> Mapping[str, FaultFields]:
    if isinstance(target, str):
        return {target: fields}
    if fields:
        raise TypeError("set_faults(plans) takes no field arguments: put them in the plans")
    return target


def _idle(stats: EmulatorStats, provider: str | None) -> bool:
    return (stats.provider(provider) if provider else stats).in_flight == 0


# Past any sequence number: the log's clock without its calls.
_NO_CALLS = sys.maxsize
IDLE_POLL_S = 0.02


class EmulatorControl:
    """The control endpoints of the emulator at ``base_url``, blocking.

    Pass ``http`` to share a client (or an in-process transport); it is then not closed here.
    """

    def __init__(
        self, base_url: str, *, http: httpx.Client | None = None, timeout_s: float = 60.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._own = http is None
        self._http = http or httpx.Client(timeout=timeout_s)

    @property
    def stats_url(self) -> str:
        """Answers 200 once the emulator serves: what a launcher polls for readiness."""
        return self.base_url + STATS_PATH

    def _send(self, request: _Request[T]) -> T:
        response = self._http.request(**request.arguments(self.base_url))
        response.raise_for_status()
        return request.parse(response.json())

    def stats(self) -> EmulatorStats:
        return self._send(_stats_request())

    def posts(self, prefix: str = "POST") -> int:
        return self.stats().posts(prefix)

    def reset(self, *, faults: bool = False) -> EmulatorStats:
        """Zero the stats and the call log; ``faults=True`` also restores the configured fault
        plans with fresh credit and trial counters."""
        return self._send(_reset_request(faults))

    def faults(self) -> dict[str, FaultPlan]:
        """The plans in force, with their counters as they stand (credits left, codes queued)."""
        return self._send(_faults_request(None))

    @overload
    def set_faults(self, target: str, /, **fields: object) -> dict[str, FaultPlan]: ...
    @overload
    def set_faults(self, target: Mapping[str, FaultFields], /) -> dict[str, FaultPlan]: ...
    def set_faults(
        self, target: str | Mapping[str, FaultFields], /, **fields: object
    ) -> dict[str, FaultPlan]:
        """Change the fields given, for one provider (``set_faults("hidream", credits=2)``) or
        several (``set_faults({"hidream": {...}, "ailab": {...}})``); returns every plan."""
        return self._send(_faults_request(_fault_body(target, fields)))

    def calls(self, since: int | None = None) -> CallLog:
        """The call log; ``since``: only the calls after that sequence number."""
        return self._send(_calls_request(since))

    def clock_s(self) -> float:
        """The call log's clock now (to place an outside event among the calls)."""
        return self.calls(since=_NO_CALLS).now_s

    def wait_idle(self, provider: str | None = None, timeout_s: float = 5.0) -> EmulatorStats:
        """Until no vendor call (of ``provider``) is in flight: a call whose client gave up
        ends only when the server notices the disconnect."""
        deadline = time.monotonic() + timeout_s
        while not _idle(stats := self.stats(), provider):
            if time.monotonic() > deadline:
                raise TimeoutError(f"emulator calls still in flight after {timeout_s} s")
            time.sleep(IDLE_POLL_S)
        return stats

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"


class AsyncEmulatorControl:
    """``EmulatorControl`` for async code: the same calls, awaited on the caller's loop."""

    def __init__(
        self, base_url: str, *, http: httpx.AsyncClient | None = None, timeout_s: float = 60.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._own = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout_s)

    async def _send(self, request: _Request[T]) -> T:
        response = await self._http.request(**request.arguments(self.base_url))
        response.raise_for_status()
        return request.parse(response.json())

    async def stats(self) -> EmulatorStats:
        return await self._send(_stats_request())

    async def posts(self, prefix: str = "POST") -> int:
        return (await self.stats()).posts(prefix)

    async def reset(self, *, faults: bool = False) -> EmulatorStats:
        return await self._send(_reset_request(faults))

    async def faults(self) -> dict[str, FaultPlan]:
        return await self._send(_faults_request(None))

    @overload
    async def set_faults(self, target: str, /, **fields: object) -> dict[str, FaultPlan]: ...
    @overload
    async def set_faults(self, target: Mapping[str, FaultFields], /) -> dict[str, FaultPlan]: ...
    async def set_faults(
        self, target: str | Mapping[str, FaultFields], /, **fields: object
    ) -> dict[str, FaultPlan]:
        return await self._send(_faults_request(_fault_body(target, fields)))

    async def calls(self, since: int | None = None) -> CallLog:
        return await self._send(_calls_request(since))

    async def clock_s(self) -> float:
        return (await self.calls(since=_NO_CALLS)).now_s

    async def wait_idle(self, provider: str | None = None, timeout_s: float = 5.0) -> EmulatorStats:
        deadline = time.monotonic() + timeout_s
        while not _idle(stats := await self.stats(), provider):
            if time.monotonic() > deadline:
                raise TimeoutError(f"emulator calls still in flight after {timeout_s} s")
            await asyncio.sleep(IDLE_POLL_S)
        return stats

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"
