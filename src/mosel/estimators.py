"""What policies know of the jobs still to come: the recent arrival rate of work, and headroom.

One :class:`ArrivalEstimator` per policy that hedges for arrivals (``greedy``, ``mosel``): it sees
every admitted job (:meth:`observe_arrival`) and every batch launched (:meth:`observe_launch`)
and answers how much device time recent arrivals need (:meth:`rho`), how tight their deadlines
are (:attr:`headroom_low_us`, :attr:`headroom_mean_us`) and how often jobs arrive while the
device is busy (:meth:`busy_rate`).
"""

from __future__ import annotations

import math

__all__ = ["ArrivalEstimator"]


class ArrivalEstimator:
    """Exponentially decaying sums of recent arrivals, over a long and a short window.

    Args:
        window_s: the long window's time constant (``SchedulerConfig.load_window_s``); the
            short one, a tenth of it, sees a burst begin.
    """

    __slots__ = (
        "at",
        "busy_arrivals",
        "busy_s",
        "first",
        "headroom_low_us",
        "headroom_mean_us",
        "sums",
        "windows",
    )

    def __init__(self, window_s: float) -> None:
        self.windows = (window_s, window_s / 10)
        self.sums = [0.0, 0.0]  # median seconds of cheapest strategies arrived, decaying per window
        self.first = math.nan  # the first arrival
        self.at = 0.0  # the time the sums are aged to
        self.headroom_low_us = math.inf  # a low quantile of arrivals' headroom: quick down, slow up
        self.headroom_mean_us = 0.0  # an EWMA of arrivals' headroom (0 before any)
        self.busy_arrivals = 0.0  # arrivals that found a batch running, decaying over the long window
        self.busy_s = 0.0  # time spent running batches, same decay

    def observe_arrival(self, now: float, work_s: float, headroom_us: float | None, busy: bool) -> None:
        """A job was admitted at ``now``.

        Args:
            now: its arrival.
            work_s: the median time of its cheapest admissible strategies.
            headroom_us: its deadline less its arrival and cheapest strategies' price (None: no
                deadline).
            busy: a batch was running when it arrived.
        """
        self.decay_to(now)
        if math.isnan(self.first):
            self.first = now
        sums = self.sums
        sums[0] += work_s
        sums[1] += work_s
        if busy:
            self.busy_arrivals += 1.0
        if headroom_us is not None:
            low = self.headroom_low_us
            self.headroom_low_us = (
                headroom_us
                if math.isinf(low)
                else low + (headroom_us - low) * (0.2 if headroom_us < low else 0.01)
            )
            mean = self.headroom_mean_us
            self.headroom_mean_us = headroom_us if mean == 0.0 else 0.9 * mean + 0.1 * headroom_us

    def observe_launch(self, now: float, typical_s: float) -> None:
        """A batch of median time ``typical_s`` started at ``now``."""
        self.decay_to(now)
        self.busy_s += typical_s

    def decay_to(self, now: float) -> None:
        """Age the sums to ``now``."""
        if now > self.at:
            sums, (long, short), age = self.sums, self.windows, self.at - now
            decay = math.exp(age / long)
            sums[0] *= decay
            sums[1] *= math.exp(age / short)
            self.busy_arrivals *= decay
            self.busy_s *= decay
            self.at = now

    def rho(self, now: float) -> float:
        """Recent arrivals' work at their cheapest strategies, per second (the larger of two views)."""
        if math.isnan(self.first):
            return 0.0
        self.decay_to(now)
        long, short = self.windows
        elapsed = max(now - self.first, short)
        # Normalised by the time the sum has had to build up (at least the short window, so that
        # one arrival is not read as a flood), so the first arrivals are not diluted either.
        return max(
            self.sums[0] / (long * (1.0 - math.exp(-elapsed / long))),
            self.sums[1] / (short * (1.0 - math.exp(-elapsed / short))),
        )

    def work(self) -> float:
        """Recent arrivals' work per second over the long window, unnormalised (decayed sum / window)."""
        return self.sums[0] / self.windows[0]

    def busy_rate(self) -> float | None:
        """Arrivals per second of running (None before any arrival met a running batch).

        A caller waiting for each result never arrives while its own job runs, so it is never
        counted against itself.
        """
        if self.busy_arrivals > 0 < self.busy_s:
            return self.busy_arrivals / self.busy_s
        return None
