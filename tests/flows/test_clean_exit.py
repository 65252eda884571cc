"""A normal run on the local Prefect server ends cleanly: no tracebacks or shutdown noise.

Without ``PREFECT_API_URL`` the CLI starts the local Prefect server (as `make demo` does on a
fresh machine); its event and log workers must drain before the command exits, or the run ends
with "Error flushing events", cancelled consumers or "Service 'EventsWorker' failed" lines
under an otherwise good result. Prefect's own hints (the "dedicated server" one, the
usage-data banner) stay out of it too, and the output ends with the run's page in the UI.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.flows.conftest import SAMPLE_MANIFEST
from tests.local_server import local_home

pytestmark = pytest.mark.e2e

NOISE = re.compile(
    r"Traceback|Error flushing|CancelledError|EventsWorker|failed with \d+ pending|"
    r"Exception in|Task was destroyed|Unclosed|never retrieved|\| ERROR|"
    r"dedicated Prefect server|usage data",
)


def test_demo_on_the_local_server_ends_cleanly(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE_MANIFEST.parent, tmp_path / "sample")
    with local_home(tmp_path / "prefect-home") as local:
        done = local.tryon("run", "sample/manifest.csv", "--emulator", cwd=tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 1, output  # one sample row is invalid on purpose
        assert "Starting the local Prefect server" in output  # really started here
        server = local.state()
        assert server is not None
    assert "8 succeeded / 0 failed / 1 invalid of 9 rows" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"Prefect UI: {server.url}/runs/flow-run/"), done.stdout
    noise = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise)
