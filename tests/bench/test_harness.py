"""The bench harness's plumbing: --only, --merge, verdicts over partial results (no scenario
is run: the registry gets a stand-in)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import run


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``prep`` replaced by an instant scenario that needs no emulator nor server."""
    scenarios = dict(run.SCENARIOS)
    scenarios["prep"] = run.Scenario(
        lambda ctx, emulator, server: {
            "speedup_vs_naive": 4.5,
            "ssim_min": 0.99,
            "by_profile": {"a": {"speedup_median": 2.6}, "b": {"speedup_median": 3.1}},
        },
        services=False,
    )
    monkeypatch.setattr(run, "SCENARIOS", scenarios)
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    yield
    signal.signal(signal.SIGTERM, handler)


def test_verdicts_cover_only_the_scenarios_present() -> None:
    assert run.verdicts({}) == {}
    assert run.verdicts({"slow": {"ratio_vs_plain": 0.981}}) == {"slow": True}
    quick_memory = {"growth_ratio": 1.2, "rows_ratio": 10.0, "quick_peak_rss_mb_2000": 300.0}
    assert run.verdicts({"memory": quick_memory}) == {"memory_not_proportional": True}
    one_slow_profile = {"ssim_min": 0.98, "by_profile": {"a": {"speedup_median": 2.49}}}
    assert run.verdicts({"prep": one_slow_profile}) == {"prep_speedup": False, "prep_ssim": True}
    rerun = {"cpu_ratio_vs_first": 0.04, "checks": ["rerun decoded 1 images"]}
    assert run.verdicts({"rerun": rerun}) == {"rerun_cpu": True, "rerun_nothing_redone": False}


def test_only_and_the_skip_flags_select_in_registry_order() -> None:
    parser_args = {"only": "slow,fast", "skip_prep": False, "profile": True}
    assert run.select(type("A", (), parser_args)()) == ["fast", "slow"]
    everything = type("A", (), {"only": None, "skip_prep": True, "profile": False})()
    assert run.select(everything)[:3] == ["fast", "slow", "memory"]
    with pytest.raises(SystemExit):
        run.select(type("A", (), {**parser_args, "only": "slo"})())


def test_merge_replaces_only_the_scenarios_run(stand_in: None, tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    legacy = {  # the layout before per-scenario dates: the profile inside fast
        "date_utc": "2026-12-01T00:00:00Z",
        "quick": False,
        "git": {"at_start": {"commit": "abc1234"}},
        "prep": {"speedup_vs_naive": 3.0, "ssim_min": 0.98, "by_profile": {}},
        "slow": {"ratio_vs_plain": 0.99},
        "fast": {
            "ratio_vs_plain": 0.95,
            "cpu_ratio_vs_plain": 1.5,
            "plain": {"rows_per_s": 60.0, "cpu_ms_per_row": 3.0},
            "profile": {
                "ladder": {"client": {"rows_per_s": 30.0, "cpu_ms_per_row": 6.0}},
                "what_if_inline_io": {"rows_per_s": 60.0, "cpu_ms_per_row": 3.0},
            },
        },
        "verdicts": {"stale": True},
    }
    out.write_text(json.dumps(legacy))
    assert run.main(["--only", "prep", "--merge", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["prep"]["speedup_vs_naive"] == 4.5
    assert merged["prep"]["measured_at"]["commit"] != "abc1234"
    assert merged["slow"] == {
        "ratio_vs_plain": 0.99,
        "measured_at": {"date": "2026-12-01T00:00:00Z", "commit": "abc1234"},
    }
    assert "profile" not in merged["fast"]
    assert merged["profile"]["ladder"]["client"]["ratio_vs_plain"] == 0.5
    assert merged["scenarios_run"] == ["prep"]
    assert merged["verdicts"] == {
        "fast_throughput": True,
        "fast_cpu": True,
        "slow": True,
        "prep_speedup": True,
        "prep_ssim": True,
    }


def test_merge_refuses_to_mix_quick_and_full_figures(stand_in: None, tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    out.write_text(json.dumps({"quick": False}))
    with pytest.raises(SystemExit):
        run.main(["--quick", "--only", "prep", "--merge", "--out", str(out)])
