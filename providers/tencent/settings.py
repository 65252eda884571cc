"""Tencent AI Art ChangeClothes (doc 002): endpoint, credentials, region, image limits,
request shapes, concurrency."""

from __future__ import annotations

from typing import Final

from providers.base import Capabilities
from schemas.image_profile import ImageProfile
from schemas.money import Price

NAME: Final = "tencent"
DEFAULT_BASE_URL: Final = "https://aiart.intl.tencentcloudapi.com"  # doc 002's (intl accounts)
# The SDK's variable names.
SECRET_ID_ENV: Final = "TENCENTCLOUD_SECRET_ID"
SECRET_KEY_ENV: Final = "TENCENTCLOUD_SECRET_KEY"
TOKEN_ENVS: Final = ("TENCENTCLOUD_TOKEN", "TENCENTCLOUD_SECURITY_TOKEN")
REGION_ENV: Final = "TENCENTCLOUD_REGION"
DEFAULT_REGION: Final = "ap-singapore"
# Tencent documents 1 concurrent task per account by default.
MAX_IN_FLIGHT: Final = 1
# Each side >512 and <3000 px (its error text also mentions 2000x2000, so we stay under that),
# <8 MB measured as base64.
PROFILE: Final = ImageProfile(
    name=NAME,
    min_side=513,
    max_side=2000,
    max_bytes=8_000_000,  # vendors' "MB" may be decimal: the smaller reading is safe under both
    bytes_as_base64=True,
)
# Our categories -> the API's ClothesType.
CLOTHES_TYPES: Final[dict[str, str]] = {
    "upper_body": "Upper-body",
    "lower_body": "Lower-body",
    "dresses": "Dress",
}
CAPABILITIES: Final = Capabilities(categories=frozenset(CLOTHES_TYPES), needs_urls=True)
# Unknown. Doc 002 states no price, and Tencent Cloud's billing overview for the product
# (tencentcloud.com/document/product/1238/63495, "Image Creation Large Model", read 2026-12)
# prices only Image Style Transfer (0.08 USD/pic, less by monthly volume), not ChangeClothes;
# nor do the China site's 混元生图 pages found.
PRICE: Final[Price | None] = None
