"""Provider names -> specs: the ones in this repository, and any a distribution registers.

A provider that lives in another distribution needs no edit here: it exports a
``ProviderSpec`` and names it in the entry-point group ``tryon_flows.providers``, e.g. in its
``pyproject.toml``::

    [project.entry-points."tryon_flows.providers"]
    acme = "acme_tryon:SPEC"

Then ``tryon run --provider acme`` (and a manifest's ``provider`` column) reach it.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Final

from providers import ailab, changeclothes, hidream, tencent
from providers.spec import ProviderSpec

__all__ = ["PROVIDERS", "REFINER", "ProviderSpec", "all_specs", "discover", "provider_spec"]

ENTRY_POINT_GROUP: Final = "tryon_flows.providers"

logger = logging.getLogger(__name__)

BUILT_IN: Final[dict[str, ProviderSpec]] = {
    spec.name: spec for spec in (changeclothes.SPEC, tencent.SPEC, hidream.SPEC, ailab.SPEC)
}

# The refiner chained onto any provider's coarse result (``--refine``).
REFINER: Final[ProviderSpec] = ailab.REFINER_SPEC


def discover(group: str = ENTRY_POINT_GROUP) -> dict[str, ProviderSpec]:
    """Specs other distributions register under ``group``. One that fails to load, is not a
    ``ProviderSpec``, is named differently from its entry point or takes a built-in's name is
    left out with a warning: a broken plugin must not take the others down."""
    found: dict[str, ProviderSpec] = {}
    for entry in entry_points(group=group):
        try:
            spec = entry.load()
        except Exception as exc:
            logger.warning("provider plugin %r did not load: %s", entry.name, type(exc).__name__)
            continue
        if not isinstance(spec, ProviderSpec) or spec.name != entry.name:
            logger.warning("provider plugin %r is not a ProviderSpec named so", entry.name)
        elif spec.name in BUILT_IN or spec.name == REFINER.name or spec.name in found:
            logger.warning("provider plugin %r takes a name already registered", entry.name)
        else:
            found[spec.name] = spec
    return found


PROVIDERS: Final[dict[str, ProviderSpec]] = {**BUILT_IN, **discover()}


def provider_spec(name: str) -> ProviderSpec:
    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"unknown provider {name!r} (known: {known})") from None


def all_specs() -> list[ProviderSpec]:
    """Every provider and the refiner: what a base URL or a credential can be set for."""
    return [*PROVIDERS.values(), REFINER]
