"""ChangeClothesAI: two synchronous multipart endpoints (garment image, or text prompt)."""

from __future__ import annotations

from providers.changeclothes.settings import (
    API_KEY_ENV,
    CAPABILITIES,
    DEFAULT_BASE_URL,
    MAX_IN_FLIGHT,
    NAME,
    PRICE,
    PROFILE,
)
from providers.spec import ProviderSpec

SPEC = ProviderSpec(
    name=NAME,
    client_path="providers.changeclothes.client:ChangeClothesClient",
    profile=PROFILE,
    max_in_flight=MAX_IN_FLIGHT,
    capabilities=CAPABILITIES,
    default_base_url=DEFAULT_BASE_URL,
    credential_env=(API_KEY_ENV,),
    price=PRICE,
)
