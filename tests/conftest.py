"""Suite-wide set-up: Prefect runs against a throw-away local server; nothing leaves loopback."""

from __future__ import annotations

import os

# Before Prefect is imported anywhere: telemetry races the first SQLite migrations.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
