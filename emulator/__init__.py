"""A local server speaking each provider's documented wire protocol, for tests and benchmarks.

Start it with ``EmulatorServer.start(EmulatorConfig(...))`` (background thread) or ``serve``
(foreground). Faults, stats and resets are under ``/_emulator/``, typed by ``EmulatorControl``
(``EmulatorServer.control`` for one started here). The keys it accepts: ``emulator.keys``.
"""

from emulator.app import build_app
from emulator.config import EmulatorConfig, FaultPlan
from emulator.control import AsyncEmulatorControl, EmulatorControl, EmulatorStats
from emulator.server import EmulatorServer, serve

__all__ = [
    "AsyncEmulatorControl",
    "EmulatorConfig",
    "EmulatorControl",
    "EmulatorServer",
    "EmulatorStats",
    "FaultPlan",
    "build_app",
    "serve",
]
