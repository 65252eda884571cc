"""Fixtures for the emulator's own tests: a real emulator, driven by a real client."""

from tests.contract import *  # noqa: F403  (the shared fixtures)
