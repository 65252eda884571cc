"""Provider names -> client classes and default limits. Adding a provider adds one entry here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import httpx

from providers.settings import call_timeout_s
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
        """A client configured from the environment (base URL, credentials, call timeout)."""
        timeout = call_timeout_s(self.name)
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        return self.client_class().from_env(http=http, profile=self.profile, **options)


def _spec(name: str, client_path: str, *, max_in_flight: int) -> ProviderSpec:
    """An entry whose profile is the one ``schemas.limits`` keeps under the same name."""
    return ProviderSpec(
        name=name, client_path=client_path, profile=PROFILES[name], max_in_flight=max_in_flight
    )


PROVIDERS: dict[str, ProviderSpec] = {
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
REFINER = _spec("ailab_refiner", "providers.ailab:AILabRefinerClient", max_in_flight=4)


def provider_spec(name: str) -> ProviderSpec:
    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"unknown provider {name!r} (expected one of: {known})") from None
