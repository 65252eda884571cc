"""Provider names -> client classes and default limits. Adding a provider adds one entry here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import httpx

from schemas.limits import PROFILES, ImageProfile


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    name: str
    client_path: str  # "module:Class", imported lazily so one provider's deps never block another
    profile: ImageProfile
    max_in_flight: int  # default concurrency (vendor docs where they say; conservative otherwise)
    requests_per_second: float | None = None

    def client_class(self) -> type[Any]:
        module_name, _, class_name = self.client_path.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def make_client(self, *, http: httpx.AsyncClient) -> Any:
        """A client configured from the environment (base URL and credentials)."""
        return self.client_class().from_env(http=http, profile=self.profile)


PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec
    for spec in (
        ProviderSpec(
            name="changeclothes",
            client_path="providers.changeclothes:ChangeClothesClient",
            profile=PROFILES["changeclothes"],
            max_in_flight=8,
        ),
        # Tencent documents 1 concurrent task per account by default (doc 002).
        ProviderSpec(
            name="tencent",
            client_path="providers.tencent:TencentClient",
            profile=PROFILES["tencent"],
            max_in_flight=1,
        ),
        ProviderSpec(
            name="hidream",
            client_path="providers.hidream:HiDreamClient",
            profile=PROFILES["hidream"],
            max_in_flight=4,
        ),
        ProviderSpec(
            name="ailab",
            client_path="providers.ailab:AILabTryOnClient",
            profile=PROFILES["ailab"],
            max_in_flight=4,
        ),
    )
}

# The refiner chained onto any provider's coarse result (``--refine``).
REFINER = ProviderSpec(
    name="ailab_refiner",
    client_path="providers.ailab:AILabRefinerClient",
    profile=PROFILES["ailab_refiner"],
    max_in_flight=4,
)


def provider_spec(name: str) -> ProviderSpec:
    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"unknown provider {name!r} (expected one of: {known})") from None
