"""HiDream vton (doc 003): endpoint, credential, image limits, request shapes, concurrency."""

from __future__ import annotations

from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile

NAME: Final = "hidream"
DEFAULT_BASE_URL: Final = "https://hidreamai.com"
API_KEY_ENV: Final = "HIDREAM_API_KEY"
MAX_IN_FLIGHT: Final = 4
# The doc documents no image limits: conservative defaults, overridable.
PROFILE: Final = ImageProfile(name=NAME, min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024)
CAPABILITIES: Final = Capabilities(lower_garment=True, async_jobs=True)
