"""What the benchmark scripts share: each policy's configuration, trace lengths, capacity, spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conditions import Conditions, rate_per_s
from paper_policy import paper_policy

import mosel

__all__ = [
    "Capacity", "bisect_capacity", "capacity", "config_for", "median_interval", "spread", "trace_seconds",
    "violation",
]  # fmt: skip


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


@dataclass(frozen=True)
class Capacity:
    """The largest load found at a violation target, and how it was found.

    ``load`` passed (violation <= target); ``above`` failed, ``above / load - 1`` is at most the
    precision asked (``inf`` when no load failed: every load passed up to ``load``; ``load`` 0 when
    even the lowest load tried failed). ``probes`` holds every (load, violation) evaluated.
    """

    load: float
    above: float
    target: float
    probes: tuple[tuple[float, float], ...] = field(default=(), repr=False)

    @property
    def bracketed(self) -> bool:
        """True when a passing and a failing load enclose the capacity."""
        return self.load > 0.0 and math.isfinite(self.above)


def bisect_capacity(
    violation_at: Callable[[float], float],
    grid: Sequence[float],
    target: float,
    *,
    precision: float = 0.02,
    floor: float | None = None,
) -> Capacity:
    """The largest load whose violation is at most ``target``: bracket on ``grid``, then bisect.

    The bracket is the largest grid load that passes and the grid load above it (which fails,
    as every grid load above it does); bisection in log-load then halves it until the failing
    end is within ``precision`` (relative) of the passing one. When even the lowest grid load
    fails, loads halve down to ``floor`` (default: the lowest grid load / 64) to find a passing
    one. ``violation_at`` is called once per load (results are kept), so that several targets
    can share one cache: pass a memoised function.

    Where violations are not monotone in load, the answer is a crossing inside the last
    passing grid interval (every grid load above it fails).
    """
    if not (0.0 < precision < 1.0):
        raise ValueError(f"precision={precision!r}: give a relative precision in (0, 1), e.g. 0.02")
    loads = sorted(grid)
    probes: list[tuple[float, float]] = []

    def passes(load: float) -> bool:
        v = violation_at(load)
        probes.append((load, v))
        return v <= target

    verdicts = [passes(load) for load in loads]
    if not any(verdicts):
        lowest = floor if floor is not None else loads[0] / 64
        hi, lo = loads[0], loads[0] / 2
        while not passes(lo):
            hi, lo = lo, lo / 2
            if lo < lowest:
                return Capacity(0.0, hi, target, tuple(probes))
    else:
        last = max(i for i, ok in enumerate(verdicts) if ok)
        if last == len(loads) - 1:
            return Capacity(loads[-1], math.inf, target, tuple(probes))
        lo, hi = loads[last], loads[last + 1]
    while hi / lo - 1.0 > precision:
        mid = math.sqrt(lo * hi)
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return Capacity(lo, hi, target, tuple(probes))


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics that enclose it.

    The widest symmetric pair (x_(k), x_(n+1-k)) whose coverage, from the binomial(n, 1/2), is at
    least ``level``; the sample's range (min, max) when n is too small for it (n < 6 at 95%).
    """
    ordered = sorted(v for v in values if not math.isnan(v))
    n = len(ordered)
    if n == 0:
        return (math.nan, math.nan)
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    k = 0  # 0-based: the interval (ordered[k], ordered[n - 1 - k])
    while k + 1 <= (n - 1) // 2 and 1 - 2 * sum(pmf[: k + 2]) >= level:
        k += 1
    return (ordered[k], ordered[n - 1 - k])
