"""The local Prefect server of the `tryon` commands (flows/local_server.py): started by the
first command that needs one, reused by the next, kept after the command for the UI, managed by
`tryon server start|stop|status`; never started when the user set PREFECT_API_URL.

Every command runs as a user's shell runs it (no PREFECT_API_URL), with a Prefect home of the
test's own and its output on pipes, as CI reads it: a server holding those pipes would hang
the test. Every server is stopped when its test (or this module) ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import httpx
import psutil
import pytest

from flows.local_server import LOG_NAME, STATE_NAME, ServerState
from tests.flows.conftest import REPO, SAMPLE_MANIFEST
from tests.local_server import TRYON, LocalHome, is_gone, local_home

pytestmark = pytest.mark.e2e

DEMO = ("run", "sample/manifest.csv", "--emulator", "--lake", "lake")
STARTING = "Starting the local Prefect server"
LINK = re.compile(r"^Prefect UI: (\S+/runs/flow-run/([0-9a-f-]{36}))$", re.MULTILINE)
# Prefect's own hints and banners, which our commands keep out of their output.
NOT_OURS = re.compile(r"dedicated Prefect server|usage data|Starting temporary server")


def _sample(folder: Path) -> Path:
    if not (folder / "sample").exists():
        shutil.copytree(SAMPLE_MANIFEST.parent, folder / "sample")
    return folder


def _timed(
    local: LocalHome, *args: str, cwd: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = local.tryon(*args, cwd=cwd)
    return done, time.perf_counter() - started


def _link(done: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The run's UI link: the last line of stdout, and also printed as the run started."""
    last = done.stdout.strip().splitlines()[-1]
    found = LINK.match(last)
    assert found, done.stdout
    url, run_id = found.group(1), found.group(2)
    early = f"Prefect UI: {url}\n"
    assert early in done.stderr, done.stderr
    # ... as it started, not as it ended.
    assert done.stderr.index(early) < done.stderr.rindex("Finished in state"), done.stderr
    return url, run_id


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHome]:
    """One Prefect home for the tests that stop and start its server: its database is created
    and migrated once."""
    with local_home(tmp_path_factory.mktemp("shared") / "prefect-home") as local:
        yield local


@pytest.fixture
def stopped(shared: LocalHome) -> LocalHome:
    shared.stop()
    assert shared.state() is None and not shared.servers()
    return shared


def test_the_next_run_reuses_the_server_and_the_printed_link_opens_the_run(
    tmp_path: Path,
) -> None:
    _sample(tmp_path)
    with local_home(tmp_path / "prefect-home") as local:
        first, first_s = _timed(local, *DEMO, cwd=tmp_path)
        assert first.returncode == 1, first.stderr[-3000:]  # one sample row is invalid
        assert "8 succeeded / 0 failed / 1 invalid of 9 rows" in first.stdout
        assert STARTING in first.stderr
        server = local.state()
        assert server is not None
        assert server.port == int(local.env["PREFECT_SERVER_API_PORT"])  # the preferred port
        assert local.servers() == [server.pid]
        # Detached: it holds none of the command's pipes, and outlives the command.
        fds = {fd: os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in (0, 1, 2)}
        assert fds == {0: os.devnull, 1: server.log, 2: server.log}
        assert server.log == str(local.home / LOG_NAME)
        assert psutil.Process(server.pid).ppid() != os.getpid()

        second, second_s = _timed(local, *DEMO, cwd=tmp_path)
        assert second.returncode == 1, second.stderr[-3000:]
        assert STARTING not in second.stderr
        assert local.state() == server and local.servers() == [server.pid]
        # The first run paid for the server's start (a fresh database: migrations), the
        # second did not.
        assert second_s < first_s / 2, (first_s, second_s)

        for done in (first, second):
            output = done.stdout + done.stderr
            assert not NOT_OURS.search(output), output
            url, run_id = _link(done)
            assert url == f"{server.url}/runs/flow-run/{run_id}"
            assert (tmp_path / "lake" / "runs" / run_id / "summary.json").exists()
            page = httpx.get(url, headers={"Accept": "text/html"}, timeout=30)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            run = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=30)
            assert run.status_code == 200 and run.json()["state_type"] == "COMPLETED"


def test_server_start_status_stop(stopped: LocalHome, tmp_path: Path) -> None:
    local = stopped
    status = local.tryon("server", "status", cwd=tmp_path)
    assert status.returncode == 1 and status.stdout.startswith("not running"), status.stdout

    started = local.tryon("server", "start", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    state = local.state()
    assert state is not None and local.servers() == [state.pid]
    assert f"started: {state.url}  (pid {state.pid})" in started.stdout
    assert f"log:      {state.log}" in started.stdout

    again = local.tryon("server", "start", cwd=tmp_path)  # idempotent
    assert again.returncode == 0, again.stderr
    assert f"already running: {state.url}  (pid {state.pid})" in again.stdout
    assert local.state() == state and local.servers() == [state.pid]

    status = local.tryon("server", "status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"running:  {state.url}  (API {state.api_url})"
    assert lines[1].startswith(f"pid:      {state.pid}, up ")
    assert f"log:      {state.log}" in lines

    stop = local.tryon("server", "stop", cwd=tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == f"stopped: {state.url}  (pid {state.pid})"
    assert is_gone(state.pid, within_s=1)  # stop returns once it has exited
    assert local.state() is None and not local.servers()

    status = local.tryon("server", "status", cwd=tmp_path)
    assert status.returncode == 1 and status.stdout.startswith("not running")
    assert f"log:      {local.home / LOG_NAME}  (of the last server)" in status.stdout
    again = local.tryon("server", "stop", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == "not running"


def _write_state(home: Path, state: ServerState) -> None:
    (home / STATE_NAME).write_text(json.dumps(asdict(state)))


def test_a_stale_state_file_is_recovered(stopped: LocalHome, tmp_path: Path) -> None:
    local = stopped
    # What a server killed outright (or a reboot) leaves: its process is gone, and nothing
    # answers on its port.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    port = int(local.env["PREFECT_SERVER_API_PORT"])
    dead = ServerState(
        url=f"http://127.0.0.1:{port}",
        port=port,
        pid=gone.pid,
        pid_started=time.time() - 60,
        prefect_version="3.9.1",
        log=str(local.home / LOG_NAME),
    )
    _write_state(local.home, dead)
    status = local.tryon("server", "status", cwd=tmp_path)
    assert status.returncode == 1
    assert status.stdout.startswith(f"not running (its last pid, {gone.pid}, is gone"), (
        status.stdout
    )

    # A pid now used by another process (this one; its start time tells): stale too.
    me = psutil.Process(os.getpid())
    _write_state(local.home, replace(dead, pid=me.pid, pid_started=me.create_time() - 100))
    status = local.tryon("server", "status", cwd=tmp_path)
    assert status.returncode == 1 and status.stdout.startswith("not running (its last pid")

    started = local.tryon("server", "start", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    state = local.state()
    assert state is not None and state.pid not in (gone.pid, me.pid)
    assert local.servers() == [state.pid]
    assert f"started: {state.url}" in started.stdout
    local.stop()


def test_commands_launched_at_once_start_one_server(stopped: LocalHome, tmp_path: Path) -> None:
    local = stopped
    _sample(tmp_path)
    argvs = [
        [*TRYON, "run", "sample/manifest.csv", "--emulator", "--lake", "lake-a"],
        [*TRYON, "run", "sample/manifest.csv", "--emulator", "--lake", "lake-b"],
        [*TRYON, "server", "start"],
    ]
    launched = [
        subprocess.Popen(
            argv,
            env=local.env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    outputs = [proc.communicate(timeout=420) for proc in launched]
    codes = [proc.returncode for proc in launched]
    assert codes == [1, 1, 0], outputs
    state = local.state()
    assert state is not None and local.servers() == [state.pid]
    starts = sum(STARTING in err for _, err in outputs)
    assert starts == 1, outputs
    for out, _ in outputs[:2]:
        assert f"Prefect UI: {state.url}/runs/flow-run/" in out
    local.stop()


def test_a_taken_port_means_a_free_one(stopped: LocalHome, tmp_path: Path) -> None:
    local = stopped
    port = int(local.env["PREFECT_SERVER_API_PORT"])
    with socket.socket() as squatter:  # not a Prefect server
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        started = local.tryon("server", "start", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    state = local.state()
    assert state is not None and state.port != port
    assert f"Port {port} is taken by another program: the local server uses {state.port}" in (
        started.stderr
    )
    local.stop()


def test_a_server_that_cannot_start_stops_the_run_in_one_line(tmp_path: Path) -> None:
    _sample(tmp_path)
    unreachable = f"sqlite+aiosqlite:///{tmp_path}/no-such-folder/prefect.db"
    home = tmp_path / "prefect-home"
    with local_home(home, PREFECT_API_DATABASE_CONNECTION_URL=unreachable) as local:
        done = local.tryon(*DEMO, cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("cannot start:")]
        assert errors == [
            f"cannot start: the local Prefect server exited while starting (see {home / LOG_NAME})"
        ]
        assert "Traceback" not in done.stderr
        assert "unable to open database file" in (home / LOG_NAME).read_text()
        assert local.state() is None and not local.servers()
        assert not (tmp_path / "lake").exists()


def test_with_prefect_api_url_nothing_is_started(tmp_path: Path) -> None:
    """Whoever sets PREFECT_API_URL keeps full control; the link follows PREFECT_UI_URL."""
    from prefect.settings import PREFECT_API_URL

    _sample(tmp_path)
    api_url = str(PREFECT_API_URL.value())  # this session's server
    ui_url = "https://prefect.example.test/ui"
    home = tmp_path / "prefect-home"
    with local_home(home, PREFECT_API_URL=api_url, PREFECT_UI_URL=ui_url) as local:
        done = local.tryon(*DEMO, cwd=tmp_path)
        assert done.returncode == 1, done.stderr[-3000:]
        assert STARTING not in done.stderr
        assert not (home / STATE_NAME).exists() and not (home / LOG_NAME).exists()
        assert not local.servers()
        url, run_id = _link(done)
        assert url == f"{ui_url}/runs/flow-run/{run_id}"

        status = local.tryon("server", "status", cwd=tmp_path)
        assert status.returncode == 1
        assert f"note: PREFECT_API_URL is set ({api_url})" in status.stderr


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """Run ``argv`` with a pseudo-terminal for its output (Prefect's banner shows only there)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execvpe(argv[0], argv, env)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_no_usage_data_banner_on_a_terminal(tmp_path: Path) -> None:
    """Prefect prints its usage-data banner on a terminal at its first import in a new Prefect
    home; our commands keep it out (they default DO_NOT_TRACK=1)."""
    from prefect._internal.analytics.ci_detection import CI_ENV_VARS

    # As on a developer's machine: Prefect shows no banner under CI either.
    quiet = {"DO_NOT_TRACK", *CI_ENV_VARS}
    env = {k: v for k, v in os.environ.items() if k not in quiet and not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(REPO)
    prefect_alone = _on_a_terminal(
        [sys.executable, "-c", "import prefect"], {**env, "PREFECT_HOME": str(tmp_path / "a")}
    )
    assert "usage data" in prefect_alone  # what the check below would see
    ours = _on_a_terminal(
        [*TRYON, "server", "status"], {**env, "PREFECT_HOME": str(tmp_path / "b")}
    )
    assert "not running" in ours
    assert not NOT_OURS.search(ours), ours
