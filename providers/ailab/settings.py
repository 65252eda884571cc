"""AILabTools (try-on and refiner, one account): endpoint, credential, image limits, request
shapes, concurrency."""

from __future__ import annotations

from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile

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
