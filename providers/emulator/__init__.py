"""A local server speaking each provider's documented wire protocol, for tests and benchmarks.

Start it with ``EmulatorServer.start(EmulatorConfig(...))`` (background thread) or ``serve``
(foreground). Faults, stats and resets are under ``/_emulator/``.
"""

from providers.emulator.app import build_app
from providers.emulator.config import EmulatorConfig, FaultPlan
from providers.emulator.server import EmulatorServer, serve

__all__ = ["EmulatorConfig", "EmulatorServer", "FaultPlan", "build_app", "serve"]
