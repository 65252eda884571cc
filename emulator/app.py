"""The emulator's ASGI app: every provider's routes, result files, and the control endpoints.

Adding a provider = one route module exposing ``routes(state) -> list[Route]`` plus one line in
``BUILT_IN_ROUTES``, or, outside this repository, an entry point (``emulator.plugins``). Vendor
routes are wrapped here so stats and in-flight counts are uniform. Control endpoints live under
``/_emulator/`` (no vendor uses that prefix) and are not counted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emulator import ailab as ailab_routes
from emulator import changeclothes
from emulator import hidream as hidream_routes
from emulator import tencent as tencent_routes
from emulator.config import EmulatorConfig, FaultPlan
from emulator.jobs import Clock, Sleep
from emulator.keys import PLUGINS
from emulator.state import EmulatorState
from emulator.stats import CALLS_PATH, FAULTS_PATH, RESET_PATH, STATS_PATH

BUILT_IN_ROUTES: dict[str, Callable[[EmulatorState], list[Route]]] = {
    changeclothes.PROVIDER: changeclothes.routes,
    ailab_routes.PROVIDER: ailab_routes.routes,
    hidream_routes.PROVIDER: hidream_routes.routes,
    tencent_routes.PROVIDER: tencent_routes.routes,
}
# And those other distributions register (emulator/plugins.py).
PROVIDER_ROUTES: dict[str, Callable[[EmulatorState], list[Route]]] = {
    **BUILT_IN_ROUTES,
    **{name: p.routes for name, p in PLUGINS.items()},
}
FILES_PATH = "/files/{token}.webp"
# A token holding "/" once decoded (``EmulatorConfig.result_name_prefix``) is served here.
NESTED_FILES_PATH = "/files/{token:path}.webp"
REQUEST_ID_HEADER = b"x-request-id"


class RequestIdMiddleware:
    """Stamp ``x-request-id`` on every response, as the vendors' gateways do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _tracked(route: Route, state: EmulatorState, provider: str | None) -> Route:
    """The same route, counted in the stats (and in flight, for a provider's API calls)."""
    endpoint = route.endpoint
    path = route.path

    async def tracked(request: Request) -> Response:
        route_key = f"{request.method} {path}"
        arrived, status = state.clock(), 500
        try:
            with state.track(route_key, provider):
                response: Response = await endpoint(request)
                status = response.status_code
                return response
        finally:
            fault = getattr(request.state, "emulator_fault", None)
            state.log_call(route_key, provider, arrived=arrived, status=status, fault=fault)

    return Route(path, tracked, methods=list(route.methods or ()), name=route.name)


def build_app(
    config: EmulatorConfig | None = None,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> Starlette:
    """A fresh emulator app with its own state (reachable as ``app.state.emulator``).

    ``clock``/``sleep``: the time its jobs, result lifetimes and call log run on (real time by
    default; tests pass a fake one to run job lifecycles without waiting)."""
    config = config or EmulatorConfig()
    unknown = sorted(set(config.faults) - set(PROVIDER_ROUTES))
    if unknown:
        raise ValueError(f"fault plans for unknown providers: {unknown}")
    state = EmulatorState(config, list(PROVIDER_ROUTES), clock=clock, sleep=sleep)

    async def result_file(request: Request) -> Response:
        # Expired and unknown tokens look alike: 404, as for an object deleted from a bucket.
        found = state.results.get(request.path_params["token"])
        if found is None:
            return JSONResponse({"error": "not found or expired"}, status_code=404)
        data, media_type = found
        headers = {"Cache-Control": "no-store"}
        if state.config.result_name_prefix:  # the hostile name, where a client may read it
            name = request.path_params["token"] + ".webp"
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(data, media_type=media_type, headers=headers)

    async def stats(request: Request) -> Response:
        return JSONResponse(state.snapshot().model_dump())

    async def calls(request: Request) -> Response:
        """The call log, oldest first; ``?since=SEQ`` for the calls after that one. ``now_s``:
        the log's clock now (to place an outside event, e.g. a client killed, among calls)."""
        try:
            since = int(request.query_params.get("since", "-1"))
        except ValueError:
            return JSONResponse({"error": "since must be an integer"}, status_code=422)
        calls = [c for c in state.calls if c["seq"] > since]
        now_s = state.clock_s()
        # The log's zero as Unix time: places calls against another process's wall clock.
        clock0_unix = round(time.time() - now_s, 6)
        return JSONResponse({"calls": calls, "now_s": now_s, "clock0_unix": clock0_unix})

    async def reset(request: Request) -> Response:
        """Zero the stats; with ``{"faults": true}`` also restore the configured fault plans."""
        body = await _json_body(request)
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=422)
        state.reset_stats()
        if body.get("faults"):
            state.reset_faults()
        return JSONResponse(state.snapshot().model_dump())

    async def faults(request: Request) -> Response:
        """GET: the plans in force. POST ``{provider: {field: value}}``: change those fields."""
        if request.method == "POST":
            body = await _json_body(request)
            if not isinstance(body, dict):
                return JSONResponse({"error": "expected a JSON object"}, status_code=422)
            unknown = sorted(set(body) - set(state.providers))
            if unknown:
                return JSONResponse({"error": f"unknown providers: {unknown}"}, status_code=422)
            try:
                patches = {name: FaultPlan.model_validate(patch) for name, patch in body.items()}
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_context=False)
                return JSONResponse({"error": errors}, status_code=422)
            for name, patch in patches.items():
                state.provider(name).apply(patch)
        return JSONResponse(
            {name: ps.current_plan().model_dump() for name, ps in state.providers.items()}
        )

    routes: list[Route] = []
    for provider, make_routes in PROVIDER_ROUTES.items():
        routes.extend(_tracked(route, state, provider) for route in make_routes(state))
    routes.append(_tracked(Route(FILES_PATH, result_file, methods=["GET"]), state, None))
    routes.append(_tracked(Route(NESTED_FILES_PATH, result_file, methods=["GET"]), state, None))
    routes += [
        Route(STATS_PATH, stats, methods=["GET"]),
        Route(CALLS_PATH, calls, methods=["GET"]),
        Route(RESET_PATH, reset, methods=["POST"]),
        Route(FAULTS_PATH, faults, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(RequestIdMiddleware)])
    app.state.emulator = state
    return app


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return await request.json()
    except ValueError:
        return None
