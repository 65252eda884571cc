"""AILabTools (try-on and refiner, one account): endpoint, credential, image limits, request
shapes, concurrency."""

from __future__ import annotations

from decimal import Decimal
from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile
from schemas.money import Price

NAME: Final = "ailab"
REFINER_NAME: Final = "ailab_refiner"
DEFAULT_BASE_URL: Final = "https://www.ailabapi.com"
API_KEY_ENV: Final = "AILAB_API_KEY"
MAX_IN_FLIGHT: Final = 4
REFINER_MAX_IN_FLIGHT: Final = 4
# Try-on (vendor's page) and refiner (doc 004): >150 and <4096 px, <=5 MB (the try-on page
# says 3-5 MB depending on the model: 3 MB to be safe).
PROFILE: Final = ImageProfile(
    name=NAME, min_side=151, max_side=4095, max_bytes=3_000_000, formats=("JPEG", "PNG")
)
REFINER_PROFILE: Final = ImageProfile(
    name=REFINER_NAME, min_side=151, max_side=4095, max_bytes=5_000_000, formats=("JPEG", "PNG")
)
# Our categories -> the try-on API's clothes_type.
CLOTHES_TYPES: Final[dict[str, str]] = {
    "upper_body": "upper_body",
    "lower_body": "lower_body",
    "dresses": "full_body",
}
CAPABILITIES: Final = Capabilities(
    categories=frozenset(CLOTHES_TYPES), lower_garment=False, async_jobs=True
)

# Prices. The vendor bills universal credits per successful request: 10 for Try on Clothes, 25
# for the Refiner ("Billing Instructions" on www.ailabtools.com/docs/ai-portrait/editing/
# try-on-clothes and .../enhance/try-on-clothes-refiner; the "Billing Introduction" table; docs
# repo ailabtools-tobias/ailabtools-docs at 6ddd5d1, 2026-06-25). Credits sell in packs from
# $6 per 2,000 ($0.003 a credit) to $2,500 per 1,000,000 ($0.0025). We take the smallest packs'
# $0.003, so a budget holds whatever pack the account bought from: bigger packs make a call
# cheaper (the docs' own "≈" figures use $0.0027).
CREDIT_USD: Final = Decimal("0.003")  # $6 / 2,000 credits
# Credits per successful call ("Billing Instructions": ``BillingInstructions creditsPerRequest``
# 10 on docs/ai-portrait/editing/try-on-clothes.mdx, 25 on .../enhance/
# try-on-clothes-refiner.mdx): what ``GET /api/common/query-credits`` is compared with.
TRYON_CREDITS: Final = 10
REFINER_CREDITS: Final = 25
# Both APIs take one key's universal credits (``common`` in query-credits, "all APIs
# supported"): one balance, so a plan's try-ons and refines are checked against it together.
ACCOUNT: Final = "ailab"
_PRICING = (
    "www.ailabtools.com/docs/ai-portrait/{page}, Billing Instructions (ailabtools-tobias/"
    "ailabtools-docs 6ddd5d1, 2026-06-25): {credits} credits per successful request; credits"
    " from $6 per 2,000 ($0.003 each)"
)
PRICE: Final[Price | None] = Price(
    CREDIT_USD * TRYON_CREDITS,
    "USD",
    source=_PRICING.format(page="editing/try-on-clothes", credits=TRYON_CREDITS),
)
REFINER_PRICE: Final[Price | None] = Price(
    CREDIT_USD * REFINER_CREDITS,
    "USD",
    source=_PRICING.format(page="enhance/try-on-clothes-refiner", credits=REFINER_CREDITS),
)
# "Each successful API request consumes N credits [...]. Failed requests are not billed." (the
# same pages): a task that ends failed costs nothing.
BILLS_FAILED_JOBS: Final = False
