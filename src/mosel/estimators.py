"""What policies know of the jobs still to come: the recent arrival rate of work, and headroom.

One :class:`ArrivalEstimator` per policy that hedges for arrivals (``greedy``, ``mosel``): it sees
every admitted job (:meth:`observe_arrival`) and every batch launched (:meth:`observe_launch`)
and answers how much device time recent arrivals need (:meth:`rho`), how tight their deadlines
are (:attr:`headroom_low_us`, :attr:`headroom_mean_us`) and how often jobs arrive while the
device is busy (:meth:`busy_rate`). A :class:`MissBudget` keeps what the service's on-time
promise still allows upgrades to risk.
"""

from __future__ import annotations

import bisect
import collections
import math
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BANKED",
    "DEFAULT_ADDED",
    "DISPERSION_MAX",
    "DISPERSION_PRIOR",
    "MIN_SLACKS",
    "RATE_CONFIDENCE_Z",
    "ArrivalEstimator",
    "MissBudget",
    "SlackSample",
    "poisson_upper",
]

DEFAULT_ADDED: Final = 0.0005
"""Without a miss budget: the expected misses per request upgrades may add (0.05 points)."""
BANKED: Final = 500
"""The credit of a miss budget holds at most this many requests' worth of it."""
MIN_SLACKS: Final = 32
"""Finished jobs a :class:`SlackSample` needs before their slack replaces arrivals' headroom."""
DISPERSION_PRIOR: Final = 3.0
"""The arrivals' dispersion assumed before any is measured (a bursty stream's, not Poisson's 1)."""
DISPERSION_PRIOR_BINS: Final = 4.0
"""How many measured bins the prior weighs as (it fades as the bins of the stream accumulate)."""
DISPERSION_MAX: Final = 10.0
"""The dispersion is read as at most this (one burst, then hours of idle, is not a 1000x load)."""
DISPERSION_MEMORY_BINS: Final = 100.0
"""The time constant of the dispersion's decaying sums, in bins (ten long windows)."""
RATE_CONFIDENCE_Z: Final = 1.6449
"""The one-sided 95% normal quantile: :meth:`ArrivalEstimator.rho_bound` is a 95% upper bound."""


def poisson_upper(events: float) -> float:
    """The 95% upper bound of a Poisson mean after ``events`` were seen (in units of the span).

    ``chi2(0.95, 2 * events + 2) / 2``, by the Wilson-Hilferty approximation (0.9% under the
    exact quantile at ``events`` = 0, closer above; decayed counts need not be integers): 2.97
    after none, 4.73 after one, 1.27x the count after 50, 1.12x after 200.
    """
    dof = 2.0 * events + 2.0
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + RATE_CONFIDENCE_Z * math.sqrt(c)) ** 3 / 2.0


class ArrivalEstimator:
    """Exponentially decaying sums of recent arrivals, over a long and a short window.

    Args:
        window_s: the long window's time constant (``SchedulerConfig.load_window_s``); the
            short one, a tenth of it, sees a burst begin.
    """

    __slots__ = (
        "at",
        "bin_count",
        "bin_end",
        "bin_sums",
        "busy_arrivals",
        "busy_s",
        "first",
        "headroom_low_us",
        "headroom_mean_us",
        "jobs",
        "mean_requests",
        "mean_work_s",
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
        self.mean_requests = 1.0  # an EWMA of arriving jobs' requests
        self.mean_work_s = 0.0  # an EWMA of arriving jobs' work (0 before any)
        self.jobs = [0.0, 0.0]  # jobs arrived, decaying per window
        self.bin_count = 0  # arrivals in the bin still open (bins of the short window, from the first)
        self.bin_end = math.nan  # when it closes
        self.bin_sums = [0.0, 0.0, 0.0]  # closed bins: their weight, counts, squared counts (decaying)

    def observe_arrival(
        self, now: float, work_s: float, headroom_us: float | None, busy: bool, requests: int = 1
    ) -> None:
        """A job was admitted at ``now``.

        Args:
            now: its arrival.
            work_s: the median time of its cheapest admissible strategies.
            headroom_us: its deadline less its arrival and cheapest strategies' price (None: no
                deadline).
            busy: a batch was running when it arrived.
            requests: its requests.
        """
        self.decay_to(now)
        self.mean_requests += 0.05 * (requests - self.mean_requests)
        if math.isnan(self.first):
            self.first = now
            self.mean_work_s = work_s
            self.bin_end = now + self.windows[1]
        else:
            self.mean_work_s += 0.05 * (work_s - self.mean_work_s)
            self._close_bins(now)
        self.bin_count += 1
        sums, jobs = self.sums, self.jobs
        sums[0] += work_s
        sums[1] += work_s
        jobs[0] += 1.0
        jobs[1] += 1.0
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
            decay_short = math.exp(age / short)
            sums[0] *= decay
            sums[1] *= decay_short
            self.jobs[0] *= decay
            self.jobs[1] *= decay_short
            self.busy_arrivals *= decay
            self.busy_s *= decay
            self.at = now

    def _close_bins(self, now: float) -> None:
        """Close the bins that ended by ``now`` (the empty ones of a quiet spell in closed form)."""
        if not now >= self.bin_end:
            return
        width = self.windows[1]
        keep = 1.0 - 1.0 / DISPERSION_MEMORY_BINS
        sums, count = self.bin_sums, self.bin_count
        sums[0] = sums[0] * keep + 1.0
        sums[1] = sums[1] * keep + count
        sums[2] = sums[2] * keep + count * count
        empty = math.floor((now - self.bin_end) / width)
        if empty > 0:
            decay = keep**empty
            sums[0] = sums[0] * decay + (1.0 - decay) * DISPERSION_MEMORY_BINS
            sums[1] *= decay
            sums[2] *= decay
        self.bin_end += (empty + 1) * width
        self.bin_count = 0

    def dispersion(self, now: float) -> float:
        """How over-dispersed the arrivals are: the variance over the mean of their counts per bin.

        Bins of the short window, from the first arrival; 1 for Poisson arrivals, more for a
        bursty stream (bursts and calm spells), read as at least 1 and at most
        :data:`DISPERSION_MAX`. Before many bins closed the measurement is blended with a prior
        of :data:`DISPERSION_PRIOR` (weighing as :data:`DISPERSION_PRIOR_BINS` bins): a stream
        is not taken for Poisson before it showed it is one.
        """
        if math.isnan(self.first):
            return DISPERSION_PRIOR
        self._close_bins(now)
        weight, total, squares = self.bin_sums
        if total < 1.0:  # less than one arrival's weight in the closed bins: nothing measured
            return DISPERSION_PRIOR
        mean = total / weight
        measured = max(squares / weight - mean * mean, 0.0) / mean
        blended = (DISPERSION_PRIOR_BINS * DISPERSION_PRIOR + weight * measured) / (
            DISPERSION_PRIOR_BINS + weight
        )
        return min(max(blended, 1.0), DISPERSION_MAX)

    def rho(self, now: float) -> float:
        """Recent arrivals' work at their cheapest strategies, per second (the larger of two views)."""
        return self._rate(self.sums, now)

    def rho_bound(self, now: float) -> float:
        """The arrival rate of work that the arrivals seen cannot rule out: a 95% upper bound.

        :meth:`rho` is a point estimate, normalised as if at least the short window had been
        watched; right after the first arrival it reads one job as a light load although the
        next could come at once. This bound is what the count of arrivals allows over the time
        actually watched: the long window's decayed count of arrivals after the first (the first
        only starts the clock) over the decayed span since it, as a Poisson rate's 95% upper
        bound (:func:`poisson_upper`), times the mean work of an arrival; never below
        :meth:`rho`. Infinite until time has passed since the first arrival (and before any):
        nothing rules out a flood. In a steady stream it is about :meth:`rho` plus 1.6 standard
        errors of the long window's count: far above :meth:`rho` only where a window holds few
        arrivals, and the load they bring is then light unless each is long.
        """
        if math.isnan(self.first):
            return math.inf
        point = self._rate(self.sums, now)  # ages the sums to ``now``
        long = self.windows[0]
        elapsed = now - self.first
        span = long * -math.expm1(-elapsed / long)
        if span <= 0.0:
            return math.inf
        events = max(self.jobs[0] - math.exp(-elapsed / long), 0.0)
        spread = self.dispersion(now)
        return max(point, spread * poisson_upper(events / spread) / span * self.mean_work_s)

    def jobs_rate(self, now: float) -> float:
        """Recent arrivals in jobs per second (the larger of the two views, normalised as :meth:`rho`)."""
        return self._rate(self.jobs, now)

    def _rate(self, sums: list[float], now: float) -> float:
        if math.isnan(self.first):
            return 0.0
        self.decay_to(now)  # in place: ``sums`` is one of this estimator's lists
        long, short = self.windows
        elapsed = max(now - self.first, short)
        # Normalised by the time the sum has had to build up (at least the short window, so that
        # one arrival is not read as a flood), so the first arrivals are not diluted either.
        return max(
            sums[0] / (long * (1.0 - math.exp(-elapsed / long))),
            sums[1] / (short * (1.0 - math.exp(-elapsed / short))),
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


class MissBudget:
    """The deadline misses a policy may add by buying accuracy, and the misses it has seen.

    With a ``budget`` (a fraction of requests, the promise a service makes: "99% on time" is
    0.01), every finished or refused request adds ``budget`` to a credit and every request that
    missed its deadline (late, failed as doomed, refused) takes one away: the credit is what the
    promise still allows. An upgrade spends its risk price (the expected misses it adds) and is
    bought only with credit left, and never while the misses of the last ``window`` requests
    are over the budget (a risk model that is wrong is held by what really happened). Without a
    budget (None) the promise is relative: upgrades may add ``DEFAULT_ADDED`` expected misses per
    request, by the risk price alone (misses the cheapest policy would have too are not charged).
    The credit is bounded (``budget`` times :data:`BANKED` requests) so that idle time does not
    bank a burst's worth of risk.
    """

    __slots__ = ("_missed", "_outcomes", "_seen", "absolute", "cap", "credit", "rate", "window")

    def __init__(self, budget: float | None, window: int = 2000) -> None:
        self.absolute = budget is not None
        self.rate = DEFAULT_ADDED if budget is None else budget
        self.cap = self.rate * BANKED
        self.credit = self.cap
        self.window = window
        self._outcomes: collections.deque[tuple[int, bool]] = collections.deque()
        self._seen = 0  # requests in the window
        self._missed = 0  # of which missed

    def outcome(self, requests: int, missed: bool) -> None:
        """A job of ``requests`` finished (or was refused); ``missed``: not by its deadline."""
        outcomes = self._outcomes
        outcomes.append((requests, missed))
        self._seen += requests
        self._missed += requests if missed else 0
        while self._seen - outcomes[0][0] >= self.window:
            n, was = outcomes.popleft()
            self._seen -= n
            self._missed -= n if was else 0
        earned = self.rate * requests - (requests if missed and self.absolute else 0)
        self.credit = min(max(self.credit + earned, -self.cap), self.cap)

    @property
    def miss_rate(self) -> float:
        """Missed requests over the last ``window`` requests (0 before any)."""
        return self._missed / self._seen if self._seen else 0.0

    @property
    def open(self) -> bool:
        """Whether an upgrade may be bought now (credit left, and not over budget lately)."""
        return self.credit > 0.0 and not (self.absolute and self.miss_rate > self.rate)

    def spend(self, risk: float) -> None:
        """An upgrade adding ``risk`` expected missed requests was bought."""
        self.credit -= risk


class SlackSample:
    """How close recent jobs came to their deadlines: the slack left when each finished.

    What a delay of the jobs still to come costs: a job that finished ``s`` µs before its
    deadline misses it when delayed by more than ``s``. Until :data:`MIN_SLACKS` jobs finished,
    arriving jobs' headroom stands in for it (their slack were they served at once).
    """

    __slots__ = ("_dirty", "_headroom", "_slack", "_sorted")

    def __init__(self, size: int = 512) -> None:
        self._slack = _Window(size)
        self._headroom = _Window(size)
        self._sorted: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
        self._dirty = True

    def finished(self, slack_us: float, requests: int) -> None:
        """A job of ``requests`` finished ``slack_us`` before its deadline (negative: late)."""
        self._slack.add(slack_us, requests)
        self._dirty = True

    def arrived(self, headroom_us: float, requests: int) -> None:
        """A job arrived with ``headroom_us`` beyond its cheapest strategy."""
        self._headroom.add(headroom_us, requests)
        if len(self._slack.pairs) < MIN_SLACKS:
            self._dirty = True

    def share_missing(self, delays_us: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per delay, the share of requests that were on time but would miss if delayed by it."""
        if self._dirty:
            source = self._slack if len(self._slack.pairs) >= MIN_SLACKS else self._headroom
            values = np.asarray(source.values, dtype=np.float64)
            shares = np.cumsum(np.asarray(source.requests, dtype=np.float64)) / (source.total or 1)
            self._sorted = (values, np.concatenate([[0.0], shares]))
            self._dirty = False
        assert self._sorted is not None
        values, shares = self._sorted
        share: npt.NDArray[np.float64] = shares[np.searchsorted(values, delays_us, side="left")]
        return share


class _Window:
    """The last ``size`` (value, requests) pairs, and those with a value >= 0 kept sorted by value.

    Kept sorted as they come and go (a bisection and a list insert or delete each), so that
    :meth:`SlackSample.share_missing` reads them without sorting the window at every decision.
    Pairs of equal value may sit in any order: only the requests of smaller values are summed.
    """

    __slots__ = ("pairs", "requests", "total", "values")

    def __init__(self, size: int) -> None:
        self.pairs: collections.deque[tuple[float, int]] = collections.deque(maxlen=size)
        self.values: list[float] = []  # the pairs' values >= 0, ascending
        self.requests: list[int] = []  # their requests, in the same order
        self.total = 0  # the requests of every pair in the window

    def add(self, value: float, requests: int) -> None:
        pairs = self.pairs
        if len(pairs) == pairs.maxlen:
            old, gone = pairs[0]
            self.total -= gone
            if old >= 0.0:
                i = bisect.bisect_left(self.values, old)
                while self.requests[i] != gone:  # among equal values, the one with its requests
                    i += 1
                del self.values[i], self.requests[i]
        pairs.append((value, requests))
        self.total += requests
        if value >= 0.0:
            i = bisect.bisect_right(self.values, value)
            self.values.insert(i, value)
            self.requests.insert(i, requests)
