"""Provider credentials from Prefect Secret blocks, for variables the environment lacks.

Block names follow the variable: ``CHANGECLOTHES_API_KEY`` is read from the Secret block
``changeclothes-api-key`` (``prefect block create secret`` or ``Secret(value=...).save(name)``).
Values go to ``providers.settings`` in memory only: never to os.environ, logs or metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prefect.blocks.system import Secret
from pydantic import SecretStr

from providers.settings import secret_block_name, supply_credentials


async def load_secret_blocks(env_names: Iterable[str]) -> list[str]:
    """Load the blocks for variables not set in the environment; returns the names found."""
    found: dict[str, SecretStr] = {}
    for env_name in env_names:
        if os.environ.get(env_name):
            continue
        try:
            block = await Secret.aload(secret_block_name(env_name))
        except ValueError:  # no such block: the client will report the missing variable
            continue
        value = block.get()
        if isinstance(value, str) and value:
            found[env_name] = SecretStr(value)
    supply_credentials(found)
    return sorted(found)
