"""Input images: fetched along one route (``fetch``), fitted to a provider's profile
(``prepare``, resizing through ``resize``), each prepared once per run (``cache``).

Prefect-free. Every failure is an ``ImageInputError`` with a stable ``code`` and a
``transient`` flag.
"""

from tasks.images.cache import PreparedImageCache
from tasks.images.fetch import DEFAULT_MAX_FETCH_BYTES, ImageInputError, display_uri, fetch_bytes
from tasks.images.prepare import (
    DEFAULT_ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    MIN_SOURCE_SIDE,
    fetch_and_prepare,
    image_profile_fits,
    prepare_image,
)

__all__ = [
    "DEFAULT_ALLOWED_FORMATS",
    "DEFAULT_MAX_FETCH_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MIN_SOURCE_SIDE",
    "ImageInputError",
    "PreparedImageCache",
    "display_uri",
    "fetch_and_prepare",
    "fetch_bytes",
    "image_profile_fits",
    "prepare_image",
]
