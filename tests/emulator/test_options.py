"""`tryon emulator --fault ...` parsing into fault plans."""

from __future__ import annotations

import pytest

from emulator.config import faults_from_options

PROVIDERS = ["changeclothes", "tencent", "hidream", "ailab"]


def test_fault_specs_become_typed_plans() -> None:
    plans = faults_from_options(
        [
            "hidream.error_rate_5xx=0.1",
            "changeclothes.forced_codes=[10005, 500]",
            "ailab.credits=3",
            "all.retry_after_s=2",
        ],
        providers=PROVIDERS,
        latency_s=0.25,
    )
    assert plans["hidream"].error_rate_5xx == 0.1
    assert plans["changeclothes"].forced_codes == [10005, 500]
    assert plans["ailab"].credits == 3
    assert {p.retry_after_s for p in plans.values()} == {2}
    assert {p.latency_s for p in plans.values()} == {0.25}
    assert set(plans) == set(PROVIDERS)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope.latency_s=1", "unknown provider 'nope'"),
        ("hidream.colour=1", "unknown field 'colour'"),
        ("hidream", "expected PROVIDER.FIELD=VALUE"),
        ("hidream.error_rate_5xx=2", "less than or equal to 1"),
    ],
)
def test_bad_fault_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        faults_from_options([spec], providers=PROVIDERS)
