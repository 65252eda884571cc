"""A real ``prefect server start`` (SQLite) on loopback, as production runs one.

Prefect's test harness runs a temporary server in ephemeral mode, which leaves out the
server's background services; tests that need them (the repossessor that reclaims a killed
run's concurrency leases, workers, deployments) use this one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import procs


@dataclass(frozen=True, slots=True)
class PrefectServer:
    api_url: str
    home: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a child process that talks to this server."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        return {
            **base,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **extra,
        }


@contextmanager
def run_prefect_server(root: Path, *, repossessor_loop_s: float = 1.0) -> Iterator[PrefectServer]:
    port = procs.free_port()
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(
        api_url=f"http://127.0.0.1:{port}/api", home=home, log=root / "server.log"
    )
    env = server.env(PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS=str(repossessor_loop_s))
    argv = [str(Path(sys.executable).with_name("prefect")), "server", "start"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    proc = procs.spawn(argv, env=env, cwd=root, log=server.log)
    try:
        procs.wait_http_ok(f"{server.api_url}/health", timeout_s=240, proc=proc)
        yield server
    finally:
        procs.stop(proc)
