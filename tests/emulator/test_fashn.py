"""The emulator's FASHN routes on their own: found through the entry point, served beside the
built-ins (in-process on the fake clock, and on loopback), the credits endpoint's window, fast
mode, and the fault options. The client's view of them: tests/providers/test_fashn.py."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from emulator import EmulatorConfig, EmulatorServer, FaultPlan
from emulator import fashn as emulated
from emulator.config import faults_from_options
from tests.contract import Emulators
from tests.images import garment_jpeg, person_jpeg
from tests.providers.sites import installed

REPO = Path(__file__).resolve().parents[2]
KEY = {"Authorization": f"Bearer {emulated.DEFAULT_KEY}"}


@pytest.fixture(autouse=True, scope="module")
def _installed() -> Iterator[None]:
    with installed("fashn"):
        yield


def uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def body(person: bytes, garment: bytes) -> dict[str, object]:
    inputs = {"model_image": uri(person), "garment_image": uri(garment), "category": "tops"}
    return {"model_name": "tryon-v1.6", "inputs": inputs}


def test_the_entry_points_register_the_provider_and_its_emulator(tmp_path: Path) -> None:
    """What a fresh install of this project does: pyproject.toml's entry points, read back by
    the registries in a new process (no in-process registration)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = tmp_path / "fashn_entry_points-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fashn-entry-points\nVersion: 0\n")
    lines = []
    for group in ("tryon_flows.providers", "tryon_flows.emulator"):
        lines += [f"[{group}]", f"fashn = {project['entry-points'][group]['fashn']}", ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    code = (
        "from providers.registry import PROVIDERS; from emulator.app import PROVIDER_ROUTES;"
        "from emulator.keys import DEFAULT_KEYS;"
        "print(PROVIDERS['fashn'].client_class().__name__, 'fashn' in PROVIDER_ROUTES,"
        " DEFAULT_KEYS['FASHN_API_KEY'])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["FashnClient", "True", emulated.DEFAULT_KEY]


def test_fault_options_name_fashn() -> None:
    plans = faults_from_options(
        ["fashn.credits=5", 'fashn.forced_codes=["failed:PoseError"]'],
        providers=["hidream", "fashn"],
    )
    assert plans["fashn"].credits == 5 and plans["fashn"].forced_codes == ["failed:PoseError"]


async def test_the_credits_endpoint_has_its_own_window_and_takes_no_fault(
    emulators: Emulators,
) -> None:
    config = EmulatorConfig(faults={"fashn": FaultPlan(credits=7, forced_codes=["OutOfCredits"])})
    on = emulators.start(config)
    url = on.base_url + emulated.CREDITS_PATH
    for _ in range(30):
        answer = await emulators.http.get(url, headers=KEY)
        assert answer.json() == {"credits": {"total": 7, "subscription": 0, "on_demand": 7}}
    limited = await emulators.http.get(url, headers=KEY)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "10"
    await emulators.clock.sleep(10.0)
    assert (await emulators.http.get(url, headers=KEY)).status_code == 200
    # The forced code still waits for a /run.
    assert (await on.control.faults())["fashn"].forced_codes == ["OutOfCredits"]


async def test_fast_mode_checks_signatures_only(emulators: Emulators) -> None:
    on = emulators.start(
        EmulatorConfig(fast_mode=True, faults={"fashn": FaultPlan(job_queued_s=0)})
    )
    big = person_jpeg(size=(1400, 2100))  # over 2000 px: not looked at in fast mode
    for person, status in ((big, "completed"), (b"not an image at all", "failed")):
        run = await emulators.http.post(
            on.base_url + emulated.RUN_PATH, json=body(person, garment_jpeg()), headers=KEY
        )
        assert run.status_code == 200
        await emulators.clock.sleep(1.0)
        path = emulated.STATUS_PATH.format(prediction_id=run.json()["id"])
        answer = (await emulators.http.get(on.base_url + path, headers=KEY)).json()
        assert answer["status"] == status, answer
    assert answer["error"]["name"] == "ImageLoadError"


def test_on_loopback_beside_the_built_ins() -> None:
    with EmulatorServer.start(
        EmulatorConfig(faults={"fashn": FaultPlan(job_queued_s=0)})
    ) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            run = http.post(
                emulated.RUN_PATH, json=body(person_jpeg(), garment_jpeg()), headers=KEY
            )
            assert run.status_code == 200, run.text
            assert run.headers["x-request-id"]  # stamped like every route's
        stats = server.control.stats()
        assert stats.provider("fashn").succeeded == 1
        assert server.control.posts("POST /v1/run") == 1
        assert "hidream" in server.control.faults() and "fashn" in server.control.faults()
