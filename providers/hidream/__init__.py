"""HiDream AI virtual try-on: submit a JSON job, then poll for its result."""

from __future__ import annotations

from providers.hidream.settings import (
    API_KEY_ENV,
    BILLS_FAILED_JOBS,
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
    client_path="providers.hidream.client:HiDreamClient",
    profile=PROFILE,
    max_in_flight=MAX_IN_FLIGHT,
    capabilities=CAPABILITIES,
    default_base_url=DEFAULT_BASE_URL,
    credential_env=(API_KEY_ENV,),
    price=PRICE,
    bills_failed_jobs=BILLS_FAILED_JOBS,
)
