"""What the benchmark scripts share: each policy's configuration, trace lengths, capacity, spread."""

from __future__ import annotations

import math
import statistics
from typing import Any

from conditions import Conditions, rate_per_s
from paper_policy import paper_policy

import mosel

__all__ = ["capacity", "config_for", "spread", "trace_seconds", "violation"]


def config_for(policy: str, conditions: Conditions, **knobs: Any) -> mosel.SchedulerConfig:
    """The scheduler configuration of ``policy`` under ``conditions``."""
    if policy in ("paper", "paper_fixed"):
        cls = paper_policy(
            defect=policy == "paper", tolerance_ms=conditions.tolerance_ms, deadline_includes_tolerance=True
        )
        return mosel.SchedulerConfig(policy=cls, **knobs)
    return mosel.SchedulerConfig(policy=policy, **knobs)


def violation(m: dict[str, float], conditions: Conditions) -> float:
    """The violation figure the conditions count (the authors' windowed one under ``paper``)."""
    return m["window_violation_ratio"] if conditions.windowed else m["violation_ratio"]


def trace_seconds(profile: mosel.Profile, load: float, jobs: int, min_seconds: float) -> float:
    """How long a trace at ``load`` runs: ``jobs`` jobs, or at least ``min_seconds``."""
    return max(min_seconds, jobs / rate_per_s(profile, load))


def capacity(loads: list[float], violations: list[float], target: float) -> float:
    """Largest load whose violation is at most ``target``, interpolated in log-load on the grid.

    0.0 when even the lightest load misses the target; the heaviest load when none does.
    """
    if violations[0] > target:
        return 0.0
    for i in range(1, len(loads)):
        if violations[i] > target:
            lo, hi = math.log(loads[i - 1]), math.log(loads[i])
            v0, v1 = violations[i - 1], violations[i]
            frac = (target - v0) / (v1 - v0) if v1 > v0 else 0.0
            return math.exp(lo + frac * (hi - lo))
    return loads[-1]


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max (NaNs dropped)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
