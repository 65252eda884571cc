"""Where a provider lives and which credential it uses: configuration, never code.

Base URLs come from ``TRYON_<PROVIDER>_BASE_URL`` (so the emulator, a proxy or a regional
endpoint is a configuration change), else the default the provider's package declares;
credentials from the vendor's own variable names (also declared there), with no default: a key
that is not configured is missing.
"""

from __future__ import annotations

import os

from pydantic import SecretStr


def base_url_env(provider: str) -> str:
    return f"TRYON_{provider.upper()}_BASE_URL"


def timeout_env(provider: str) -> str:
    return f"TRYON_{provider.upper()}_TIMEOUT_S"


def call_timeout_s(provider: str) -> float | None:
    """Seconds a call to ``provider`` may take (``TRYON_<PROVIDER>_TIMEOUT_S``), or None for the
    client's default. A hung call holds a provider slot until then."""
    name = timeout_env(provider)
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected seconds, e.g. 60") from None
    if not 0 < value <= 3600:
        raise ValueError(f"{name}={raw!r}: expected seconds between 0 and 3600")
    return value


def base_url(provider: str, default: str) -> str:
    """The provider's base URL: ``TRYON_<PROVIDER>_BASE_URL``, else ``default`` (the vendor's
    public endpoint, which the provider's package declares)."""
    url = os.environ.get(base_url_env(provider)) or default
    return url.rstrip("/")


# Credentials supplied by the orchestration layer (Prefect Secret blocks), for variables the
# environment does not set. Kept in this process only: never written to os.environ, so they
# do not leak into child processes.
_supplied: dict[str, SecretStr] = {}


def secret_block_name(env_name: str) -> str:
    """The Prefect Secret block that may hold ``env_name``: CHANGECLOTHES_API_KEY ->
    changeclothes-api-key."""
    return env_name.lower().replace("_", "-")


def supply_credentials(values: dict[str, SecretStr]) -> None:
    _supplied.update(values)


def clear_supplied_credentials() -> None:
    _supplied.clear()


def credential(env_name: str) -> SecretStr | None:
    """The environment's value first (it is the most local), else a supplied Secret block's.

    Surrounding whitespace is dropped: a key read from a file or pasted into a Secret block
    often ends in a newline, which no HTTP header may carry. A control character left inside
    raises ``ValueError`` naming the variable (never the value).
    """
    value = os.environ.get(env_name, "").strip()
    secret = SecretStr(value) if value else _supplied.get(env_name)
    if secret is None:
        return None
    text = secret.get_secret_value().strip()
    if not text:
        return None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ValueError(f"{env_name} contains a control character (newline, tab, NUL...)")
    return SecretStr(text)
