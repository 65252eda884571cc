"""``ProviderSpec``: what the pipeline knows of a provider without importing its client.

Each provider package (``providers/<name>/``, or one in another distribution) exports one;
``providers.registry`` collects them. Kept apart from the registry so a package can import it
while the registry imports the package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import httpx

from providers.base import Capabilities
from providers.settings import call_timeout_s
from schemas.image_profile import ImageProfile
from schemas.money import Price


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """Everything the pipeline needs to know of a provider, besides its client's code."""

    name: str
    client_path: str  # "module:Class", imported lazily so one provider's deps never block another
    profile: ImageProfile
    max_in_flight: int  # default concurrency (vendor docs where they say; conservative otherwise)
    # The request shapes it takes: the client class's own ``capabilities``, so a run is
    # planned without importing the client.
    capabilities: Capabilities
    requests_per_second: float | None = None
    default_base_url: str = ""  # the vendor's endpoint; TRYON_<NAME>_BASE_URL overrides it
    credential_env: tuple[str, ...] = ()  # the variables holding the account's credentials
    # The vendor's published price per charged call; None: not published (unknown, never 0).
    price: Price | None = None
    # Whether the vendor bills an async job it accepted that then fails (submit-then-poll only).
    bills_failed_jobs: bool = False
    # The vendor's credits one charged call takes, where it bills in credits and says how many
    # (what a balance in credits is compared with); None: not in credits, or not published.
    credits_per_call: int | None = None
    # Specs whose calls draw on one balance (one key: a provider and its refiner) share this
    # name; empty: the spec's own name (see ``account_name``).
    account: str = ""

    @property
    def account_name(self) -> str:
        """The balance this provider's calls draw on: ``account``, else its own name."""
        return self.account or self.name

    def client_class(self) -> type[Any]:
        module_name, _, class_name = self.client_path.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def make_client(self, *, http: httpx.AsyncClient) -> Any:
        """A client configured from the environment (base URL, credentials, call timeout)."""
        timeout = call_timeout_s(self.name)
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        return self.client_class().from_env(http=http, profile=self.profile, **options)
