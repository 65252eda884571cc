"""The temporary Prefect server of one `tryon` command: started for it, gone with it.

Without ``PREFECT_API_URL`` Prefect would start its own temporary server as a child process.
That child shares the terminal's process group, so Ctrl-C stops it at once while the run is
still reporting its end (which then retries log delivery to a dead server for minutes), and a
``kill -9`` of the command leaves it running. The server started here instead:

- runs in a session of its own (Ctrl-C at the terminal reaches only the command, which stops
  the server last, after Prefect's log and event workers have drained);
- dies with the command, whatever ends it: the child asks Linux for a signal when its parent
  dies (``PR_SET_PDEATHSIG``) and also polls its parent, for other systems;
- keeps concurrency leases in files under ``PREFECT_HOME`` (Prefect's filesystem lease
  storage), so a killed run's lease outlives the server it was taken on and the next run can
  hand its slots back (``tasks.concurrency``).

Whoever sets ``PREFECT_API_URL`` keeps full control: then nothing is started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

import httpx

__all__ = ["FILESYSTEM_LEASES", "TemporaryServerError", "prefect_api"]

FILESYSTEM_LEASES: Final = "prefect.server.concurrency.lease_storage.filesystem"
_PR_SET_PDEATHSIG: Final = 1
_PARENT_POLL_S: Final = 1.0
_STOP_GRACE_S: Final = 5.0


class TemporaryServerError(RuntimeError):
    """The temporary server did not come up."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _configured_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def _server_environment() -> dict[str, str]:
    from prefect.settings import get_current_settings

    return {
        **os.environ,
        # The profile's settings (home, database) as Prefect passes them to its own server.
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILESYSTEM_LEASES,
    }


def _start(port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "flows.local_server", str(os.getpid()), str(port)]
    return subprocess.Popen(argv, env=_server_environment(), start_new_session=True)


def _wait_healthy(proc: subprocess.Popen[bytes], api_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TemporaryServerError(
                    f"the temporary Prefect server exited with status {proc.returncode}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{api_url}/health").status_code == 200:
                    return
            time.sleep(0.1)
    raise TemporaryServerError(
        f"the temporary Prefect server did not answer within {timeout_s:.0f} s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _drain_prefect_workers(timeout_s: float) -> None:
    """Deliver the logs and events still queued while the server is up to take them."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def prefect_api(say: Callable[[str], None] = print) -> Iterator[str | None]:
    """Use ``PREFECT_API_URL`` if set (yields ``None``); else start a temporary server for
    the block, point Prefect at it, and yield its API URL."""
    if _configured_api_url():
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    timeout_s = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    proc = _start(port)
    try:
        say(f"Starting temporary server on http://127.0.0.1:{port}")
        _wait_healthy(proc, api_url, timeout_s)
        previous = os.environ.get("PREFECT_API_URL")
        # The environment too: processes this run starts (a local Dask cluster) use it.
        os.environ["PREFECT_API_URL"] = api_url
        try:
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                try:
                    yield api_url
                finally:
                    _drain_prefect_workers(timeout_s=5.0)
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        say(f"Stopping temporary server on http://127.0.0.1:{port}")
        _stop(proc)


# ----------------------------------------------------------------------------- the server side


def _die_with(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends (it may already have)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() != parent_pid:
        sys.exit(0)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(parent_pid: int, port: int) -> None:
    _die_with(parent_pid)
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
