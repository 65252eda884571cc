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


def test_bad_outputs_take_a_comma_separated_list_or_json() -> None:
    plans = faults_from_options(
        [
            "all.bad_outputs=blank,unchanged",
            'ailab.bad_outputs=["corrupt"]',
            "hidream.bad_output_rate=0.2",
            "hidream.bad_output=wide",
        ],
        providers=PROVIDERS,
    )
    assert plans["tencent"].bad_outputs == ["blank", "unchanged"]
    assert plans["ailab"].bad_outputs == ["corrupt"]
    assert (plans["hidream"].bad_output_rate, plans["hidream"].bad_output) == (0.2, "wide")
    assert plans["changeclothes"].bad_output_rate == 0.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope.latency_s=1", "unknown provider 'nope'"),
        ("hidream.colour=1", "unknown field 'colour'"),
        ("hidream", "expected PROVIDER.FIELD=VALUE"),
        ("hidream.error_rate_5xx=2", "less than or equal to 1"),
        ("ailab.bad_outputs=blank,grey", "'blank', 'unchanged', 'tiny', 'wide' or 'corrupt'"),
        ("ailab.bad_output=grey", "'blank', 'unchanged', 'tiny', 'wide' or 'corrupt'"),
    ],
)
def test_bad_fault_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        faults_from_options([spec], providers=PROVIDERS)
