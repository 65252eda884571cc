"""Client-side pieces every vendor module shares; ``base.py`` stays the interface.

Credentials (held as ``SecretStr``, a missing one is run-fatal), redaction of secrets from
messages, the mapping of httpx transport failures and of bare HTTP statuses to
``ProviderError`` kinds, and ``ErrorSpec``, the row type of every vendor's error table (each
table lives in its provider package's ``errors.py``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Collection, Iterable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

import httpx
from pydantic import SecretStr

from providers import settings
from providers.base import ProviderError
from schemas.results import ErrorKind

MISSING_API_KEY = "MISSING_API_KEY"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One row of a vendor's error table, keyed by the vendor's code: how it affects the run
    and what it means; ``name`` where the code is a number the vendor names, ``http_status``
    where the vendor documents the status it comes with."""

    kind: ErrorKind
    meaning: str
    name: str | None = None
    http_status: int | None = None


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` blanked out (vendor and httpx text may echo them).

    Also the forms a message may quote a secret in: escaped as a Python str or bytes repr
    (h11's "Illegal header value b'Bearer key\\n'"), as JSON, or URL-encoded."""
    forms: set[str] = set()
    for secret in secrets:
        if secret:  # an empty secret would "match" between every character
            forms |= {
                secret,
                repr(secret)[1:-1],
                repr(secret.encode())[2:-1],
                json.dumps(secret)[1:-1],
                quote(secret, safe=""),
                quote_plus(secret),
            }
    for form in sorted(forms, key=len, reverse=True):  # a longer form holds shorter ones
        text = text.replace(form, "***")
    return text


def classify_status(status: int, *, fatal: Collection[int] = (401, 403)) -> tuple[ErrorKind, str]:
    """``(kind, code)`` from the HTTP status alone, for an answer that carries no vendor code
    (a gateway's or proxy's): 429 and 5xx are transient, ``fatal`` (bad key, no credits: no
    other row can succeed either) stops the run, any other status fails the row."""
    if status == 429:
        return ErrorKind.TRANSIENT, "RATE_LIMITED"
    if status >= 500:
        return ErrorKind.TRANSIENT, f"HTTP_{status}"
    if status in fatal:
        return ErrorKind.FATAL, f"HTTP_{status}"
    return ErrorKind.PERMANENT, f"HTTP_{status}"


def as_secret(value: SecretStr | str) -> SecretStr:
    """``value`` as ``SecretStr``: a plain str must not linger in repr/vars."""
    return value if isinstance(value, SecretStr) else SecretStr(str(value))


def missing_key(provider: str, message: str) -> ProviderError:
    """FATAL ``MISSING_API_KEY``: without credentials no row can succeed. ``message`` names
    the variable or argument, never a value."""
    return ProviderError(
        kind=ErrorKind.FATAL, code=MISSING_API_KEY, message=message, provider=provider
    )


def require_key(value: SecretStr | str, *, provider: str) -> SecretStr:
    """The API key as ``SecretStr``; an empty one raises ``missing_key``."""
    key = as_secret(value)
    if not key.get_secret_value():
        raise missing_key(provider, "the API key is empty")
    return key


def key_from_env(env_name: str, *, provider: str) -> SecretStr:
    """The credential ``env_name`` (environment, else a supplied Secret block), or raises
    ``missing_key`` naming the variable."""
    key = settings.credential(env_name)
    if key is None:
        raise missing_key(provider, f"{env_name} is not set")
    return key


async def guard_transport(
    call: Awaitable[httpx.Response],
    *,
    provider: str,
    url: str,
    timeout: float,
    secrets: Iterable[str],
    request_id: str | None = None,
) -> httpx.Response:
    """Await ``call`` (an httpx request to ``url``); a timeout or transport failure becomes a
    transient ``TIMEOUT`` / ``CONNECTION_ERROR`` with ``secrets`` blanked from the message."""
    error: ProviderError
    try:
        return await call
    except httpx.TimeoutException as exc:
        error = ProviderError(
            kind=ErrorKind.TRANSIENT,
            code="TIMEOUT",
            message=f"no answer from {url} within {timeout}s ({type(exc).__name__})",
            provider=provider,
            request_id=request_id,
        )
    except httpx.TransportError as exc:
        error = ProviderError(
            kind=ErrorKind.TRANSIENT,
            code="CONNECTION_ERROR",
            message=redact_secrets(f"{url} unreachable: {type(exc).__name__}: {exc}", secrets),
            provider=provider,
            request_id=request_id,
        )
    # Raised outside the except block: httpx's exception holds the request and its auth
    # headers, so it must not ride along as __context__.
    raise error
