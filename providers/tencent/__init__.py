"""Tencent Cloud AI Art ChangeClothes: one signed JSON POST, answered in sync."""

from __future__ import annotations

from providers.spec import ProviderSpec
from providers.tencent.settings import (
    CAPABILITIES,
    DEFAULT_BASE_URL,
    MAX_IN_FLIGHT,
    NAME,
    PRICE,
    PROFILE,
    SECRET_ID_ENV,
    SECRET_KEY_ENV,
)

SPEC = ProviderSpec(
    name=NAME,
    client_path="providers.tencent.client:TencentClient",
    profile=PROFILE,
    max_in_flight=MAX_IN_FLIGHT,
    capabilities=CAPABILITIES,
    default_base_url=DEFAULT_BASE_URL,
    credential_env=(SECRET_ID_ENV, SECRET_KEY_ENV),
    price=PRICE,
)
