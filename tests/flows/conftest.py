from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.emulator.server import EmulatorConfig, EmulatorServer
from providers.settings import DEFAULT_BASE_URLS, EMULATOR_DEFAULT_KEYS, base_url_env

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
    """Point every provider at the emulator (its default keys), with clean stats and no faults."""
    import httpx

    for provider in DEFAULT_BASE_URLS:
        monkeypatch.setenv(base_url_env(provider), emulator.base_url)
    for name, value in EMULATOR_DEFAULT_KEYS.items():
        monkeypatch.setenv(name, value)
    httpx.post(f"{emulator.base_url}/_emulator/reset", json={"faults": True}).raise_for_status()
    return emulator
