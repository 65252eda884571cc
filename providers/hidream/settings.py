"""HiDream vton (doc 003): endpoint, credential, image limits, request shapes, concurrency."""

from __future__ import annotations

from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile
from schemas.money import Price

NAME: Final = "hidream"
DEFAULT_BASE_URL: Final = "https://hidreamai.com"
API_KEY_ENV: Final = "HIDREAM_API_KEY"
MAX_IN_FLIGHT: Final = 4
# The doc documents no image limits: conservative defaults, overridable.
PROFILE: Final = ImageProfile(name=NAME, min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024)
CAPABILITIES: Final = Capabilities(lower_garment=True, async_jobs=True)
# Unknown: doc 003 (hidreamai.com/doc/vton/request) and HiDream's other API pages state no price
# or credit cost for vton.
PRICE: Final[Price | None] = None
# Not documented either: we assume only a job that ends with its image is billed, as for calls
# (errors.py); the emulator gives a failed job's credit back likewise.
BILLS_FAILED_JOBS: Final = False
