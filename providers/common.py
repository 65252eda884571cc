"""Client-side pieces every vendor module shares; ``base.py`` stays the interface.

Credentials (held as ``SecretStr``, a missing one is run-fatal), redaction of secrets from
messages, the mapping of httpx transport failures and of bare HTTP statuses to
``ProviderError`` kinds, ``ResponseContext`` (what an error raised while reading one answer
carries), the errors for requests a provider cannot take, and ``ErrorSpec``, the row type of
every vendor's error table (each table lives in its provider package's ``errors.py``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus

import httpx
from pydantic import SecretStr

from providers import settings
from providers.base import PreparedImage, ProviderError, parse_retry_after
from schemas.results import ErrorKind

MISSING_API_KEY = "MISSING_API_KEY"
UNSUPPORTED_REQUEST = "UNSUPPORTED_REQUEST"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One row of a vendor's error table, keyed by the vendor's code: how it affects the run
    and what it means; ``name`` where the code is a number the vendor names, ``http_status``
    where the vendor documents the status it comes with."""

    kind: ErrorKind
    meaning: str
    name: str | None = None
    http_status: int | None = None
    # The vendor bills a call answered with this error (most bill successful calls only).
    charged: bool = False


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


def body_snippet(body: bytes) -> str:
    """The start of a body that is not the vendor's JSON, for an error message."""
    return " ".join(body[:160].decode("utf-8", "replace").split())


def as_int(value: object) -> int | None:
    """A vendor's numeric code, sent as a number or a string of digits; None otherwise."""
    if isinstance(value, str) and value.strip().lstrip("-").isdecimal():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def json_with_code(body: bytes) -> dict[str, Any] | None:
    """The body as ``{code: int, ...}`` (a vendor whose JSON answers carry a numeric ``code``),
    or None when it is not such JSON."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    code = as_int(payload.get("code"))
    return None if code is None else {**payload, "code": code}


class ResponseContext:
    """What every error raised while reading one answer carries: the provider, the HTTP
    status, the request id (``request_id`` when given, else the first of
    ``request_id_headers`` present), the ``Retry-After`` delay, and ``redact``'s secrets
    blanked out of its message. Parsing stays pure: any answer, also one made by hand, can be
    checked."""

    def __init__(
        self,
        provider: str,
        status: int,
        headers: Mapping[str, str],
        *,
        redact: Iterable[str] = (),
        request_id_headers: Iterable[str] = (),
        request_id: str | None = None,
        read_retry_after: bool = True,
    ) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        self.provider = provider
        self.status = status
        self.secrets = [s for s in redact if s]
        header_id = next((lowered[h] for h in request_id_headers if lowered.get(h)), None)
        self.request_id = request_id or header_id
        retry_after = lowered.get("retry-after") if read_retry_after else None
        self.retry_after = parse_retry_after(retry_after)

    def error(
        self, kind: ErrorKind, code: str, message: str, *, charged: bool = False
    ) -> ProviderError:
        return ProviderError(
            kind=kind,
            code=code,
            message=redact_secrets(message, self.secrets),
            provider=self.provider,
            http_status=self.status,
            request_id=self.request_id,
            retry_after=self.retry_after,
            charged=charged,
        )

    def fail(self, kind: ErrorKind, code: str, message: str, *, charged: bool = False) -> NoReturn:
        raise self.error(kind, code, message, charged=charged)

    def fail_without_json(self, body: bytes, *, fatal: Collection[int] = (401, 403)) -> NoReturn:
        """An answer without the vendor's JSON: malformed (permanent) with a 2xx; otherwise the
        HTTP status alone classifies it (a gateway's or proxy's answer, see
        ``classify_status``)."""
        status = self.status
        if 200 <= status < 300:
            self.fail(ErrorKind.PERMANENT, "MALFORMED_RESPONSE", f"HTTP {status} without JSON code")
        kind, name = classify_status(status, fatal=fatal)
        self.fail(
            kind, name, f"HTTP {status} without the vendor's JSON body: {body_snippet(body)!r}"
        )

    def fail_code(self, code: int, spec: ErrorSpec, message: str) -> NoReturn:
        """A numeric vendor code found in the vendor's error table: its kind, its name."""
        name = spec.name or f"CODE_{code}"
        message = f"code {code} {name} ({spec.meaning}): {message}"
        self.fail(spec.kind, name, message, charged=spec.charged)


def unsupported_request(provider: str, message: str) -> ProviderError:
    """PERMANENT ``UNSUPPORTED_REQUEST``: a row this provider cannot take, refused before
    anything is sent."""
    return ProviderError(
        kind=ErrorKind.PERMANENT, code=UNSUPPORTED_REQUEST, message=message, provider=provider
    )


def unsupported_category(provider: str, category: str | None) -> ProviderError:
    return unsupported_request(
        provider, f"category must be upper_body, lower_body or dresses: {category!r}"
    )


def staged_url(image: PreparedImage, *, provider: str) -> str:
    """The URL the provider fetches ``image`` from; PERMANENT ``NO_IMAGE_URL`` when the image
    was not staged."""
    if not image.url:
        raise ProviderError(
            kind=ErrorKind.PERMANENT,
            code="NO_IMAGE_URL",
            message=f"{provider} takes images by URL: stage {image.source_uri} and set its url",
            provider=provider,
        )
    return image.url


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


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider: str,
    timeout: float,
    secrets: Iterable[str],
    request_id: str | None = None,
    **request: Any,
) -> httpx.Response:
    """``http.request(method, url, **request)`` within ``timeout``, through
    ``guard_transport`` (``secrets``: the credentials the request carries)."""
    return await guard_transport(
        http.request(method, url, timeout=timeout, **request),
        provider=provider,
        url=url,
        timeout=timeout,
        secrets=secrets,
        request_id=request_id,
    )
