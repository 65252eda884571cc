"""Each provider's side of the contract tests (``tests.contract.Site``): how its tests make a
client and a request against an emulator, and hand-made calls; and the checks every provider's
tests make. The provider test modules use their own site (fixtures ``ai``, ``hd``, ``tc`` in
conftest.py); test_every_provider.py runs the checks all of them share."""

from __future__ import annotations

import importlib
import json
import socket
import time
import traceback
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import pytest
from pydantic import SecretStr

from emulator.keys import accepted_key
from emulator.plugins import EmulatedProvider
from providers.ailab.client import AILabRefinerClient, AILabTryOnClient
from providers.base import PollPolicy, ProviderError, TryOnRequest
from providers.fal.client import FalClient, FalKolorsClient
from providers.fashn.client import FashnClient
from providers.hidream.client import HiDreamClient
from providers.tencent.client import TencentClient
from tests.contract import Cc, Emulated, FakeClock, ImageHost, Site, bearer
from tests.images import garment_jpeg, garment_request, person_jpeg


async def expect_error(call: Awaitable[object]) -> ProviderError:
    """The ``ProviderError`` that awaiting ``call`` raises (fails the test if none)."""
    with pytest.raises(ProviderError) as info:
        await call
    return info.value


def free_port() -> int:
    """A loopback port nothing listens on (a refused connection)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_secret_kept(
    secret: str, errors: Iterable[ProviderError], holders: Iterable[object]
) -> None:
    """No error, however rendered, and no client state shows ``secret``; no error carries a
    context or cause (an httpx error would carry the request and its headers)."""
    for error in errors:
        rendered = "".join(traceback.format_exception(error))
        for text in (str(error), repr(error), error.message, rendered, repr(error.args)):
            assert secret not in text
        assert error.__context__ is None and error.__cause__ is None
    for holder in holders:
        assert secret not in repr(holder)
        assert secret not in str(vars(holder))


# Polls soon and often: on the fake clock this costs nothing; on loopback, little.
FAST = PollPolicy(initial_s=0.02, max_interval_s=0.05, factor=1.5, deadline_s=10.0)


@dataclass
class Ai(Site):
    """AILabTools: the try-on and the refiner client, one account."""

    provider: ClassVar[str] = "ailab"
    key_env: ClassVar[str] = "AILAB_API_KEY"

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        options.setdefault("api_key", self.key)
        options.setdefault("base_url", self.base_url)
        options.setdefault("poll_policy", FAST)
        return options

    def client(self, **options: Any) -> AILabTryOnClient:
        return self.polling(AILabTryOnClient(http=self.http, **self._options(options)))

    def refiner(self, **options: Any) -> AILabRefinerClient:
        return self.polling(AILabRefinerClient(http=self.http, **self._options(options)))

    async def quick_jobs(self, **fields: Any) -> None:
        await self.faults(job_queued_s=0.0, job_running_s=0.05, **fields)


@dataclass
class Hd(Site):
    """HiDream: clients and hand-made JSON calls."""

    provider: ClassVar[str] = "hidream"
    key_env: ClassVar[str] = "HIDREAM_API_KEY"

    def client(self, **options: Any) -> HiDreamClient:
        options.setdefault("poll_policy", FAST)
        options.setdefault("api_key", self.key)
        options.setdefault("base_url", self.base_url)
        return self.polling(HiDreamClient(http=self.http, **options))

    async def raw(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        authorization: str | None = "default",
    ) -> httpx.Response:
        """A hand-made request, for what the client would never send."""
        headers = bearer(self.key, authorization)
        if content is not None:
            headers["Content-Type"] = "text/plain"
        url = self.base_url + path
        return await self.http.request(
            method, url, json=body, content=content, params=params, headers=headers
        )


@dataclass
class Tc(Site):
    """Tencent: it takes image URLs only, so requests put their images on ``image_host``."""

    provider: ClassVar[str] = "tencent"
    secret_id: ClassVar[str] = accepted_key("TENCENTCLOUD_SECRET_ID")
    secret_key: ClassVar[str] = accepted_key("TENCENTCLOUD_SECRET_KEY")
    person: ClassVar[bytes] = person_jpeg(size=(600, 800))  # 3:4, inside Tencent's (512, 3000)
    garment: ClassVar[bytes] = garment_jpeg(size=(600, 600))

    @property
    def host(self) -> str:
        """The emulator's host as a client signs it (with the port when there is one)."""
        return httpx.URL(self.base_url).netloc.decode()

    def client(
        self, *, secret_id: str | None = None, secret_key: str | None = None, **options: Any
    ) -> TencentClient:
        """Signing with this site's secrets unless given."""
        options.setdefault("base_url", self.base_url)
        return TencentClient(
            http=self.http,
            secret_id=SecretStr(self.secret_id if secret_id is None else secret_id),
            secret_key=SecretStr(self.secret_key if secret_key is None else secret_key),
            **options,
        )

    def request(
        self,
        person: bytes | None = None,
        garment: bytes | None = None,
        category: str = "upper_body",
        *,
        name: str = "row",
    ) -> TryOnRequest:
        """A request whose images are on the image host; this site's person and garment
        unless given."""
        person = self.person if person is None else person
        garment = self.garment if garment is None else garment
        return self.image_host.request(person, garment, category, name=name)

    async def raw_post(
        self,
        body: dict[str, Any],
        *,
        timestamp: int | None = None,
        drop: tuple[str, ...] = (),
        override: dict[str, str] | None = None,
        signed_host: str | None = None,
    ) -> dict[str, Any]:
        """A hand-made call (what our client never sends), signed as our client signs, for
        ``signed_host`` if given; returns ``Response``."""
        payload = json.dumps(body).encode()
        signer = self.client(base_url=f"http://{signed_host}" if signed_host else self.base_url)
        ts = int(time.time()) if timestamp is None else timestamp
        headers = {**signer.signed_headers(payload, timestamp=ts), "Host": self.host}
        for name in drop:
            del headers[name]
        headers.update(override or {})
        response = await self.http.post(f"{self.base_url}/", content=payload, headers=headers)
        assert response.status_code == 200  # Tencent answers errors with HTTP 200 too
        assert response.headers["content-type"] == "application/json"  # what the SDK requires
        result: dict[str, Any] = response.json()["Response"]
        assert result["RequestId"]
        return result


# FASHN allows 50 /status calls per 10 s: poll at most 4 times a second (free on the fake clock).
FASHN_FAST = PollPolicy(initial_s=0.25, max_interval_s=0.5, factor=1.5, deadline_s=30.0)


@dataclass
class Fa(Site):
    """FASHN: clients and hand-made JSON calls (a provider registered by entry points only:
    see ``installed``)."""

    provider: ClassVar[str] = "fashn"
    key_env: ClassVar[str] = "FASHN_API_KEY"

    def client(self, **options: Any) -> FashnClient:
        options.setdefault("poll_policy", FASHN_FAST)
        options.setdefault("api_key", self.key)
        options.setdefault("base_url", self.base_url)
        return self.polling(FashnClient(http=self.http, **options))

    async def raw(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content: bytes | None = None,
        authorization: str | None = "default",
    ) -> httpx.Response:
        """A hand-made request, for what the client would never send."""
        headers = bearer(self.key, authorization)
        if content is not None:
            headers["Content-Type"] = "text/plain"
        return await self.http.request(
            method, self.base_url + path, json=body, content=content, headers=headers
        )


# Providers this repository ships as plugins (entry points in pyproject.toml, no line in the
# registries): name -> (its ``ProviderSpec``, its ``EmulatedProvider``), as the entry points
# name them.
PLUGINS: dict[str, tuple[str, str]] = {
    "fashn": ("providers.fashn:SPEC", "emulator.fashn:EMULATED"),
    "fal": ("providers.fal:SPEC", "emulator.fal:EMULATED"),
    "fal_kolors": ("providers.fal:KOLORS_SPEC", ""),  # served by fal's emulator module
}


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@contextmanager
def installed(name: str) -> Iterator[None]:
    """The plugin ``name`` registered in this process as its installed entry points would
    register it (provider spec, emulator routes, the emulator's default key), and unregistered
    after; nothing to do where the distribution's metadata already has them."""
    from emulator import app, keys
    from providers import registry

    if name in registry.PROVIDERS:
        yield
        return
    spec_path, emulated_path = PLUGINS[name]
    spec = _load(spec_path)
    emulated = _load(emulated_path) if emulated_path else None
    added_keys = [
        k for k in (emulated.default_keys if emulated else {}) if k not in keys.DEFAULT_KEYS
    ]
    registry.PROVIDERS[name] = spec
    if emulated is not None:
        app.PROVIDER_ROUTES[name] = emulated.routes
        keys.PLUGINS[name] = emulated
        for env_name in added_keys:
            keys.DEFAULT_KEYS[env_name] = emulated.default_keys[env_name]
    try:
        yield
    finally:
        registry.PROVIDERS.pop(name, None)
        if emulated is not None:
            app.PROVIDER_ROUTES.pop(name, None)
            keys.PLUGINS.pop(name, None)
        for env_name in added_keys:
            keys.DEFAULT_KEYS.pop(env_name, None)


@contextmanager
def plugins_installed() -> Iterator[None]:
    """Every plugin of ``PLUGINS`` registered (see ``installed``)."""
    with ExitStack() as stack:
        for name in PLUGINS:
            stack.enter_context(installed(name))
        yield


@contextmanager
def plugin_served(emulated: EmulatedProvider) -> Iterator[None]:
    """Within: every emulator built serves ``emulated`` and accepts its default keys, as once
    its distribution's entry points are installed (nothing changes if they are): a provider
    registered only by entry points is tested before the environment is reinstalled."""
    from emulator import app, keys

    with pytest.MonkeyPatch.context() as patch:
        if emulated.name not in app.PROVIDER_ROUTES:
            patch.setitem(app.PROVIDER_ROUTES, emulated.name, emulated.routes)
        for name, value in emulated.default_keys.items():
            if name not in keys.DEFAULT_KEYS:
                patch.setitem(keys.DEFAULT_KEYS, name, value)
        yield


# Polls at most 4 times a (fake) second: within fal's rate, at no cost on the fake clock.
FAL_POLL = PollPolicy(initial_s=0.25, max_interval_s=0.5, factor=1.5, deadline_s=60.0)


@dataclass
class Fal(Site):
    """The fal queue: one account, a client per model (FASHN v1.6 by default)."""

    provider: ClassVar[str] = "fal"
    key_env: ClassVar[str] = "FAL_KEY"

    def client(self, **options: Any) -> FalClient:
        options.setdefault("api_key", self.key)
        options.setdefault("base_url", self.base_url)
        options.setdefault("poll_policy", FAL_POLL)
        return self.polling(FalClient(http=self.http, **options))

    def kolors(self, **options: Any) -> FalKolorsClient:
        options.setdefault("api_key", self.key)
        options.setdefault("base_url", self.base_url)
        options.setdefault("poll_policy", FAL_POLL)
        return self.polling(FalKolorsClient(http=self.http, **options))

    async def raw(
        self, method: str, path: str, *, body: Any = None, authorization: str | None = "default"
    ) -> httpx.Response:
        """A hand-made call (what the client never sends): ``authorization`` as given, or
        ``Key <key>`` ("default"), or none (None)."""
        if authorization == "default":
            authorization = f"Key {self.key.get_secret_value()}"
        headers = {} if authorization is None else {"Authorization": authorization}
        return await self.http.request(method, self.base_url + path, json=body, headers=headers)


KINDS: dict[str, type[Cc | Ai | Hd | Tc | Fa | Fal]] = {
    kind.provider: kind for kind in (Cc, Ai, Hd, Tc, Fa, Fal)
}


def site(
    provider: str,
    http: httpx.AsyncClient,
    emulator: Emulated,
    clock: FakeClock | None,
    image_host: ImageHost,
) -> Cc | Ai | Hd | Tc | Fa | Fal:
    """``provider``'s site on ``emulator`` (``clock`` None: real time, as on loopback)."""
    return KINDS[provider](http, emulator, clock, image_host)


def standard_request(site: Site, person: bytes, garment: bytes) -> TryOnRequest:
    """One person in one upper-body garment, as ``site``'s provider takes it."""
    if isinstance(site, Tc):
        return site.request(name="standard")
    return garment_request(person, garment)
