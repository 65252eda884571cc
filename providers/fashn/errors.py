"""FASHN's error names and how each affects the run.

Two kinds of error (api-overview/error-handling, fashn-api/errors):

- API-level: an HTTP status with ``{"error": "<Name>", "message": "..."}`` and no prediction
  id: the request never ran. 429 carries three names, told apart by ``error`` only:
  RateLimitExceeded and ConcurrencyLimitExceeded (wait, then retry: transient) and
  OutOfCredits (no row can succeed: fatal).
- Runtime: HTTP 200 from /v1/status/{id} with ``status: "failed"`` and
  ``error: {"name": "<Name>", "message": "..."}``: the prediction ran and failed.

Verified on docs.fashn.ai: every API-level name; the runtime names ImageLoadError (and, on the
older errors page, NSFWError and PhotoTypeError). UNVERIFIED (the current "Common runtime
errors" table was cut off in every copy we could read; the names are those FASHN's SDKs and
integrations handle): ContentModerationError, PoseError, InputValidationError, PipelineError,
ThirdPartyError, UnavailableError. A name not in this table fails the row (permanent), with the
vendor's name as our code, so a new one is visible in the metadata.

Billing: no page says a failed request or prediction is billed; none is ``charged`` here (see
``settings.BILLS_FAILED_JOBS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from providers.common import ErrorSpec
from schemas.results import ErrorKind

_P, _T, _F = ErrorKind.PERMANENT, ErrorKind.TRANSIENT, ErrorKind.FATAL

OUT_OF_CREDITS: Final = "OutOfCredits"
UNAUTHORIZED: Final = "UnauthorizedAccess"
NOT_FOUND: Final = "NotFound"

# API-level errors (HTTP status != 200), by ``error``.
API_ERRORS: Final[Mapping[str, ErrorSpec]] = {
    "BadRequest": ErrorSpec(_P, "invalid request format or parameters", http_status=400),
    UNAUTHORIZED: ErrorSpec(_F, "invalid, inactive or missing API key", http_status=401),
    NOT_FOUND: ErrorSpec(
        _P, "resource not found, or prediction no longer tracked", http_status=404
    ),
    "RateLimitExceeded": ErrorSpec(_T, "too many requests in the window", http_status=429),
    "ConcurrencyLimitExceeded": ErrorSpec(_T, "too many concurrent predictions", http_status=429),
    OUT_OF_CREDITS: ErrorSpec(_F, "no API credits remaining", http_status=429),
    "InternalServerError": ErrorSpec(_T, "server-side error, retry with backoff", http_status=500),
}

# Runtime errors (a failed prediction), by ``error.name``. Kinds are our reading: the input or
# its content is the row's problem (permanent, and a fallback may take the row); the vendor's
# own failures may pass on a new prediction (transient: the row is submitted again).
RUNTIME_ERRORS: Final[Mapping[str, ErrorSpec]] = {
    "ImageLoadError": ErrorSpec(_P, "could not fetch or decode an input image"),
    "ContentModerationError": ErrorSpec(_P, "prohibited content in an input (moderation)"),
    "NSFWError": ErrorSpec(_P, "NSFW content detected in an input (older name)"),
    "PhotoTypeError": ErrorSpec(_P, "the photo type could not be handled (older name)"),
    "PoseError": ErrorSpec(_P, "no usable pose detected in the model image"),
    "InputValidationError": ErrorSpec(_P, "an input failed the model's validation"),
    "PipelineError": ErrorSpec(_T, "unexpected failure in the pipeline, retry"),
    "ThirdPartyError": ErrorSpec(_T, "a third-party service the pipeline uses failed, retry"),
    "UnavailableError": ErrorSpec(_T, "the service is temporarily unavailable, retry"),
}


def classify_api_error(status: int, name: str) -> tuple[ErrorKind, str]:
    """(kind, our code) of an API-level error answer: the vendor's name first, the HTTP status
    when the name is unknown or missing (a proxy's page: see ``classify_status``)."""
    spec = API_ERRORS.get(name)
    if spec is not None:
        return spec.kind, name
    if status == 429:
        return _T, name or "RATE_LIMITED"
    if status >= 500:
        return _T, name or f"HTTP_{status}"
    if status in (401, 402, 403):
        return _F, name or f"HTTP_{status}"
    return _P, name or f"HTTP_{status}"
