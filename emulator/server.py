"""Serving the emulator: in a background thread (tests, ``--emulator`` runs) or blocking (CLI)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from emulator.app import build_app
from emulator.config import EmulatorConfig, FaultPlan
from emulator.control import EmulatorControl
from emulator.state import EmulatorState

__all__ = ["EmulatorConfig", "EmulatorServer", "FaultPlan", "serve"]


def _uvicorn_config(app: Starlette) -> uvicorn.Config:
    # Quiet (warnings only, no access log); lifespan off: the app needs no startup hooks.
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. The proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on
    accepted sockets only then, and without it Nagle + delayed ACK add ~40 ms to every call."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(server: uvicorn.Server, state: EmulatorState, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    finally:
        await state.aclose()


class EmulatorServer:
    """A running emulator on its own thread and event loop; use ``start`` or ``with``."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.app = build_app(self.config)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._control: EmulatorControl | None = None
        self.host = ""
        self.port = 0

    @property
    def state(self) -> EmulatorState:
        """The live state (read it from tests; change faults through ``control``)."""
        state: EmulatorState = self.app.state.emulator
        return state

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def control(self) -> EmulatorControl:
        """A blocking client of the control endpoints, closed with the server."""
        if self._control is None:
            self._control = EmulatorControl(self.base_url)
        return self._control

    @classmethod
    def start(
        cls,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout_s: float = 10.0,
    ) -> EmulatorServer:
        """Start serving; returns once the socket accepts connections. ``port=0``: any free."""
        handle = cls(config)
        handle._start(host, port, startup_timeout_s)
        return handle

    def _start(self, host: str, port: int, startup_timeout_s: float) -> None:
        # Binding here, not in uvicorn, gives us the real port before the thread starts.
        sock = _bind(host, port)
        self.host, self.port = sock.getsockname()[:2]
        server = uvicorn.Server(_uvicorn_config(self.app))
        self._server = server

        def run() -> None:
            try:
                asyncio.run(_serve(server, self.state, sock))
            except BaseException as exc:  # surfaced by start() / stop()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"emulator:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator did not start on {self.base_url}") from self._error
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the thread (open calls get a short grace period)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._control is not None:
            self._control.close()
            self._control = None

    def __enter__(self) -> EmulatorServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmulatorServer(base_url={self.base_url!r})"


def serve(config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve in the foreground until interrupted (``tryon emulator``)."""
    app = build_app(config or EmulatorConfig())
    server = uvicorn.Server(_uvicorn_config(app))
    sock = _bind(host, port)
    try:
        asyncio.run(_serve(server, app.state.emulator, sock))
    finally:
        sock.close()
