"""Provider settings from the environment: credentials as a shell or secret store holds them."""

from __future__ import annotations

import httpx
import pytest

from providers import settings


def test_a_key_ending_in_a_newline_is_used_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHANGECLOTHES_API_KEY", "  sk-from-a-file\n")
    key = settings.credential("CHANGECLOTHES_API_KEY")
    assert key is not None and key.get_secret_value() == "sk-from-a-file"


def test_a_blank_key_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHANGECLOTHES_API_KEY", " \n")
    assert settings.credential("CHANGECLOTHES_API_KEY") is None


def test_a_control_character_inside_a_key_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HIDREAM_API_KEY", "sk-top\nsecret")
    with pytest.raises(ValueError, match="HIDREAM_API_KEY contains a control character") as err:
        settings.credential("HIDREAM_API_KEY")
    assert "secret" not in str(err.value).replace("HIDREAM", "")


def test_call_timeouts_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from providers.registry import PROVIDERS, REFINER

    monkeypatch.setenv("TRYON_HIDREAM_TIMEOUT_S", "7.5")
    monkeypatch.setenv("TRYON_AILAB_REFINER_TIMEOUT_S", "12")
    assert settings.call_timeout_s("hidream") == 7.5
    assert settings.call_timeout_s("changeclothes") is None
    for name in ("HIDREAM_API_KEY", "AILAB_API_KEY"):
        monkeypatch.setenv(name, "sk-any")
    assert PROVIDERS["hidream"].make_client(http=httpx.AsyncClient()).timeout == 7.5
    assert REFINER.make_client(http=httpx.AsyncClient())._wire.timeout == 12.0
    monkeypatch.setenv("TRYON_HIDREAM_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="TRYON_HIDREAM_TIMEOUT_S='soon'"):
        PROVIDERS["hidream"].make_client(http=httpx.AsyncClient())
