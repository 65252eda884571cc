"""What the provider contract tests and the emulator's own tests share: the emulator
(in-process, or on loopback where sockets are what is tested) with its control, a fake clock,
a real image host, real clients (drawn images: tests/images.py).

Most tests talk to an emulator app in this process: ``http`` hands requests for
``*.emulator.test`` to it through ``httpx.ASGITransport`` and every other host (the image
host, a notify receiver, a refused port) to the network as usual. The apps and the polling
clients run on one ``FakeClock``, so job lifecycles and result lifetimes pass without waiting.
``loopback`` is a real server (``EmulatorServer``) for what the in-process transport cannot
show: client timeouts (it ignores them), connections, other HTTP stacks (the official SDK).

tests/providers/conftest.py and tests/emulator/conftest.py import the fixtures (``__all__``):
pytest finds fixtures among a conftest's names.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from emulator import AsyncEmulatorControl, EmulatorConfig, EmulatorServer, build_app
from emulator.keys import accepted_key
from emulator.state import EmulatorState
from emulator.stats import ProviderStats
from providers.base import TryOnRequest
from providers.changeclothes.client import ChangeClothesClient
from tests.images import garment_jpeg, person_jpeg, prepared

# The fixtures, for the conftests' star import (helpers are imported by name).
__all__ = [
    "_fresh_emulator_server",
    "api_key",
    "cc",
    "cc_loopback",
    "client",
    "clock",
    "control",
    "emulator",
    "emulator_server",
    "emulators",
    "garment",
    "http",
    "image_host",
    "loopback",
    "person",
    "raw_post",
]

TRIAL_KEY = "trial-key-for-tests"
TRIAL_LIMIT = 2
DELETED_KEY = "key-of-a-deleted-user"
# What every contract test's emulator is configured with (accounts the tests need).
CONTRACT_CONFIG = EmulatorConfig(
    seed=7, deleted_user_keys=[DELETED_KEY], trial_keys={TRIAL_KEY: TRIAL_LIMIT}
)
EMULATOR_HOST = "emulator.test"  # in-process apps: this host, then N.emulator.test


@pytest.fixture(scope="session")
def person() -> bytes:
    return person_jpeg()


@pytest.fixture(scope="session")
def garment() -> bytes:
    return garment_jpeg()


# -- the clock -------------------------------------------------------------------------------


class FakeClock:
    """Time that moves only when something sleeps on it: the in-process emulators' jobs,
    result lifetimes and call log, and the polling clients, share one, so a job's minutes
    pass at once. ``now``/``sleep`` fit ``build_app(clock=, sleep=)`` and
    ``providers.base.Clock``."""

    # As a real sleep ends a little after the time asked: no float rounding can leave a
    # deadline a hair short of being reached.
    OVERSHOOT_S = 1e-6

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` (never back), then let the other tasks run once."""
        self._now += max(0.0, seconds) + self.OVERSHOOT_S
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- the emulator: in-process apps, and one on loopback --------------------------------------


@dataclass
class Emulated:
    """An emulator the tests talk to through ``http``: its URL, control and live state."""

    base_url: str
    control: AsyncEmulatorControl
    state: EmulatorState


class _InProcessApps(httpx.AsyncBaseTransport):
    """Hands each request to the in-process app registered for its host."""

    def __init__(self) -> None:
        self.apps: dict[str, httpx.ASGITransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.apps.get(request.url.host)
        if transport is None:
            raise httpx.ConnectError(f"no emulator app at {request.url.host}", request=request)
        return await transport.handle_async_request(request)


class Emulators:
    """In-process emulator apps on one fake clock, all reached through ``http`` (which sends
    other hosts to the network)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._apps = _InProcessApps()
        self.http = httpx.AsyncClient(mounts={f"all://*{EMULATOR_HOST}": self._apps})
        self._states: list[EmulatorState] = []

    def start(self, config: EmulatorConfig = CONTRACT_CONFIG) -> Emulated:
        """A fresh app (state, stats, faults) for ``config``, on this test's clock."""
        n = len(self._states)
        host = EMULATOR_HOST if n == 0 else f"{n + 1}.{EMULATOR_HOST}"
        app: Starlette = build_app(config, clock=self.clock.now, sleep=self.clock.sleep)
        self._apps.apps[host] = httpx.ASGITransport(app=app)
        state: EmulatorState = app.state.emulator
        self._states.append(state)
        base_url = f"http://{host}"
        return Emulated(base_url, AsyncEmulatorControl(base_url, http=self.http), state)

    async def aclose(self) -> None:
        for state in self._states:
            await state.aclose()
        await self.http.aclose()


@pytest.fixture
async def emulators(clock: FakeClock) -> AsyncIterator[Emulators]:
    """Apps are built per test (a fraction of a millisecond): their asyncio state and their
    own HTTP client belong to the test's event loop."""
    apps = Emulators(clock)
    yield apps
    await apps.aclose()


@pytest.fixture
def emulator(emulators: Emulators) -> Emulated:
    """The contract tests' emulator, in-process, fresh for each test."""
    return emulators.start()


@pytest.fixture
def http(emulators: Emulators) -> httpx.AsyncClient:
    return emulators.http


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[EmulatorServer]:
    with EmulatorServer.start(CONTRACT_CONFIG) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_emulator_server(request: pytest.FixtureRequest) -> None:
    """Each test on the loopback server starts with zero stats, the configured faults and
    fresh account counters."""
    if "emulator_server" in request.fixturenames:
        server: EmulatorServer = request.getfixturevalue("emulator_server")
        server.control.reset(faults=True)


@pytest.fixture
def loopback(emulator_server: EmulatorServer, http: httpx.AsyncClient) -> Emulated:
    """The contract tests' emulator on a real socket (for timeouts, hang-ups, other HTTP
    stacks); real time, one server per test module."""
    control = AsyncEmulatorControl(emulator_server.base_url, http=http)
    return Emulated(emulator_server.base_url, control, emulator_server.state)


C = TypeVar("C")


@dataclass
class Site:
    """One provider's side of the contract tests: ``http``, the emulator it talks to (``key``:
    a credential it accepts), the clock its clients poll on (None on loopback: real time) and
    the image host. Each provider's tests subclass it with their clients and requests."""

    provider: ClassVar[str]
    key_env: ClassVar[str] = ""  # the clients' credential variable, where there is one

    http: httpx.AsyncClient
    emulator: Emulated
    clock: FakeClock | None
    image_host: ImageHost
    base_url: str = field(init=False)
    control: AsyncEmulatorControl = field(init=False)
    key: SecretStr = field(init=False)

    def __post_init__(self) -> None:
        self.base_url, self.control = self.emulator.base_url, self.emulator.control
        self.key = SecretStr(accepted_key(self.key_env) if self.key_env else "")

    async def faults(self, **fields: Any) -> None:
        await self.control.set_faults(self.provider, **fields)

    async def provider_stats(self) -> ProviderStats:
        return (await self.control.stats()).provider(self.provider)

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass on the emulator's clock."""
        await (self.clock.sleep(seconds) if self.clock else asyncio.sleep(seconds))

    def polling(self, client: C) -> C:
        """``client``, polling on this site's clock."""
        if self.clock is not None:
            client.poll_clock = self.clock  # type: ignore[attr-defined]
        return client


S = TypeVar("S", bound=Site)


def site_fixture(kind: type[S], name: str) -> Any:
    """A fixture ``name``: ``kind`` on the test's in-process emulator, on its fake clock."""

    def on_emulator(
        http: httpx.AsyncClient, emulator: Emulated, clock: FakeClock, image_host: ImageHost
    ) -> S:
        return kind(http, emulator, clock, image_host)

    return pytest.fixture(on_emulator, name=name)


# -- ChangeClothesAI, the provider the emulator's own tests drive ---------------------------


@dataclass
class Cc(Site):
    """ChangeClothesAI on an emulator: clients, requests, hand-made calls."""

    provider: ClassVar[str] = "changeclothes"
    key_env: ClassVar[str] = "CHANGECLOTHES_API_KEY"

    def client(self, **options: Any) -> ChangeClothesClient:
        options.setdefault("api_key", self.key)
        options.setdefault("base_url", self.base_url)
        return ChangeClothesClient(http=self.http, **options)

    async def raw_post(
        self,
        path: str,
        fields: dict[str, str | tuple[str, bytes, str]],
        *,
        authorization: str | None = "default",
    ) -> httpx.Response:
        """A hand-made request, for what the client would never send (no/odd auth, bad
        fields): ``authorization`` as in ``bearer``."""
        headers = bearer(self.key, authorization)
        files = [(k, (None, v) if isinstance(v, str) else v) for k, v in fields.items()]
        return await self.http.post(self.base_url + path, files=files, headers=headers)


def garment_fields(person: bytes, garment: bytes, **extra: str) -> dict[str, Any]:
    """The garment endpoint's form, as ``Cc.raw_post`` sends it (``extra`` changes fields)."""
    return {
        "modelImg": ("p.jpg", person, "image/jpeg"),
        "garmentImg": ("g.jpg", garment, "image/jpeg"),
        "category": "upper_body",
        **extra,
    }


cc = site_fixture(Cc, "cc")


@pytest.fixture
def cc_loopback(http: httpx.AsyncClient, loopback: Emulated, image_host: ImageHost) -> Cc:
    return Cc(http, loopback, None, image_host)


def bearer(key: SecretStr, authorization: str | None = "default") -> dict[str, str]:
    """A hand-made call's auth header: ``Bearer <key>`` ("default"), none (None), or as given."""
    if authorization == "default":
        return {"Authorization": f"Bearer {key.get_secret_value()}"}
    return {} if authorization is None else {"Authorization": authorization}


@pytest.fixture
def api_key() -> SecretStr:
    return SecretStr(accepted_key(Cc.key_env))


@pytest.fixture
def client(cc: Cc) -> ChangeClothesClient:
    return cc.client()


@pytest.fixture
def control(emulator: Emulated) -> AsyncEmulatorControl:
    return emulator.control


RawPost = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
def raw_post(cc: Cc) -> RawPost:
    return cc.raw_post


# -- an image host ---------------------------------------------------------------------------


@dataclass
class ImageHost:
    """A plain HTTP server on loopback serving registered bytes (stands in for the lake)."""

    base_url: str = ""
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def add(self, name: str, data: bytes, mime: str = "image/jpeg") -> str:
        self.files[f"/{name}"] = (data, mime)
        return f"{self.base_url}/{name}"

    def request(
        self,
        person: bytes,
        garment: bytes,
        category: str = "upper_body",
        *,
        name: str = "row",
        person_url: str | None = None,
    ) -> TryOnRequest:
        """A request whose images are served here under ``name/`` (as the flow's staging
        would put them); ``person_url`` instead of the person's, e.g. one that is missing."""
        return TryOnRequest(
            row_id=name,
            person=prepared(person, url=person_url or self.add(f"{name}/person.jpg", person)),
            garment=prepared(garment, url=self.add(f"{name}/garment.jpg", garment)),
            category=category,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host.hits[self.path] += 1
            found = host.files.get(self.path)
            if found is None:
                self.send_error(404)
                return
            data, mime = found
            self.send_response(200)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    with serving(Handler) as base_url:
        host.base_url = base_url
        yield host


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` on a free loopback port, on its own thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
