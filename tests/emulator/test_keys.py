"""The keys the emulator accepts, and that only an emulator run ever sends its defaults.

The emulator runs in-process (tests/contract.py).
"""

from __future__ import annotations

import pytest

from emulator import EmulatorConfig
from emulator.keys import DEFAULT_KEYS, PLUGINS, accepted_key, accepted_keys
from flows.cli import emulator_env
from providers import settings
from providers.changeclothes.client import GARMENT_PATH
from providers.registry import BUILT_IN
from tests.contract import Emulators


def test_the_defaults_cover_exactly_the_providers_credential_variables() -> None:
    names = {name for spec in BUILT_IN.values() for name in spec.credential_env}
    # And those of the installed plugins' emulators (this project's own fal among them).
    names |= {name for plugin in PLUGINS.values() for name in plugin.default_keys}
    assert set(DEFAULT_KEYS) == names


def test_the_environment_wins_over_a_default() -> None:
    environ = {"HIDREAM_API_KEY": "sk-set-here", "AILAB_API_KEY": ""}
    assert accepted_key("HIDREAM_API_KEY", environ) == "sk-set-here"
    assert accepted_key("AILAB_API_KEY", environ) == DEFAULT_KEYS["AILAB_API_KEY"]  # blank: unset
    assert accepted_keys({}) == DEFAULT_KEYS


def test_production_settings_never_fall_back_to_emulator_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in DEFAULT_KEYS:
        monkeypatch.delenv(name, raising=False)
        assert settings.credential(name) is None
    assert not any(value in vars(settings).values() for value in DEFAULT_KEYS.values())


def test_emulator_env_points_every_provider_at_it_with_the_keys_it_accepts() -> None:
    env = emulator_env("http://127.0.0.1:9", {"CHANGECLOTHES_API_KEY": "sk-mine"})
    for provider in BUILT_IN:
        assert env[settings.base_url_env(provider)] == "http://127.0.0.1:9"
    assert env["CHANGECLOTHES_API_KEY"] == "sk-mine"
    assert env["HIDREAM_API_KEY"] == DEFAULT_KEYS["HIDREAM_API_KEY"]


async def test_an_emulator_accepts_its_own_environment_s_key_only(
    monkeypatch: pytest.MonkeyPatch, emulators: Emulators
) -> None:
    monkeypatch.setenv("CHANGECLOTHES_API_KEY", "sk-configured")
    server = emulators.start(EmulatorConfig(fast_mode=True))
    for key, code in (("sk-configured", 10004), (DEFAULT_KEYS["CHANGECLOTHES_API_KEY"], 30001)):
        response = await emulators.http.post(
            server.base_url + GARMENT_PATH,
            headers={"Authorization": f"Bearer {key}"},
            files={"category": (None, "hats")},
        )
        assert response.json()["code"] == code, response.text
