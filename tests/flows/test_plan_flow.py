"""The tryon-plan flow: the CLI's estimate, from the UI, as a table artifact and a result."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from emulator.server import EmulatorServer
from flows.batch import BatchParams, RunNotStarted
from flows.plan import PLAN_TABLE_KEY, tryon_plan
from tests.flows.test_batch import sample_rows, write_manifest

pytestmark = pytest.mark.e2e


async def test_the_plan_flow_publishes_its_lines_and_calls_nobody(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(4))
    result = await tryon_plan(
        BatchParams(
            manifest=str(manifest),
            lake=str(tmp_path / "lake"),
            prices={"changeclothes": 0.1, "hidream": 0.2},
            compare=["hidream"],
        )
    )
    assert result["calls"] == 8 and result["cost"] == pytest.approx(1.2)
    assert {(line["provider"], line["calls"]) for line in result["lines"]} == {
        ("changeclothes", 4),
        ("hidream", 4),
    }
    assert use_emulator.control.posts() == 0 and not (tmp_path / "lake").exists()
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PLAN_TABLE_KEY]))
        )
    assert artifacts and "8 calls" in (artifacts[-1].description or "")


async def test_a_plan_of_an_unusable_manifest_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(RunNotStarted, match=r"nope\.csv"):
        await tryon_plan(BatchParams(manifest=str(tmp_path / "nope.csv"), lake=str(tmp_path)))
