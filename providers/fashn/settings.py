"""FASHN virtual try-on (``tryon-v1.6``): endpoint, credential, model, image limits, request
shapes, limits and price. Sources are docs.fashn.ai pages as stored on 2026-12-05 (cited per
value); what no page says is marked UNVERIFIED."""

from __future__ import annotations

import os
from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile
from schemas.money import Price

NAME: Final = "fashn"
# "The base URL for the FASHN API is https://api.fashn.ai/v1/" (fashn-api/overview); the paths
# below carry the /v1 so TRYON_FASHN_BASE_URL is a host, as for the other providers.
DEFAULT_BASE_URL: Final = "https://api.fashn.ai"
RUN_PATH: Final = "/v1/run"
STATUS_PATH: Final = "/v1/status/{id}"
CREDITS_PATH: Final = "/v1/credits"  # utility-endpoints/credits
# What the official SDKs read ("Both SDKs read FASHN_API_KEY from the environment").
API_KEY_ENV: Final = "FASHN_API_KEY"

# The try-on model: one /v1/run serves every FASHN model, chosen by ``model_name``
# (api-overview/api-fundamentals). tryon-v1.6 is the "most mature and production-ready"
# (getting-started/api-setup); tryon-v1.5 is the earlier one (fashn-api/endpoints).
MODEL_ENV: Final = "TRYON_FASHN_MODEL"
DEFAULT_MODEL: Final = "tryon-v1.6"
MODELS: Final = ("tryon-v1.6", "tryon-v1.5")


def model_name() -> str:
    """``TRYON_FASHN_MODEL`` where set (non-blank), else ``tryon-v1.6``."""
    return (os.environ.get(MODEL_ENV) or "").strip() or DEFAULT_MODEL


# Our categories -> FASHN's ``category`` ('auto' | 'tops' | 'bottoms' | 'one-pieces',
# api-reference/tryon-v1-6). We always send one: the manifest says what the garment is, and
# 'auto' could pick another garment off an on-model photo.
CATEGORIES: Final[dict[str, str]] = {
    "upper_body": "tops",
    "lower_body": "bottoms",
    "dresses": "one-pieces",
}
CAPABILITIES: Final = Capabilities(
    categories=frozenset(CATEGORIES), lower_garment=False, async_jobs=True
)

# Images (guides/image-preprocessing-best-practices): "1K endpoints (e.g., Try-On v1.6): max
# 2000px on the longest edge", converted to JPEG at "around 95". Inputs are URL or base64 with
# the ``data:image/<format>;base64,`` prefix (api-reference/tryon-v1-6): we send data URIs, no
# staging needed. UNVERIFIED: no minimum side and no byte limit is documented; 256 px and 8 MB
# are our bounds (a 2000 px JPEG at q95 is 1-3 MB).
PROFILE: Final = ImageProfile(
    name=NAME,
    min_side=256,
    max_side=2000,
    max_bytes=8 * 1024 * 1024,
    formats=("JPEG", "PNG"),
    jpeg_quality=95,
)

# Limits (fashn-api/endpoints, "Rate Limits"): "/run - Up to 50 requests per 60 seconds",
# "/status - Up to 50 requests per 10 seconds"; /v1/credits 30 per 10 s (its own page).
RUN_LIMIT: Final = (50, 60.0)
STATUS_LIMIT: Final = (50, 10.0)
CREDITS_LIMIT: Final = (30, 10.0)
REQUESTS_PER_SECOND: Final = RUN_LIMIT[0] / RUN_LIMIT[1]  # 0.83 submissions a second
# In flight: the docs name a 429 ConcurrencyLimitExceeded ("Too many concurrent predictions",
# api-overview/error-handling) but no number. A third-party transcription of the API
# (api-evangelist/fashn, openapi/fashn-openapi.yml) says "Concurrency limit: 6 simultaneous
# predictions per account": UNVERIFIED, taken as the default (and the emulator's limit). Six
# jobs polled no faster than every 2 s make at most 3 /status calls a second, within 50 / 10 s.
MAX_IN_FLIGHT: Final = 6

# Price. "Credits: 1 per image" (api-reference/tryon-v1-6, one output with the default
# num_samples 1): what GET /v1/credits is compared with. The API's price per credit is not on
# any page we could read (help.fashn.ai's $0.10 per credit is the App's top-up, "API credits
# are separate from App credits", account-management/billing; fal.ai's $0.075 is fal's own
# price for its hosted copy): unknown, never 0. Give it with --price fashn=AMOUNT.
CREDITS_PER_IMAGE: Final = 1
PRICE: Final[Price | None] = None
# UNVERIFIED: whether a prediction that ends ``failed`` is billed. We assume not, as for the
# other vendors; the emulator gives a failed job's credit back likewise.
BILLS_FAILED_JOBS: Final = False
# Results: "CDN URLs (default): Available for 72 hours after completion" (api-fundamentals).
RESULT_TTL_S: Final = 72 * 3600.0
