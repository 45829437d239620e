"""benchmarks/decisions.py's priced part times decisions that evaluate the risk price (issue 24, goal 5)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import decisions


def test_the_priced_part_times_decisions_that_evaluate_the_risk_price() -> None:
    profile = decisions.profile_for(2, 8)
    times = decisions.priced_decision_times(profile, 16, 60)
    # below the overload gate: the risk price runs in most timed decisions, over measured residuals
    assert times["risk_priced_share"] > 0.5 and times["rho_median"] < 1.0
    assert times["risk_candidates_mean"] >= 2 and times["risk_jobs_mean"] > 0
    assert times["residual_samples"] >= 32
    assert "OVERLOAD" not in times["reasons"]
    assert times["cpu_p50_ms"] <= times["cpu_p99_ms"] <= times["cpu_max_ms"]
    assert times["wait_p50_ms"] <= times["wait_p99_ms"] <= times["wait_max_ms"]


def test_arrivals_over_the_devices_capacity_stop_at_the_overload_gate_before_the_risk_price() -> None:
    # as in the decisions part, whose queue is kept full: why the priced part runs below capacity
    profile = decisions.profile_for(2, 8)
    times = decisions.priced_decision_times(profile, 16, 30, load=3.0, headroom=4.0)
    assert "OVERLOAD" in times["reasons"] and times["rho_median"] >= 1.0
