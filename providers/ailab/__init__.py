"""AILabTools: Try on Clothes (a provider) and its Refiner (chained onto any provider's coarse
result with ``--refine``). One account, one wire, one credit balance: two specs."""

from __future__ import annotations

from providers.ailab.settings import (
    ACCOUNT,
    API_KEY_ENV,
    BILLS_FAILED_JOBS,
    CAPABILITIES,
    DEFAULT_BASE_URL,
    MAX_IN_FLIGHT,
    NAME,
    PRICE,
    PROFILE,
    REFINER_CREDITS,
    REFINER_MAX_IN_FLIGHT,
    REFINER_NAME,
    REFINER_PRICE,
    REFINER_PROFILE,
    TRYON_CREDITS,
)
from providers.base import Capabilities
from providers.spec import ProviderSpec

SPEC = ProviderSpec(
    name=NAME,
    client_path="providers.ailab.client:AILabTryOnClient",
    profile=PROFILE,
    max_in_flight=MAX_IN_FLIGHT,
    capabilities=CAPABILITIES,
    default_base_url=DEFAULT_BASE_URL,
    credential_env=(API_KEY_ENV,),
    price=PRICE,
    bills_failed_jobs=BILLS_FAILED_JOBS,
    credits_per_call=TRYON_CREDITS,  # settings.py: the try-on page's Billing Instructions
    account=ACCOUNT,
)
# The try-on account's endpoint and key. No rows are planned against it: no request shapes.
REFINER_SPEC = ProviderSpec(
    name=REFINER_NAME,
    client_path="providers.ailab.client:AILabRefinerClient",
    profile=REFINER_PROFILE,
    max_in_flight=REFINER_MAX_IN_FLIGHT,
    capabilities=Capabilities(),
    default_base_url=DEFAULT_BASE_URL,
    credential_env=(API_KEY_ENV,),
    price=REFINER_PRICE,
    bills_failed_jobs=BILLS_FAILED_JOBS,
    credits_per_call=REFINER_CREDITS,  # settings.py: the refiner page's Billing Instructions
    account=ACCOUNT,  # the try-on's key, so the try-on's balance
)
