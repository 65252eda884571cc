"""Where each provider lives and which credential it uses: configuration, never code.

Base URLs come from ``TRYON_<PROVIDER>_BASE_URL`` (so the emulator, a proxy or a regional
endpoint is a configuration change); credentials from the vendor's own variable names. The
emulator accepts exactly the same variables, with documented defaults when they are unset.
"""

from __future__ import annotations

import os

from pydantic import SecretStr

DEFAULT_BASE_URLS: dict[str, str] = {
    "changeclothes": "https://changeclothesai.online",
    "tencent": "https://aiart.tencentcloudapi.com",
    "hidream": "https://hidreamai.com",
    "ailab": "https://www.ailabapi.com",
}

# The vendor's own variable names (Tencent's are the SDK's).
API_KEY_ENV: dict[str, tuple[str, ...]] = {
    "changeclothes": ("CHANGECLOTHES_API_KEY",),
    "tencent": ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"),
    "hidream": ("HIDREAM_API_KEY",),
    "ailab": ("AILAB_API_KEY",),
}

# What the emulator accepts when the variable is unset (and what `--emulator` runs send).
EMULATOR_DEFAULT_KEYS: dict[str, str] = {
    "CHANGECLOTHES_API_KEY": "emulator-changeclothes-key",
    "TENCENTCLOUD_SECRET_ID": "AKIDemulatorSecretId",
    "TENCENTCLOUD_SECRET_KEY": "emulator-tencent-secret-key",
    "HIDREAM_API_KEY": "emulator-hidream-key",
    "AILAB_API_KEY": "emulator-ailab-key",
}


def base_url_env(provider: str) -> str:
    return f"TRYON_{provider.upper()}_BASE_URL"


def base_url(provider: str) -> str:
    """The provider's base URL, from the environment or the vendor's public default."""
    url = os.environ.get(base_url_env(provider)) or DEFAULT_BASE_URLS[provider]
    return url.rstrip("/")


def credential(env_name: str) -> SecretStr | None:
    value = os.environ.get(env_name)
    return SecretStr(value) if value else None


def emulator_credential(env_name: str) -> str:
    """The value the emulator accepts for ``env_name``: the environment's, else the default."""
    return os.environ.get(env_name) or EMULATOR_DEFAULT_KEYS[env_name]
