"""A normal run on Prefect's temporary server ends cleanly: no tracebacks or shutdown noise.

Prefect's ephemeral mode starts a local server for the run and stops it at exit; its event
and log workers must drain before that, or the run ends with "Error flushing events",
cancelled consumers or "Service 'EventsWorker' failed" lines under an otherwise good result.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flows.conftest import REPO, SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e

NOISE = re.compile(
    r"Traceback|Error flushing|CancelledError|EventsWorker|failed with \d+ pending|"
    r"Exception in|Task was destroyed|Unclosed|never retrieved|\| ERROR",
)


def test_demo_on_a_temporary_server_ends_cleanly(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE_MANIFEST.parent, tmp_path / "sample")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRYON_", "AWS_"))}
    env.pop("CHANGECLOTHES_API_KEY", None)
    # No PREFECT_API_URL: the CLI starts (and stops) Prefect's temporary server, as `make demo`.
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "sample/manifest.csv", "--emulator"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output  # one sample row is invalid on purpose
    assert "Starting temporary server" in output  # really the ephemeral mode
    assert "8 succeeded / 0 failed / 1 invalid of 9 rows" in done.stdout
    assert "Stopping temporary server" in output
    noise = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise)
