"""The built-in specs: one package per provider, its settings shared by its spec and client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from providers.registry import BUILT_IN, REFINER, ProviderSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", [*BUILT_IN.values(), REFINER], ids=lambda spec: spec.name)
def test_a_spec_and_its_client_name_the_same_provider(spec: ProviderSpec) -> None:
    client = spec.client_class()
    assert client.name == spec.name
    assert spec.client_path.startswith(f"providers.{spec.name.split('_')[0]}.client:")
    assert spec.default_base_url.startswith("https://") and spec.credential_env


@pytest.mark.parametrize("spec", BUILT_IN.values(), ids=lambda spec: spec.name)
def test_a_spec_carries_its_clients_capabilities(spec: ProviderSpec) -> None:
    assert spec.client_class().capabilities is spec.capabilities


def test_planning_a_run_imports_no_client() -> None:
    code = (
        "import sys, tasks.plan; "
        "print(sorted(m for m in sys.modules if m.startswith('providers.') and 'client' in m))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
