"""Provider names -> specs: the ones in this repository, and any a distribution registers.

A provider that lives in another distribution needs no edit here: it exports a
``ProviderSpec`` and names it in the entry-point group ``tryon_flows.providers``, e.g. in its
``pyproject.toml``::

    [project.entry-points."tryon_flows.providers"]
    acme = "acme_tryon:SPEC"

Then ``tryon run --provider acme`` (and a manifest's ``provider`` column) reach it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from typing import Any, Final

import httpx

from providers.settings import API_KEY_ENV, DEFAULT_BASE_URLS, call_timeout_s
from schemas.limits import PROFILES, ImageProfile

ENTRY_POINT_GROUP: Final = "tryon_flows.providers"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """Everything the pipeline needs to know of a provider, besides its client's code."""

    name: str
    client_path: str  # "module:Class", imported lazily so one provider's deps never block another
    profile: ImageProfile
    max_in_flight: int  # default concurrency (vendor docs where they say; conservative otherwise)
    requests_per_second: float | None = None
    default_base_url: str = ""  # the vendor's endpoint; TRYON_<NAME>_BASE_URL overrides it
    credential_env: tuple[str, ...] = ()  # the variables holding the account's credentials

    def client_class(self) -> type[Any]:
        module_name, _, class_name = self.client_path.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def make_client(self, *, http: httpx.AsyncClient) -> Any:
        """A client configured from the environment (base URL, credentials, call timeout)."""
        timeout = call_timeout_s(self.name)
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        return self.client_class().from_env(http=http, profile=self.profile, **options)


def _spec(name: str, client_path: str, *, max_in_flight: int) -> ProviderSpec:
    """A built-in entry: its profile, endpoint and credentials as ``schemas.limits`` and
    ``providers.settings`` keep them under the same name."""
    return ProviderSpec(
        name=name,
        client_path=client_path,
        profile=PROFILES[name],
        max_in_flight=max_in_flight,
        default_base_url=DEFAULT_BASE_URLS.get(name, ""),
        credential_env=API_KEY_ENV.get(name, ()),
    )


BUILT_IN: Final[dict[str, ProviderSpec]] = {
    spec.name: spec
    for spec in (
        _spec("changeclothes", "providers.changeclothes:ChangeClothesClient", max_in_flight=8),
        # Tencent documents 1 concurrent task per account by default (doc 002).
        _spec("tencent", "providers.tencent:TencentClient", max_in_flight=1),
        _spec("hidream", "providers.hidream:HiDreamClient", max_in_flight=4),
        _spec("ailab", "providers.ailab:AILabTryOnClient", max_in_flight=4),
    )
}

# The refiner chained onto any provider's coarse result (``--refine``).
# It is an AILabTools endpoint: that account's credentials and base URL.
REFINER = replace(
    _spec("ailab_refiner", "providers.ailab:AILabRefinerClient", max_in_flight=4),
    default_base_url=DEFAULT_BASE_URLS["ailab"],
    credential_env=API_KEY_ENV["ailab"],
)


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
        raise ValueError(f"unknown provider {name!r} (expected one of: {known})") from None


def all_specs() -> list[ProviderSpec]:
    """Every provider and the refiner: what a base URL or a credential can be set for."""
    return [*PROVIDERS.values(), REFINER]
