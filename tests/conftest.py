"""Suite-wide set-up: Prefect runs against a throw-away local server; nothing leaves loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.input_server import InputServer
    from tests.prefect_server import PrefectServer
    from tests.s3server import S3Server

# Before Prefect is imported anywhere: telemetry races the first SQLite migrations.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def _no_local_server_outlives_the_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """A `tryon` command run by a test without PREFECT_API_URL starts the local Prefect server
    in the test's own Prefect home (tests/local_server.py), and that test stops it; none may
    be left running when the session ends (any found is killed, and reported)."""
    yield
    from tests.local_server import kill_local_servers

    left = kill_local_servers(tmp_path_factory.getbasetemp())
    assert not left, f"local Prefect servers outlived their tests (now killed): {left}"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test of the session that runs flows:
    its start-up (migrations) is paid once."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on 127.0.0.1 (moto, free port) with a bucket for the tests.

    For the whole session the AWS environment is scrubbed (no profile, config file, endpoint
    or instance-metadata look-up can send a client anywhere else) and loopback bypasses any
    proxy, so s3fs's presigned URLs can be fetched by plain httpx and by the emulator.
    """
    from tests.s3server import isolate_aws_environment, run_s3_server

    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_aws_environment(monkeypatch, tmp_path_factory.mktemp("aws-home"))
        with run_s3_server() as server:
            yield server


@pytest.fixture(scope="session")
def real_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` on loopback with its background services (see
    tests/prefect_server.py); the repossessor looks for expired leases every second."""
    from tests.prefect_server import run_prefect_server

    with run_prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


@pytest.fixture
def read_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty folder nobody can create anything in, root included: mode 0o555, and for a
    process that ignores modes (root) the immutable attribute too; skipped where neither
    works."""
    folder = tmp_path_factory.mktemp("read-only")
    folder.chmod(0o555)
    immutable = False
    if _can_create_in(folder) and shutil.which("chattr"):
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
        immutable = done.returncode == 0
    try:
        if _can_create_in(folder):
            pytest.skip("no way to make a folder read-only for this user here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
        folder.chmod(0o755)


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / "probe").mkdir()
    except OSError:
        return False
    (folder / "probe").rmdir()
    return True


@pytest.fixture
def input_server() -> Iterator[InputServer]:
    """Input images on 127.0.0.1 counting requests (tests/input_server.py)."""
    from tests.input_server import serving_inputs

    with serving_inputs() as server:
        yield server
