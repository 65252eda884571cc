"""The credentials the emulator accepts: its own environment's, else documented defaults.

The variable names are the vendors' own (Tencent's are its SDK's), so a client configured for the
real provider talks to the emulator unchanged. The defaults exist for the emulator only:
production code never falls back to them (a missing key stays a missing key there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from emulator.plugins import discover

BUILT_IN_KEYS: dict[str, str] = {
    "CHANGECLOTHES_API_KEY": "emulator-changeclothes-key",
    "TENCENTCLOUD_SECRET_ID": "AKIDemulatorSecretId",
    "TENCENTCLOUD_SECRET_KEY": "emulator-tencent-secret-key",
    "HIDREAM_API_KEY": "emulator-hidream-key",
    "AILAB_API_KEY": "emulator-ailab-key",
}
DEFAULT_KEYS: dict[str, str] = dict(BUILT_IN_KEYS)


def accepted_key(env_name: str, environ: Mapping[str, str] = os.environ) -> str:
    """The value the emulator accepts for ``env_name``: the environment's, else the default."""
    return environ.get(env_name) or DEFAULT_KEYS[env_name]


def accepted_keys(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Every credential variable and the value the emulator accepts for it: what a client
    pointed at an emulator started from ``environ`` must send."""
    return {name: accepted_key(name, environ) for name in DEFAULT_KEYS}


# Emulated providers other distributions register, and the keys they accept by default. Last:
# a plugin's emulator module may import this one's functions while it loads.
PLUGINS = discover(reserved=frozenset({"changeclothes", "tencent", "hidream", "ailab"}))
for _plugin in PLUGINS.values():
    for _name, _value in _plugin.default_keys.items():
        DEFAULT_KEYS.setdefault(_name, _value)
