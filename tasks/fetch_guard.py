"""Fetch safety for input images: never let a manifest URL reach the worker's own networks.

A manifest is data from users; its ``http(s)://`` image URLs are fetched by the worker. Without a
guard, a row could read the cloud metadata service (``http://169.254.169.254/...``), an admin
port on loopback, or any host on the private network, and the answer would land in the lake or
be sent to a provider (server-side request forgery). So, by default, an input fetch refuses every
address that is not globally routable: loopback, private (RFC 1918, ``fc00::/7``), shared
(CGNAT ``100.64.0.0/10``), link-local (``169.254/16``, ``fe80::/10``), unspecified, multicast,
reserved and documentation ranges, and IPv6 forms embedding such an IPv4 address
(``::ffff:127.0.0.1``, 6to4, NAT64, Teredo).

How it holds for every request, redirects included:

- Host names are checked **after** DNS resolution, inside the connection pool: the aiohttp
  connector asks ``GuardedResolver``, which resolves, refuses the host if any of its addresses
  is blocked, and hands the connector only vetted addresses. The connector connects to exactly
  those, so there is no second lookup a rebinding DNS server could answer differently.
- Hosts written as addresses (no DNS: ``http://169.254.169.254/``, ``http://[::1]/``, and the
  numeric spellings aiohttp treats as addresses, such as ``http://2130706433/``) are checked by
  ``GuardedTransport`` before the request goes out.
- httpx follows redirects by sending each hop through the transport, so every hop is checked.
- Proxies from the environment are not used (they would connect on our behalf, unchecked).

``FetchPolicy(allow=[...])`` opens exactly what it names: networks in CIDR form (an address is a
/32 or /128) and host names (any address they resolve to). The CLI's ``--emulator`` allows
loopback. A refusal raises ``FetchBlockedError`` (an ``httpx.TransportError``) naming the host
and the address class, never the URL's path or query.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import httpx
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address
from aiohttp.resolver import ThreadedResolver

from providers.transport import AiohttpTransport

__all__ = [
    "BLOCKED_CODE",
    "LOOPBACK",
    "FetchBlockedError",
    "FetchPolicy",
    "GuardedResolver",
    "GuardedTransport",
    "blocked_reason",
    "fetch_timeout",
    "inputs_client_for",
    "inputs_http_client",
    "parse_allow_entry",
]

BLOCKED_CODE: Final = "FETCH_BLOCKED_ADDRESS"
LOOPBACK: Final = ("127.0.0.0/8", "::1/128")
DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0)
# A server trickling a byte just inside every read timeout must still end: a cap on the whole
# transfer of one response.
DEFAULT_TOTAL_TIMEOUT_S: Final = 300.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> addresses. Injectable so tests (and special deployments) need no real DNS.
Lookup = Callable[[str, int], Awaitable[Sequence[str]]]

_CGNAT: Final = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64: Final = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_LABEL_RE: Final = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class FetchBlockedError(httpx.TransportError):
    """A fetch refused because its host is (or resolves to) an address the policy blocks."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"host {host} {reason}")
        self.host = host
        self.reason = reason


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public destination (``None``: it is globally routable)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = blocked_reason(embedded)
            return f"an IPv4-embedding address of {inner}" if inner else None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a shared (CGNAT) address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "a non-public address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _parse_address(host: str) -> IPAddress | None:
    """``host`` as an IP address (IPv6 zone ids and a trailing dot tolerated), else ``None``."""
    text = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        if "%" in text:  # fe80::1%eth0 or, URL-encoded, fe80::1%25eth0: the scope is irrelevant
            try:
                return ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                return None
        return None


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def parse_allow_entry(entry: str) -> str:
    """Validate one allow-list entry; return it normalised. ``ValueError`` says what is wrong.

    An entry is a network in CIDR form (``10.0.0.0/8``, ``fd00::/8``), one address
    (``192.168.1.20``) or a host name (``images.internal.example``), matched exactly.
    """
    text = entry.strip() if isinstance(entry, str) else ""
    if not text:
        raise ValueError("empty fetch_allow entry")
    if "://" in text:
        raise ValueError(
            f"fetch_allow entry {entry!r}: give a host name or a CIDR network, not a URL"
        )
    network: IPNetwork | None = None
    if "/" in text:
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ValueError(f"fetch_allow entry {entry!r}: not a valid network ({exc})") from None
    else:
        address = _parse_address(text)
        if address is not None:
            network = ipaddress.ip_network(address.compressed.split("%", 1)[0])
    if network is not None:
        if network.prefixlen == 0:
            raise ValueError(
                f"fetch_allow entry {entry!r} allows every address: that disables the guard"
            )
        return str(network)
    host = _normal_host(text)
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise ValueError(
            f"fetch_allow entry {entry!r}: not a host name (letters, digits, '-' and '.'; "
            "IDN names in their xn-- form) or a CIDR network"
        )
    if is_ip_address(host):
        raise ValueError(f"fetch_allow entry {entry!r}: a numeric host that is not an address")
    return host


@dataclass(frozen=True)
class FetchPolicy:
    """Which destinations an input fetch may reach beyond the public internet.

    ``allow`` entries: CIDR networks, single addresses or exact host names (see
    ``parse_allow_entry``). ``lookup`` replaces DNS (tests; ``None``: the system resolver).
    """

    allow: tuple[str, ...] = ()
    lookup: Lookup | None = field(default=None, compare=False, repr=False)
    networks: tuple[IPNetwork, ...] = field(init=False, repr=False)
    hosts: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        entries = tuple(parse_allow_entry(e) for e in self.allow)
        networks, hosts = [], set()
        for entry in entries:
            if "/" in entry:  # normalised networks always carry their prefix length
                networks.append(ipaddress.ip_network(entry))
            else:
                hosts.add(entry)
        object.__setattr__(self, "allow", entries)
        object.__setattr__(self, "networks", tuple(networks))
        object.__setattr__(self, "hosts", frozenset(hosts))

    def with_loopback(self) -> FetchPolicy:
        """This policy plus loopback (127.0.0.0/8, ::1): what ``--emulator`` runs use."""
        extra = tuple(e for e in LOOPBACK if e not in self.allow)
        return FetchPolicy(allow=(*self.allow, *extra), lookup=self.lookup)

    def host_allowed(self, host: str) -> bool:
        return _normal_host(host) in self.hosts

    def address_allowed(self, address: IPAddress) -> bool:
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            if address.scope_id:
                candidates.append(ipaddress.IPv6Address(str(address).split("%", 1)[0]))
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                candidates.append(embedded)
        return any(a.version == n.version and a in n for a in candidates for n in self.networks)

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Raise ``FetchBlockedError`` unless ``host`` may be reached at every one of
        ``addresses`` (one bad address refuses the host: that is how rebinding looks)."""
        if self.host_allowed(host):
            return
        found = False
        for text in addresses:
            found = True
            address = _parse_address(text)
            if address is None:
                raise FetchBlockedError(host, f"resolves to an unparsable address {text!r}")
            if self.address_allowed(address):
                continue
            reason = blocked_reason(address)
            if reason is not None:
                literal = _parse_address(host) is not None
                how = "is" if literal else f"resolves to {address}:"
                raise FetchBlockedError(host, f"{how} {reason} (not in fetch_allow)")
        if not found:
            raise FetchBlockedError(host, "resolves to no address")

    def check_url_host(self, host: str) -> None:
        """Check a URL's host as aiohttp will use it: addresses now, names at resolution."""
        if not host:
            raise FetchBlockedError("(none)", "is empty")
        if self.host_allowed(host):
            return
        address = _parse_address(host)
        if address is not None:
            self.check_addresses(host, [str(address)])
        elif is_ip_address(host):
            # aiohttp skips DNS for anything all-digits or with a colon and lets the OS parse
            # it (2130706433 is 127.0.0.1): we cannot vet what we cannot parse.
            raise FetchBlockedError(host, "is a numeric host that is not a plain IP address")


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that resolves, then refuses hosts with blocked addresses."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._inner: AbstractResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._policy.lookup is not None:
            results = [_result(host, text, port) for text in await self._policy.lookup(host, port)]
            if family in (socket.AF_INET, socket.AF_INET6):
                results = [r for r in results if r["family"] == family]
        else:
            if self._inner is None:
                self._inner = ThreadedResolver()
            results = await self._inner.resolve(host, port, family)
        if not results:  # as the system resolver reports an unknown name: a DNS failure
            raise OSError(f"no address for {host}")
        self._policy.check_addresses(host, [r["host"] for r in results])
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def _result(hostname: str, text: str, port: int) -> ResolveResult:
    address = _parse_address(text)
    family = socket.AF_INET6 if address is not None and address.version == 6 else socket.AF_INET
    return ResolveResult(
        hostname=hostname,
        host=text,
        port=port,
        family=family,
        proto=0,
        flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
    )


class _DeadlineStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, deadline: float, request: httpx.Request):
        self._inner = inner
        self._deadline = deadline
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout(
                    "response took longer than the total timeout", request=self._request
                )
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class GuardedTransport(httpx.AsyncBaseTransport):
    """Checks each request's host (every redirect hop) before ``inner`` connects."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        policy: FetchPolicy,
        *,
        total_timeout_s: float | None = DEFAULT_TOTAL_TIMEOUT_S,
    ) -> None:
        self._inner = inner
        self._policy = policy
        self._total_timeout_s = total_timeout_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(
                f"refusing a non-HTTP URL scheme {request.url.scheme!r}", request=request
            )
        started = time.monotonic()
        try:
            # The host exactly as aiohttp will parse it from the URL string.
            self._policy.check_url_host(yarl.URL(str(request.url)).raw_host or "")
            response = await self._inner.handle_async_request(request)
        except FetchBlockedError as exc:
            exc.request = request
            raise
        if self._total_timeout_s is not None and isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _DeadlineStream(
                response.stream, started + self._total_timeout_s, request
            )
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def inputs_http_client(
    policy: FetchPolicy,
    *,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    max_redirects: int = 5,
    total_timeout_s: float | None = DEFAULT_TOTAL_TIMEOUT_S,
    max_connections: int = 100,
) -> httpx.AsyncClient:
    """The client that fetches manifest images: guarded by ``policy`` on every hop, redirects
    bounded, TLS verified, no proxies from the environment."""
    inner = AiohttpTransport(
        limits=httpx.Limits(max_connections=max_connections),
        resolver=GuardedResolver(policy),
    )
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=True,
        max_redirects=max_redirects,
        transport=GuardedTransport(inner, policy, total_timeout_s=total_timeout_s),
        trust_env=False,  # an environment proxy would connect for us, past the guard
    )


def fetch_timeout(seconds: float) -> httpx.Timeout:
    """Read timeout ``seconds``; connecting gets at most 10 s of it."""
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


def inputs_client_for(allow: Iterable[str] = (), *, timeout_s: float = 30.0) -> httpx.AsyncClient:
    """``inputs_http_client`` from a run's ``fetch_allow`` and ``fetch_timeout_s``."""
    return inputs_http_client(FetchPolicy(allow=tuple(allow)), timeout=fetch_timeout(timeout_s))
