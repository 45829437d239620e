"""Seeded workload traces: arrival processes, job sizes, deadlines and accuracy floors."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

__all__ = ["bursty_arrivals", "fixed_qps_jobs", "job_size", "poisson_arrivals"]


def job_size(rng: random.Random, cap: int) -> int:
    """The paper's job sizes: max(1, int(N(1, 6))), capped at the largest profiled size."""
    return min(cap, max(1, int(rng.gauss(1, 6))))


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process."""
    rng = random.Random(seed)
    t, times = 0.0, []
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            return times
        times.append(t)


def bursty_arrivals(
    mean_rate_per_s: float,
    duration_s: float,
    seed: int,
    *,
    burst_factor: float = 4.0,
    burst_fraction: float = 0.25,
    mean_phase_s: float = 1.0,
    diurnal: Callable[[float], float] | None = None,
) -> list[float]:
    """A Markov-modulated Poisson process: calm and burst phases, optionally a daily shape.

    The burst rate is ``burst_factor`` times the calm rate; bursts take ``burst_fraction`` of
    the time on average, phases last ``mean_phase_s`` on average (exponential), and the
    overall mean rate is ``mean_rate_per_s`` (times ``diurnal(t / duration_s)`` if given, a
    function of the trace's progress in [0, 1]). A stand-in for the paper's Twitter trace.
    """
    rng = random.Random(seed)
    calm = mean_rate_per_s / (1 - burst_fraction + burst_fraction * burst_factor)
    rates = {False: calm, True: calm * burst_factor}
    mean_phase = {False: mean_phase_s * (1 - burst_fraction) / 0.5, True: mean_phase_s * burst_fraction / 0.5}
    t, burst, times = 0.0, False, []
    phase_end = rng.expovariate(1 / mean_phase[burst])
    peak = max(rates.values()) * 2.0
    while t < duration_s:
        t += rng.expovariate(peak)  # thinning
        while t >= phase_end:
            burst = not burst
            phase_end += rng.expovariate(1 / mean_phase[burst])
        shape = diurnal(t / duration_s) if diurnal else 1.0
        if t < duration_s and rng.random() < rates[burst] * shape / peak:
            times.append(t)
    return times


def fixed_qps_jobs(qps: float, duration_s: float, seed: int, cap: int) -> list[tuple[float, int]]:
    """The paper's fixed-QPS stream: (arrival time, job size) pairs, evenly spaced, not Poisson.

    As the authors' producer does: each second, ``qps`` requests are cut into jobs of size
    max(1, int(N(1, 6))) (capped at ``cap``), the last one trimmed so that the sizes sum to the
    QPS; within the second, a job of n requests is followed by a gap of n / QPS seconds. A
    fractional QPS carries its remainder to the next second.
    """
    rng = random.Random(seed)
    out: list[tuple[float, int]] = []
    carry = 0.0
    for second in range(math.ceil(duration_s)):
        carry += qps
        budget = int(carry)
        carry -= budget
        t = float(second)
        while budget > 0:
            n = min(job_size(rng, cap), budget)
            if t >= duration_s:
                return out
            out.append((t, n))
            budget -= n
            t += n / qps
    return out


def diurnal_shape(progress: float) -> float:
    """A day compressed into the trace: a trough at the start and end, a peak in the middle."""
    return 0.6 + 0.8 * math.sin(math.pi * progress) ** 2
