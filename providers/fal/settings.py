"""The fal.ai queue (one account, several try-on models): endpoint, credential, rate, and each
model's inputs, image limits, request shapes and price.

Sources (read 2026-12-05 with the project's search tool; none tried on a live account):
- Queue: docs.fal.ai/model-endpoints/queue and fal.ai/docs/documentation/model-apis/inference/
  queue: ``POST https://queue.fal.run/{model_id}`` answers ``request_id``, ``status_url``,
  ``response_url``, ``cancel_url``; status ``GET .../requests/{id}/status`` is ``IN_QUEUE``
  (with ``queue_position``), ``IN_PROGRESS`` or ``COMPLETED``; ``GET .../requests/{id}`` is the
  result. Status and result live under the model's *app* id, its first two segments: "the
  subpath [...] should be used when making the request, but not when getting request status or
  results" (the same page); the official Python client builds them so (fal-ai/fal
  ``projects/fal_client/src/fal_client/client.py``, ``AppId.from_endpoint_id``, at c6f0afa).
- Key: ``Authorization: Key <FAL_KEY>`` (the official client's ``auth.py``; every model page).
- Output lifetime: "Generated media files [...] are stored on the fal CDN and available for at
  least 7 days by default" (docs.fal.ai/faq; per request ``X-Fal-Object-Lifecycle-Preference``,
  docs "Data Retention"). We download at once, so we send no preference.
- Billing: "Server errors (HTTP 500+) are never charged"; "Client-side errors like invalid
  inputs (HTTP 422) may still be charged if a runner spent GPU time" (docs.fal.ai/faq).
- Concurrency: "New accounts start at 2 concurrent requests [...] up to 40"; requests over the
  limit wait IN_QUEUE, "never rejected due to concurrency limits" (docs "Concurrency limits").

UNVERIFIED: "about 10 requests/s per user" (the issue's figure; fal's pages we found state a
concurrency limit, not a rate). We apply it to submissions: the official client itself polls a
request's status every 0.1 s (``DEFAULT_QUEUE_POLL_INTERVAL``), which a 10/s limit on every call
would forbid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final, Literal

from providers.base import Capabilities
from schemas.image_profile import ImageProfile
from schemas.money import Price

ACCOUNT: Final = "fal"  # every model's spec draws on this one account (ProviderSpec.account)
DEFAULT_BASE_URL: Final = "https://queue.fal.run"
API_KEY_ENV: Final = "FAL_KEY"  # the official clients' variable
# Queued requests do not count against the account's concurrency (2 for a new account): a few
# more in flight than that keeps the queue fed without polling many idle requests.
MAX_IN_FLIGHT: Final = 4
REQUESTS_PER_SECOND: Final = 10.0  # submissions; see UNVERIFIED above
# Only successful requests are billed: 5xx never are (FAQ). The FAQ's "422 may still be
# charged" is not something a run can know beforehand: we count them free, as the brief's
# "only successful outputs billed" says, and the emulator does likewise.
BILLS_FAILED_JOBS: Final = False

ResultShape = Literal["images", "image"]


@dataclass(frozen=True, slots=True)
class FalModel:
    """One try-on model on the queue: where it is, what it takes, what it answers."""

    name: str  # our provider name (its spec's and entry point's)
    model_id: str  # the queue path, e.g. "fal-ai/fashn/tryon/v1.6"
    person_field: str
    garment_field: str
    # Our category -> the model's value of ``category_field``; no field: the model infers it.
    category_field: str | None
    categories: dict[str, str]
    profile: ImageProfile
    capabilities: Capabilities
    price: Price | None
    result: ResultShape  # "images": ``{images: [File]}``; "image": ``{image: File}``
    extra_inputs: dict[str, object] = field(default_factory=dict)

    @property
    def app_id(self) -> str:
        """The first two segments: where the queue keeps status and results."""
        return "/".join(self.model_id.split("/")[:2])


_CATEGORIES = frozenset({"upper_body", "lower_body", "dresses"})

# FASHN v1.6, the default ``fal`` provider: the closest to the seed providers' semantics (a
# person and one garment, an explicit category for each of ours, base64 inputs documented,
# a fixed published price). fal.ai/models/fal-ai/fashn/tryon/v1.6/llms.txt: ``model_image`` and
# ``garment_image`` (required, "URL or base64"), ``category`` tops|bottoms|one-pieces|auto
# (default auto), mode, garment_photo_type, ...; "Price: $0.075 per generations"; output at
# 864x1296. FASHN's own API (docs.fashn.ai, tryon-v1-6) wants base64 "with the proper prefix
# (data:image/jpg;base64,...)": we send data URIs.
# UNVERIFIED: image limits (neither page states any: ours, generous for 864x1296 output); the
# output shape (fal's image models answer ``images: [{url, content_type, ...}]``; the parser
# also takes ``image``).
FASHN: Final = FalModel(
    name="fal",
    model_id="fal-ai/fashn/tryon/v1.6",
    person_field="model_image",
    garment_field="garment_image",
    category_field="category",
    categories={"upper_body": "tops", "lower_body": "bottoms", "dresses": "one-pieces"},
    profile=ImageProfile(
        name="fal", min_side=256, max_side=2048, max_bytes=4 * 1024 * 1024, formats=("JPEG", "PNG")
    ),
    capabilities=Capabilities(categories=_CATEGORIES, async_jobs=True),
    price=Price(
        Decimal("0.075"),
        "USD",
        source="fal.ai/models/fal-ai/fashn/tryon/v1.6/llms.txt, Pricing: $0.075 per generation "
        "(read 2026-12-05)",
    ),
    result="images",
)

# Kling Kolors virtual try-on v1.5 on fal (``fal_kolors``): ``human_image_url`` and
# ``garment_image_url`` (required), ``sync_mode``, no category (the garment image decides: the
# model does single garments and top+bottom pairs). Schema as mirrored from fal by
# docs.skills.video (api-reference/kling-15-kolors-virtual-try-on); Kling's own API (the same
# model) takes jpg/jpeg/png, <= 10 MB, sides >= 300 px.
# UNVERIFIED: that fal takes data URIs for these ``*_url`` fields (fal: "some models also
# accept data URIs"); fal's price for it (not found: unknown, never 0); the output shape
# (``image: File`` as we read fal's page; the parser also takes ``images``).
KOLORS: Final = FalModel(
    name="fal_kolors",
    model_id="fal-ai/kling/v1-5/kolors-virtual-try-on",
    person_field="human_image_url",
    garment_field="garment_image_url",
    category_field=None,
    categories={c: c for c in _CATEGORIES},
    profile=ImageProfile(
        name="fal_kolors",
        min_side=300,
        max_side=2048,
        max_bytes=4 * 1024 * 1024,
        formats=("JPEG", "PNG"),
    ),
    capabilities=Capabilities(categories=_CATEGORIES, async_jobs=True),
    price=None,
    result="image",
)

MODELS: Final[dict[str, FalModel]] = {model.name: model for model in (FASHN, KOLORS)}
