"""Fixtures for provider contract tests: the emulator (in-process, or on loopback), a real
image host, real clients; ``ai``, ``hd``, ``tc``: each provider's ``Site`` on the in-process
emulator (``cc`` comes with the shared fixtures)."""

from tests.contract import *  # noqa: F403  (the shared fixtures)
from tests.contract import site_fixture
from tests.providers.sites import Ai, Hd, Tc

ai = site_fixture(Ai, "ai")
hd = site_fixture(Hd, "hd")
tc = site_fixture(Tc, "tc")
