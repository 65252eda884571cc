"""The credentials the emulator accepts: its own environment's, else documented defaults.

The variable names are the vendors' own (Tencent's are its SDK's), so a client configured for the
real provider talks to the emulator unchanged. The defaults exist for the emulator only:
production code never falls back to them (a missing key stays a missing key there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEFAULT_KEYS: dict[str, str] = {
    "CHANGECLOTHES_API_KEY": "emulator-changeclothes-key",
    "TENCENTCLOUD_SECRET_ID": "AKIDemulatorSecretId",
    "TENCENTCLOUD_SECRET_KEY": "emulator-tencent-secret-key",
    "HIDREAM_API_KEY": "emulator-hidream-key",
    "AILAB_API_KEY": "emulator-ailab-key",
}


def accepted_key(env_name: str, environ: Mapping[str, str] = os.environ) -> str:
    """The value the emulator accepts for ``env_name``: the environment's, else the default."""
    return environ.get(env_name) or DEFAULT_KEYS[env_name]


def accepted_keys(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Every credential variable and the value the emulator accepts for it: what a client
    pointed at an emulator started from ``environ`` must send."""
    return {name: accepted_key(name, environ) for name in DEFAULT_KEYS}
