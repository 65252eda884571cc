"""`tryon` commands with a Prefect home of a test's own, where they start the local Prefect
server (``flows.local_server``), and the guarantee that such a server dies with its test.

The server is started detached (it is no descendant of the command), so it is found by what
it is: a ``flows.local_server`` process whose ``PREFECT_HOME`` is the test's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from flows.local_server import ServerState, read_state, stop_server

REPO = Path(__file__).resolve().parents[1]
TRYON = [sys.executable, "-m", "flows.cli"]


def _process_home(pid: int) -> Path | None:
    """The PREFECT_HOME of a live local-server process (None for any other process)."""
    try:
        if b"flows.local_server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return None
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"PREFECT_HOME="):
            return Path(os.fsdecode(entry.removeprefix(b"PREFECT_HOME=")))
    return None


def local_servers(under: Path) -> list[int]:
    """Live local-server processes whose Prefect home is ``under`` or inside it."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            home = _process_home(int(entry))
            if home is not None and home.is_relative_to(under):
                found.append(int(entry))
    return found


def kill_local_servers(under: Path) -> list[int]:
    """SIGKILL every local server whose home is under ``under``; returns their pids."""
    pids = local_servers(under)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


def is_gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@dataclass
class LocalHome:
    """A Prefect home for ``tryon`` commands started as a user does (no PREFECT_API_URL)."""

    home: Path
    env: dict[str, str]

    def tryon(
        self, *args: str, cwd: Path, timeout: float = 420, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tryon ARGS`` with pipes for its output, as CI does: it must not hang on them."""
        return subprocess.run(
            [*TRYON, *args],
            cwd=cwd,
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def state(self) -> ServerState | None:
        return read_state(self.home)

    def servers(self) -> list[int]:
        return local_servers(self.home)

    def stop(self) -> None:
        """Stop this home's server the way ``tryon server stop`` does, then make sure."""
        stop_server(self.home)
        kill_local_servers(self.home)


def user_environment(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell with this Prefect home: no PREFECT_API_URL, no
    provider keys, and a free preferred port (never Prefect's 4200 on a shared machine)."""
    drop = ("PREFECT_", "TRYON_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.pop("CHANGECLOTHES_API_KEY", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_PORT=str(procs.free_port()),
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def local_home(home: Path, **extra: str) -> Iterator[LocalHome]:
    """A Prefect home whose local server, if a command starts one, is stopped at the end."""
    home.mkdir(parents=True, exist_ok=True)
    local = LocalHome(home=home, env=user_environment(home, **extra))
    try:
        yield local
    finally:
        local.stop()
