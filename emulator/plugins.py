"""Emulated providers that other distributions register: their routes and their test keys.

A provider package living outside this repository can ship its emulator module too and name it
in the entry-point group ``tryon_flows.emulator``::

    [project.entry-points."tryon_flows.emulator"]
    acme = "acme_tryon.emulator:EMULATED"

Then ``tryon emulator`` and ``tryon run --emulator`` serve its routes beside the built-in ones,
with the same stats, fault plans and request ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from starlette.routing import Route

    from emulator.state import EmulatorState

ENTRY_POINT_GROUP: Final = "tryon_flows.emulator"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmulatedProvider:
    """One provider's emulation: its vendor routes, bound to the emulator's shared state, and
    the credential values the emulator accepts when its environment sets none."""

    name: str
    routes: Callable[[EmulatorState], list[Route]]
    default_keys: Mapping[str, str] = field(default_factory=dict)


def discover(reserved: frozenset[str] = frozenset()) -> dict[str, EmulatedProvider]:
    """The emulated providers registered under the entry-point group, except those whose name
    is in ``reserved`` (the built-ins) or that fail to load (each with a warning)."""
    found: dict[str, EmulatedProvider] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            emulated = entry.load()
        except Exception as exc:
            logger.warning("emulator plugin %r did not load: %s", entry.name, type(exc).__name__)
            continue
        if not isinstance(emulated, EmulatedProvider) or emulated.name != entry.name:
            logger.warning("emulator plugin %r is not an EmulatedProvider named so", entry.name)
        elif emulated.name in reserved or emulated.name in found:
            logger.warning("emulator plugin %r takes a name already registered", entry.name)
        else:
            found[emulated.name] = emulated
    return found
