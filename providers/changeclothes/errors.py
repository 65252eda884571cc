"""ChangeClothesAI's response codes (doc 000; both endpoints share them).

Billing is not documented beyond "API calls consume credits from your account" (docs 000/001):
we assume only successful calls are billed, so no code here is ``charged``.
"""

from __future__ import annotations

from providers.common import ErrorSpec
from schemas.results import ErrorKind

_P, _T, _F = ErrorKind.PERMANENT, ErrorKind.TRANSIENT, ErrorKind.FATAL

# Kinds are our reading of each meaning.
ERROR_TABLE: dict[int, ErrorSpec] = {
    500: ErrorSpec(_T, "internal server error", name="SERVER_ERROR"),
    10001: ErrorSpec(_F, "user not authenticated", name="NOT_LOGIN"),
    10002: ErrorSpec(_F, "user does not exist", name="USER_NOT_EXIST"),
    10003: ErrorSpec(_F, "not enough credits", name="INSUFFICIENT_CREDITS"),
    10004: ErrorSpec(_P, "invalid parameters", name="INVALID_PARAM"),
    10005: ErrorSpec(_P, "harmful content detected", name="HARMFUL_CONTENT"),
    10006: ErrorSpec(_F, "trial usage limit exceeded", name="INSUFFICIENT_TRAIL_COUNT"),
    # A processing failure on their side: worth one retry.
    20001: ErrorSpec(_T, "processing failed", name="TRY_ON_EXCEPTION"),
    30001: ErrorSpec(_F, "invalid API key", name="INVALID_API_KEY"),
    30002: ErrorSpec(_F, "invalid request signature", name="INVALID_SIGNATURE"),
}
