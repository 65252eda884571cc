from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.server import EmulatorConfig, EmulatorServer
from flows.cli import emulator_env

REPO = Path(__file__).resolve().parents[2]
SAMPLE_MANIFEST = REPO / "sample" / "manifest.csv"


@pytest.fixture(autouse=True)
def _on_the_session_prefect_server(prefect_server: None) -> None:
    """Every flow test runs against the session's one temporary Prefect server."""


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer.start(EmulatorConfig())
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_supplied_credentials() -> Iterator[None]:
    """Credentials loaded from Secret blocks live in-process: never let one leak across tests."""
    from providers.settings import clear_supplied_credentials

    clear_supplied_credentials()
    yield
    clear_supplied_credentials()


@pytest.fixture
def use_emulator(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    """Point every provider at the emulator (with the keys it accepts), with clean stats and
    no faults."""
    for name, value in emulator_env(emulator.base_url).items():
        monkeypatch.setenv(name, value)
    emulator.control.reset(faults=True)
    return emulator
