"""The README's deployment guide, executed as written.

The guide's shell blocks are each tagged with a comment naming the terminal they run in
(``<!-- guide: cli -->``), and ``, keeps running`` for the ones that do not return (the server,
the emulator, the worker). This test runs exactly those blocks, in order, from a checkout
like a user's: each terminal is one shell whose exported variables carry over from one of its
blocks to the next; blocks that keep running are started in their own process group and
stopped at the end. Only the ports are changed (to free ones), and the environment is the
test's minus anything Prefect, tryon or a provider key would read, so the run succeeds with
what the guide sets and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import polars as pl
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse

from bench import procs
from emulator.keys import DEFAULT_KEYS
from emulator.stats import STATS_PATH
from providers.registry import PROVIDERS
from tests.flows.conftest import REPO

pytestmark = [pytest.mark.deployment, pytest.mark.e2e]

README = REPO / "README.md"
GUIDE_BLOCK = re.compile(
    r"<!-- guide: (?P<terminal>[\w-]+)(?P<keeps_running>, keeps running)? -->\n"
    r"```bash\n(?P<script>.*?)```",
    re.DOTALL,
)
# The ports the guide names, swapped for free ones.
SERVER_PORT, EMULATOR_PORT = "4200", "8765"
# What the caller's environment must not lend the guide's commands.
FOREIGN_ENV = ("PREFECT_", "TRYON_", "PWD", "OLDPWD", "VIRTUAL_ENV", *DEFAULT_KEYS)


@dataclass(frozen=True, slots=True)
class Block:
    terminal: str
    keeps_running: bool
    script: str


def guide_blocks(readme: str) -> list[Block]:
    return [
        Block(m["terminal"], bool(m["keeps_running"]), m["script"])
        for m in GUIDE_BLOCK.finditer(readme)
    ]


@pytest.fixture(autouse=True)
def _on_the_session_prefect_server() -> None:
    """Not the session's server: the guide starts its own."""


def test_the_guide_is_complete_and_uses_the_venv() -> None:
    blocks = guide_blocks(README.read_text())
    assert [(b.terminal, b.keeps_running) for b in blocks] == [
        ("server", True),
        ("emulator", True),
        ("cli", False),
        ("worker", True),
        ("cli", False),
    ]
    for block in blocks:
        for line in filter(None, block.script.splitlines()):
            assert line.startswith(("export ", ".venv/bin/")), line
    text = "".join(b.script for b in blocks)
    assert text.count(SERVER_PORT) == 3 and text.count(EMULATOR_PORT) == 2


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A user's clone, by links to this one, with its own ``lake`` and ``.venv`` the venv
    running the tests."""
    root = tmp_path / "checkout"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".venv", "lake", ".git"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


@dataclass
class Terminals:
    """One shell environment per terminal, the processes still running, their logs."""

    base: dict[str, str]
    cwd: Path
    logs: Path
    env: dict[str, dict[str, str]]
    running: list[subprocess.Popen[bytes]]
    pending: list[Callable[[], object]]

    def environment(self, terminal: str) -> dict[str, str]:
        return self.env.setdefault(terminal, dict(self.base))

    def start(self, terminal: str, script: str, ready: Callable[[], object] | None) -> None:
        log = self.logs / f"{terminal}.log"
        argv = ["bash", "-e", "-c", script]
        proc = procs.spawn(argv, env=self.environment(terminal), cwd=self.cwd, log=log)
        self.running.append(proc)
        if ready is not None:
            self.pending.append(ready)

    def run(self, terminal: str, script: str, timeout_s: float) -> str:
        """Run ``script`` in ``terminal``'s shell; what it exports stays for its next block."""
        for ready in self.pending:  # what earlier blocks started must be up first
            ready()
        self.pending.clear()
        saved = self.logs / f"{terminal}.env"
        done = subprocess.run(
            ["bash", "-e", "-c", f"{script}\nenv -0 > {saved}"],
            env=self.environment(terminal),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{script}\nexit {done.returncode}:\n{output}{self.tails()}"
        pairs = saved.read_text().split("\0")
        self.env[terminal] = dict(p.split("=", 1) for p in pairs if "=" in p)
        return output

    def tails(self) -> str:
        return "".join(
            f"\n--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def terminals(checkout: Path, tmp_path: Path) -> Iterator[Terminals]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    base.update(
        # Prefect's state (the server's database, profiles) in the test's folder, not ~/.prefect.
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The worker looks for scheduled runs every second rather than every ten.
        PREFECT_WORKER_QUERY_SECONDS="1",
        # This checkout's code, whichever checkout the venv was installed from.
        PYTHONPATH=str(REPO),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    shells = Terminals(base=base, cwd=checkout, logs=logs, env={}, running=[], pending=[])
    try:
        yield shells
    finally:
        for proc in reversed(shells.running):
            procs.stop(proc)


async def read_flow_run(api_url: str, flow_run_id: UUID) -> tuple[FlowRun, DeploymentResponse]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        flow_run = await client.read_flow_run(flow_run_id)
        deployment = await client.read_deployment_by_name("tryon-batch/adhoc")
    return flow_run, deployment


def test_the_deployment_guide_works_as_written(terminals: Terminals, checkout: Path) -> None:
    started = time.perf_counter()
    server_port, emulator_port = str(procs.free_port()), str(procs.free_port())
    api_url = f"http://127.0.0.1:{server_port}/api"
    ready = {
        "server": lambda: procs.wait_http_ok(f"{api_url}/health", timeout_s=240),
        "emulator": lambda: procs.wait_http_ok(
            f"http://127.0.0.1:{emulator_port}{STATS_PATH}", timeout_s=60
        ),
    }
    outputs = []
    for block in guide_blocks(README.read_text()):
        script = block.script.replace(SERVER_PORT, server_port)
        script = script.replace(EMULATOR_PORT, emulator_port)
        if block.keeps_running:
            terminals.start(block.terminal, script, ready.get(block.terminal))
        else:
            outputs.append(terminals.run(block.terminal, script, timeout_s=300))
        print(f"{block.terminal}: {time.perf_counter() - started:.1f} s")

    # The guide's run: finished, completed, named after what it ran, results in the lake.
    last = outputs[-1]
    assert "Flow run finished successfully in 'Completed'" in last, last + terminals.tails()
    match = re.search(r"UUID: ([0-9a-f-]{36})", last)
    assert match, last
    flow_run_id = UUID(match[1])
    flow_run, deployment = asyncio.run(read_flow_run(api_url, flow_run_id))
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    assert re.fullmatch(r"manifest-changeclothes-\d{8}T\d{6}Z", flow_run.name), flow_run.name
    lake = checkout / "lake"
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    assert meta["run_id"].unique().to_list() == [str(flow_run_id)]
    counts = dict(meta.group_by("status").len().iter_rows())
    assert counts == {"succeeded": 8, "invalid": 1}, counts
    assert (lake / "runs" / str(flow_run_id) / "_COMMITTED").is_file()
    # The form the guide's deployment shows: the registered providers to choose from.
    schema = deployment.parameter_openapi_schema or {}
    provider = schema["definitions"]["BatchParams"]["properties"]["provider"]
    assert provider["enum"] == sorted(PROVIDERS)
    print(f"deployment guide end to end: {time.perf_counter() - started:.1f} s")
