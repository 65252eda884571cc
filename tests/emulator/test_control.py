"""The typed control client, blocking over loopback and async in-process (ASGI transport)."""

from __future__ import annotations

import httpx
import pytest

from emulator import AsyncEmulatorControl, EmulatorConfig, EmulatorServer, FaultPlan, build_app
from emulator.app import BUILT_IN_ROUTES, PROVIDER_ROUTES
from emulator.keys import DEFAULT_KEYS
from providers.changeclothes.client import GARMENT_PATH


async def test_async_control_in_process_sets_reads_and_resets_faults() -> None:
    app = build_app(EmulatorConfig(faults={"ailab": FaultPlan(credits=5)}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as http:
        control = AsyncEmulatorControl("http://emulator/", http=http)
        plans = await control.set_faults("hidream", credits=2, forced_codes=[500])
        assert (plans["hidream"].credits, plans["hidream"].forced_codes) == (2, [500])
        plans = await control.set_faults({"ailab": {"latency_s": 0.5}, "tencent": {}})
        assert (plans["ailab"].latency_s, plans["ailab"].credits) == (0.5, 5)
        assert await control.faults() == plans
        with pytest.raises(TypeError, match="no field arguments"):
            await control.set_faults({"ailab": {}}, credits=1)  # type: ignore[call-overload]

        stats = await control.reset(faults=True)
        assert stats == app.state.emulator.snapshot()  # the server's own model, parsed back
        assert set(stats.by_provider) == set(PROVIDER_ROUTES)  # built-ins and plugins
        assert set(BUILT_IN_ROUTES) == {"changeclothes", "tencent", "hidream", "ailab"}
        restored = await control.faults()
        assert (restored["hidream"].credits, restored["ailab"].latency_s) == (None, 0.0)
        assert restored["ailab"].credits == 5  # the configured plan, not a blank one
        assert (await control.calls()).calls == []


def test_server_control_counts_posts_and_waits_until_idle() -> None:
    with EmulatorServer.start(EmulatorConfig(fast_mode=True)) as server:
        control = server.control
        assert control is server.control and repr(control).startswith("EmulatorControl(")
        headers = {"Authorization": f"Bearer {DEFAULT_KEYS['CHANGECLOTHES_API_KEY']}"}
        for _ in range(2):
            httpx.post(server.base_url + GARMENT_PATH, headers=headers, files={"x": (None, "y")})
        httpx.get(f"{server.base_url}/files/nope.webp")
        assert control.posts() == 2 and control.posts("GET ") == 1
        stats = control.wait_idle("changeclothes")
        assert stats.provider("changeclothes").errors == {"10004": 2}
        log = control.calls(since=0)
        assert [c.seq for c in log.calls] == [1, 2]
        assert control.clock_s() >= log.now_s
