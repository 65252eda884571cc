"""`tryon run` on the local Prefect server, stopped the hard ways: Ctrl-C and kill -9.

Each test runs the CLI as a user does (no ``PREFECT_API_URL``, a Prefect home of its own),
against the emulator with slow calls, stops it mid-run, then runs the same command again: the
rerun must finish with no manual step and pay no finished row twice. The server the first run
started is not the command's: it goes on running, and the rerun uses it (with the stopped
run's lease still taken on it: the rerun hands those slots back as it starts). The test stops
the server at its end. Leases last 10 minutes here, so nothing below is rescued by expiry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.cli import emulator_env
from flows.local_server import ServerState, running_server
from tests.flows.test_batch import sample_rows, write_manifest
from tests.flows.test_rerun import assert_no_duplicate_pairs
from tests.local_server import LocalHome, local_home

pytestmark = pytest.mark.e2e

ROWS = 12
CALL_S = 1.5
RESUME_LINE = "run the same command again to resume"


@dataclass
class Cli:
    argv: list[str]
    local: LocalHome
    lake: Path
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return self.local.env

    def start(self, name: str) -> subprocess.Popen[str]:
        # A session of its own, as a terminal's foreground job: Ctrl-C goes to its group.
        return subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.root,
            stdout=open(self.root / f"{name}.out", "w"),
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text()

    def wait_for_finished_rows(self, proc: subprocess.Popen[str], count: int) -> None:
        deadline = time.monotonic() + 240
        while _finished_rows(self.lake) < count:
            assert proc.poll() is None, f"the run ended early:\n{self.output('first')[-3000:]}"
            assert time.monotonic() < deadline, "no rows finished"
            time.sleep(0.1)


def _finished_rows(lake: Path) -> int:
    work = lake / "work"
    return sum(1 for _ in work.rglob("*.json")) if work.exists() else 0


@pytest.fixture
def cli(use_emulator: EmulatorServer, tmp_path: Path) -> Iterator[Cli]:
    use_emulator.control.set_faults("changeclothes", latency_s=CALL_S)
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(ROWS))
    lake = tmp_path / "lake"
    argv = [sys.executable, "-m", "flows.cli", "run", str(manifest), "--lake", str(lake)]
    argv += ["--provider", "changeclothes", "--no-progress"]
    extra = {"TRYON_LEASE_DURATION_S": "600", **emulator_env(use_emulator.base_url)}
    with local_home(tmp_path / "prefect-home", **extra) as local:
        yield Cli(argv=argv, local=local, lake=lake, root=tmp_path)


def _server_started_by(cli: Cli) -> ServerState:
    """The local server, started by the first run (which is under way)."""
    server = running_server(cli.local.home)
    assert server is not None, cli.output("first")[-3000:]
    assert cli.local.servers() == [server.pid]
    assert "Starting the local Prefect server" in cli.output("first")
    return server


def _rerun_finishes_everything(cli: Cli, emulator: EmulatorServer, paid_before: int) -> str:
    done = subprocess.run(
        cli.argv, env=cli.env, cwd=cli.root, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "waiting for" not in output  # no slot was left taken by the stopped run
    frame = pl.scan_parquet(f"{cli.lake}/metadata/**/*.parquet").collect()
    assert frame["status"].to_list() == ["succeeded"] * ROWS
    assert_no_duplicate_pairs(frame)
    # Rows finished before the stop were adopted: only the rest was paid for again.
    adopted = frame["reused_from_run"].drop_nulls().len()
    assert adopted >= 2
    assert emulator.control.posts() - paid_before <= ROWS - adopted
    assert not list((cli.root / "prefect-home" / "tryon-leases").glob("*.json"))
    assert "Starting the local Prefect server" not in output
    return output


def test_ctrl_c_stops_in_seconds_says_how_to_resume_and_the_rerun_pays_nothing_twice(
    cli: Cli, use_emulator: EmulatorServer
) -> None:
    first = cli.start("first")
    cli.wait_for_finished_rows(first, 2)
    server = _server_started_by(cli)

    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    interrupted_at = time.monotonic()
    code = first.wait(timeout=60)
    exit_s = time.monotonic() - interrupted_at
    output = cli.output("first")

    assert code == 130, output[-3000:]
    assert exit_s < 10, f"Ctrl-C took {exit_s:.1f} s"
    assert [line for line in output.splitlines() if RESUME_LINE in line], output[-2000:]
    assert "Error logging to API" not in output and "Traceback" not in output
    assert not list((cli.lake / "runs").glob("*/_COMMITTED"))
    # Ctrl-C went to the command's process group only: the server is in a session of its own.
    assert running_server(cli.local.home) == server

    _rerun_finishes_everything(cli, use_emulator, use_emulator.control.posts())
    assert running_server(cli.local.home) == server  # the rerun used it: same pid, same URL


def test_kill_9_and_the_rerun_gets_the_slots_back_by_itself_on_the_same_server(
    cli: Cli, use_emulator: EmulatorServer
) -> None:
    first = cli.start("first")
    cli.wait_for_finished_rows(first, 2)
    server = _server_started_by(cli)

    os.kill(first.pid, signal.SIGKILL)  # the CLI only, not its group: nothing can clean up
    first.wait(timeout=30)
    assert running_server(cli.local.home) == server  # not the command's: it goes on
    notes = list((cli.root / "prefect-home" / "tryon-leases").glob("*.json"))
    assert len(notes) == 1  # the killed run's lease, still taken on the server

    output = _rerun_finishes_everything(cli, use_emulator, use_emulator.control.posts())
    assert "held by a run that no longer exists" in output
    assert running_server(cli.local.home) == server
