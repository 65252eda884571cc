"""The shared provider interface: errors survive crossing processes (Dask, Prefect results)."""

from __future__ import annotations

import pickle

from providers.base import ProviderError
from schemas.results import ErrorKind


def test_provider_error_round_trips_through_pickle() -> None:
    error = ProviderError(
        kind=ErrorKind.TRANSIENT,
        code="RATE_LIMITED",
        message="slow down",
        provider="changeclothes",
        http_status=429,
        request_id="req-1",
        retry_after=3.5,
    )
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ProviderError)
    assert (copy.kind, copy.code, copy.retry_after, copy.http_status) == (
        ErrorKind.TRANSIENT,
        "RATE_LIMITED",
        3.5,
        429,
    )
    assert copy.retryable and str(copy) == str(error)


def test_redaction_ignores_empty_secrets() -> None:
    from providers.common import redact_secrets

    assert redact_secrets("token abc in text", ["", "abc"]) == "token *** in text"
