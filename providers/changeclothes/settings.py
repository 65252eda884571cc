"""ChangeClothesAI (doc 000): endpoint, credential, image limits, request shapes, concurrency."""

from __future__ import annotations

from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile
from schemas.money import Price

NAME: Final = "changeclothes"
DEFAULT_BASE_URL: Final = "https://changeclothesai.online"
API_KEY_ENV: Final = "CHANGECLOTHES_API_KEY"
MAX_IN_FLIGHT: Final = 8
# The doc documents no image limits: conservative defaults, overridable.
PROFILE: Final = ImageProfile(name=NAME, min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024)
CAPABILITIES: Final = Capabilities(prompt=True, lower_garment=False, garment_optional=True)
# Unknown. Docs 000/001 ("Preise", "요금 안내", 2025-05-28) say only that API calls consume the
# account's credits, bought on the vendor's pricing page; neither the credits a call takes nor a
# pack's price is stated there, and no copy of that pricing page was found to derive one from.
PRICE: Final[Price | None] = None
