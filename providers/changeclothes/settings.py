"""ChangeClothesAI (doc 000): endpoint, credential, image limits, request shapes, concurrency."""

from __future__ import annotations

from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile

NAME: Final = "changeclothes"
DEFAULT_BASE_URL: Final = "https://changeclothesai.online"
API_KEY_ENV: Final = "CHANGECLOTHES_API_KEY"
MAX_IN_FLIGHT: Final = 8
# The doc documents no image limits: conservative defaults, overridable.
PROFILE: Final = ImageProfile(name=NAME, min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024)
CAPABILITIES: Final = Capabilities(prompt=True, lower_garment=False, garment_optional=True)
