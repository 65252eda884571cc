"""Leasing a provider's global slots (tasks/concurrency.py) against a loopback API."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prefect.client.orchestration import PrefectClient
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from tasks.concurrency import _acquire

LEASE = "/api/v2/concurrency_limits/increment-with-lease"


class LockedThenLeased:
    """Answers the lease request 503 ``locked`` times (a SQLite server losing a write race),
    then with a lease."""

    def __init__(self, locked: int) -> None:
        self.locked = locked
        self.asked = 0
        self.lease_id = uuid.uuid4()

    def answer(self) -> tuple[int, dict[str, Any]]:
        self.asked += 1
        if self.asked <= self.locked:
            return 503, {"exception_message": "Service Unavailable"}
        limit = {"id": str(uuid.uuid4()), "name": "tryon-x", "limit": 4}
        return 200, {"limits": [limit], "lease_id": str(self.lease_id)}


@pytest.fixture
def api() -> Iterator[tuple[str, LockedThenLeased]]:
    state = LockedThenLeased(locked=3)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, body = state.answer() if self.path == LEASE else (404, {})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # the CSRF token: an old server without CSRF support
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api", state
    server.shutdown()
    server.server_close()


async def test_a_locked_server_is_asked_again_at_once_not_after_prefects_back_off(
    api: tuple[str, LockedThenLeased],
) -> None:
    """Three 503s in a row, with Prefect's own client allowed one retry (its back-off: 2 s):
    the lease still comes, from our quick retries."""
    url, state = api
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 1}):
        async with PrefectClient(api=url) as client:
            lease = await _acquire(client, "tryon-x", 1, 4)
    assert lease == state.lease_id
    assert state.asked == 4
