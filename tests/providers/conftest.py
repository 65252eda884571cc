"""Fixtures for provider contract tests: a real emulator, a real image host, real clients."""

from tests.contract import *  # noqa: F403  (the shared fixtures)
