"""fal's errors: model errors (a ``detail`` list of typed objects) and request errors (a flat
``detail`` string with ``error_type``, also in the ``X-Fal-Error-Type`` header).

Sources: fal.ai/docs/documentation/model-apis/errors ("Model Errors": HTTP status, headers such
as ``X-Fal-Retryable``, ``detail: [{loc, msg, type, url, ctx?, input?}]``; types named there:
``image_too_large``; ``content_policy_violation`` as quoted from the same reference by
wavespeed.ai's guide) and .../request-errors (the whole ``error_type`` table below, with its
typical statuses). Auth, balance and rate answers: HTTP 401/403/429 with ``{"detail": str}``;
an account out of balance answers 403 ``User is locked. Reason: Exhausted balance. Top up your
balance at fal.ai/dashboard/billing.`` (quoted verbatim by users in fal-ai/fal issues #1112,
#1147, #1163, 2026).

UNVERIFIED: the model error types other than the two above (names as fal's pages use them
elsewhere: kept so errors get names; unknown types are permanent); the status codes a queue
answers for an unknown request (we read 404) and for a result asked too early (400).
"""

from __future__ import annotations

from collections.abc import Mapping

from providers.common import ErrorSpec
from schemas.results import ErrorKind

_P, _T, _F = ErrorKind.PERMANENT, ErrorKind.TRANSIENT, ErrorKind.FATAL

# Model errors, by ``detail[].type`` (our code: the type upper-cased).
MODEL_ERRORS: Mapping[str, ErrorSpec] = {
    "content_policy_violation": ErrorSpec(_P, "flagged by a content checker", http_status=422),
    "image_too_large": ErrorSpec(_P, "image larger than the model takes", http_status=422),
    "image_too_small": ErrorSpec(_P, "image smaller than the model takes", http_status=422),
    "image_load_error": ErrorSpec(_P, "image could not be decoded", http_status=422),
    "file_download_error": ErrorSpec(_P, "input URL could not be downloaded", http_status=422),
    "face_detection_error": ErrorSpec(_P, "no face found in the image", http_status=422),
    "no_media_generated": ErrorSpec(_P, "the model produced no image", http_status=422),
    # FastAPI/pydantic validation (fal apps are FastAPI): a missing or ill-typed field.
    "missing": ErrorSpec(_P, "a required field is missing", http_status=422),
    "internal_server_error": ErrorSpec(_T, "the model failed", http_status=500),
    "generation_timeout": ErrorSpec(_T, "generation timed out", http_status=504),
    "downstream_service_error": ErrorSpec(_T, "a service the model uses failed", http_status=400),
    "downstream_service_unavailable": ErrorSpec(
        _T, "a service the model uses is unavailable", http_status=500
    ),
}

# Request (infrastructure) errors, by ``error_type`` (docs "Request Error Types", complete).
# fal has retried a queued request up to 10 times before answering one of these, but none is
# the row's fault: a new submission may succeed (5xx are never billed).
REQUEST_ERRORS: Mapping[str, ErrorSpec] = {
    "request_timeout": ErrorSpec(_T, "exceeded the allowed processing time", http_status=504),
    "startup_timeout": ErrorSpec(_T, "the runner did not start in time", http_status=504),
    "runner_scheduling_failure": ErrorSpec(_T, "no runner could be allocated", http_status=503),
    "runner_connection_timeout": ErrorSpec(
        _T, "connection to the runner timed out", http_status=503
    ),
    "runner_disconnected": ErrorSpec(_T, "the runner disconnected", http_status=503),
    "runner_connection_refused": ErrorSpec(
        _T, "the runner refused the connection", http_status=503
    ),
    "runner_connection_error": ErrorSpec(_T, "connection error with the runner", http_status=503),
    "runner_incomplete_response": ErrorSpec(
        _T, "incomplete response from the runner", http_status=502
    ),
    "runner_server_error": ErrorSpec(_T, "the runner failed", http_status=500),
    "client_disconnected": ErrorSpec(_T, "the client hung up", http_status=499),
    "client_cancelled": ErrorSpec(_P, "the request was cancelled", http_status=499),
    "bad_request": ErrorSpec(_P, "malformed request", http_status=400),
    "internal_error": ErrorSpec(_T, "unexpected internal error", http_status=500),
}

# The account's answers, by HTTP status, where the body carries no type.
ACCOUNT_ERRORS: Mapping[int, ErrorSpec] = {
    401: ErrorSpec(_F, "the key was refused", name="UNAUTHORIZED", http_status=401),
    403: ErrorSpec(_F, "the account may not call (locked, no access)", name="FORBIDDEN"),
}
# A 403 whose detail says the balance is exhausted: no credits (run-fatal).
EXHAUSTED_BALANCE = "exhausted balance"
