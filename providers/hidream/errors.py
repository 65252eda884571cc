"""HiDream's response codes: an UNVERIFIED placeholder.

Doc 003 documents no code but 0 (success). These are the codes the project's emulator answers
(our assumption, see emulator/hidream.py), so errors get names; replace them once live calls
show the vendor's. With an HTTP error status the status decides the kind (401/403/402 fatal,
429/5xx transient, other 4xx permanent); this table decides only for codes arriving with a
2xx, and unknown codes are permanent.

Billing is not documented either: we assume only successful calls (and jobs, see
``settings.BILLS_FAILED_JOBS``) are billed, so no code here is ``charged``.
"""

from __future__ import annotations

from collections.abc import Mapping

from providers.common import ErrorSpec
from schemas.results import ErrorKind

_P, _T, _F = ErrorKind.PERMANENT, ErrorKind.TRANSIENT, ErrorKind.FATAL

ERROR_TABLE: Mapping[int, ErrorSpec] = {
    40001: ErrorSpec(_P, "invalid request parameter", name="INVALID_PARAMETER"),
    40002: ErrorSpec(_P, "image unreadable or unfetchable", name="INVALID_IMAGE"),
    40003: ErrorSpec(_P, "image size outside the limits", name="IMAGE_SIZE"),
    40101: ErrorSpec(_F, "no credentials", name="UNAUTHORIZED"),
    40102: ErrorSpec(_F, "invalid token", name="INVALID_TOKEN"),
    40201: ErrorSpec(_F, "not enough credits", name="INSUFFICIENT_CREDITS"),
    40401: ErrorSpec(_P, "unknown or expired task id", name="TASK_NOT_FOUND"),
    50000: ErrorSpec(_T, "internal server error", name="INTERNAL_ERROR"),
}
