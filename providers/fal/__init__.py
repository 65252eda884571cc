"""The fal.ai queue: one account, one client, a spec per try-on model it resells. ``SPEC``
(provider ``fal``) is FASHN v1.6; ``KOLORS_SPEC`` (``fal_kolors``) Kling Kolors v1.5. Both are
registered by entry points (``tryon_flows.providers``), as a third party's would be."""

from __future__ import annotations

from providers.fal.settings import (
    ACCOUNT,
    API_KEY_ENV,
    BILLS_FAILED_JOBS,
    DEFAULT_BASE_URL,
    FASHN,
    KOLORS,
    MAX_IN_FLIGHT,
    REQUESTS_PER_SECOND,
    FalModel,
)
from providers.spec import ProviderSpec

__all__ = ["KOLORS_SPEC", "SPEC", "SPECS"]


def _spec(model: FalModel, client: str) -> ProviderSpec:
    return ProviderSpec(
        name=model.name,
        client_path=f"providers.fal.client:{client}",
        profile=model.profile,
        max_in_flight=MAX_IN_FLIGHT,
        capabilities=model.capabilities,
        requests_per_second=REQUESTS_PER_SECOND,
        default_base_url=DEFAULT_BASE_URL,
        credential_env=(API_KEY_ENV,),
        price=model.price,
        bills_failed_jobs=BILLS_FAILED_JOBS,
        account=ACCOUNT,  # one key, one balance for every model
    )


SPEC = _spec(FASHN, "FalClient")
KOLORS_SPEC = _spec(KOLORS, "FalKolorsClient")
SPECS = (SPEC, KOLORS_SPEC)
