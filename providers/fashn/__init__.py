"""FASHN virtual try-on: submit a JSON prediction to /v1/run, poll /v1/status/{id}; the
account's credits on /v1/credits. A provider package registered only through entry points
(``tryon_flows.providers``), as a third party's would be."""

from __future__ import annotations

from providers.fashn.settings import (
    API_KEY_ENV,
    BILLS_FAILED_JOBS,
    CAPABILITIES,
    CREDITS_PER_IMAGE,
    DEFAULT_BASE_URL,
    MAX_IN_FLIGHT,
    NAME,
    PRICE,
    PROFILE,
    REQUESTS_PER_SECOND,
)
from providers.spec import ProviderSpec

SPEC = ProviderSpec(
    name=NAME,
    client_path="providers.fashn.client:FashnClient",
    profile=PROFILE,
    max_in_flight=MAX_IN_FLIGHT,
    capabilities=CAPABILITIES,
    requests_per_second=REQUESTS_PER_SECOND,
    default_base_url=DEFAULT_BASE_URL,
    credential_env=(API_KEY_ENV,),
    price=PRICE,
    bills_failed_jobs=BILLS_FAILED_JOBS,
    credits_per_call=CREDITS_PER_IMAGE,
)

__all__ = ["SPEC"]
