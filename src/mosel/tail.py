"""Latency tails: how far measured batch times stray from the cost model, and the price of a deadline.

A deadline is a tail constraint: a batch priced at its median latency overruns about half the
time. The scheduler therefore prices every strategy at a quantile of its latency: the corrected
median (the profile's tables times the online correction) scaled by a margin, plus the per-batch
dispatch overhead the cost model does not see (taking the batch, assembling outputs, handing
results over). Both come from a window of recent batches (:class:`TailModel`); before enough
batches ran, from the profile's own spread (its p95 against its median).

:class:`Residuals` is the same information as a plain sample: what the simulator draws
execution times from, and what a real run records for its replay.
"""

from __future__ import annotations

import array
import bisect
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from mosel.jsonvalues import json_dict, json_field, json_float, json_list

if TYPE_CHECKING:
    from mosel.profiles import Profile

__all__ = ["Residuals", "TailModel", "outlasting"]

WINDOW: Final = 256
"""Recent batches the online tail model prices from."""
RECORD: Final = 4096
"""Recent batches the tail model keeps for :meth:`TailModel.residuals` (a run's sample)."""
MIN_SAMPLES: Final = 32
"""Batches needed before measured residuals replace the profile's prior."""
PRIOR_POINTS: Final = 64
"""Points of the profile's spread that stand for the residuals before enough batches ran."""
REFIT_EVERY: Final = 32
"""The margin is recomputed every so many batches (quantiles sort the window)."""
_Z95: Final = 1.6448536269514722


@dataclass(frozen=True, slots=True)
class Residuals:
    """A sample of per-batch residuals of the cost model.

    Attributes:
        ratios: measured execution time over the profile's prediction (no online correction),
            one per batch: the profile's bias and the spread around it.
        overhead_us: per batch, the time from dispatch to the hand-over of its results that is
            not model execution (empty for none).
        at_s: when each batch started (seconds, ascending; empty for unknown). With it (and one
            overhead per ratio), :meth:`sample` replays the machine's phases: a batch starting
            at ``t`` gets the residuals of the recorded batch nearest to ``t``, so slow spells
            (another tenant's burst) come back when they happened. Without it, draws are
            independent.
    """

    ratios: tuple[float, ...]
    overhead_us: tuple[float, ...] = ()
    at_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.ratios:
            raise ValueError("Residuals need at least one ratio (measured / predicted execution time)")
        for name, values in (("ratios", self.ratios), ("overhead_us", self.overhead_us)):
            bad = [v for v in values if not (math.isfinite(v) and v >= 0.0)]
            if bad:
                raise ValueError(f"Residuals.{name} must be finite and >= 0, got {bad[0]!r}")
        if self.at_s:
            if len(self.at_s) != len(self.ratios) or len(self.overhead_us) not in (0, len(self.ratios)):
                raise ValueError(
                    f"Residuals.at_s needs one time per ratio ({len(self.ratios)}), and then one overhead "
                    f"per ratio or none; got {len(self.at_s)} times and {len(self.overhead_us)} overheads"
                )
            if any(not math.isfinite(t) for t in self.at_s) or any(
                b < a for a, b in zip(self.at_s, self.at_s[1:], strict=False)
            ):
                raise ValueError("Residuals.at_s must be finite and ascending (batch start times)")

    def shifted(self, by_s: float) -> Residuals:
        """The same sample with its times moved by ``by_s`` (e.g. to a trace's start)."""
        return Residuals(self.ratios, self.overhead_us, tuple(t + by_s for t in self.at_s))

    def independent(self) -> Residuals:
        """The same sample without its times: draws independent of when a batch runs."""
        return Residuals(self.ratios, self.overhead_us)

    @classmethod
    def exact(cls) -> Residuals:
        """No spread, no bias, no overhead: the simulator charges exactly the prediction."""
        return cls((1.0,))

    @classmethod
    def from_profile(cls, profile: Profile, count: int = 101) -> Residuals:
        """The profile's own spread: lognormal ratios whose p95 is the tables' typical p95/median.

        The profile times each branch and fusion repeatedly and keeps the median and the p95;
        the median over every table and batch size of ``log(p95 / median)`` sets the spread.
        No overhead (the profiler times the model, not a server).
        """
        sigma = profile_sigma(profile)
        if sigma == 0.0:
            return cls.exact()
        normal = statistics.NormalDist(-sigma * sigma / 2, sigma)  # mean ratio 1
        return cls(tuple(math.exp(normal.inv_cdf((i + 0.5) / count)) for i in range(count)))

    @property
    def bias(self) -> float:
        """Median ratio (1: the profile is right at the median)."""
        return statistics.median(self.ratios)

    def ratio_quantile(self, q: float) -> float:
        """Quantile ``q`` of the ratios."""
        return float(np.quantile(self.ratios, q))

    def sample(self, rng: random.Random, at_s: float | None = None) -> tuple[float, float]:
        """One batch's (ratio, overhead_us).

        The recorded batch nearest ``at_s`` when the sample has times, else each value drawn at
        random from its sample.
        """
        if self.at_s and at_s is not None:
            i = bisect.bisect_left(self.at_s, at_s)
            if i == len(self.at_s) or (i > 0 and at_s - self.at_s[i - 1] < self.at_s[i] - at_s):
                i -= 1
            return self.ratios[i], self.overhead_us[i] if self.overhead_us else 0.0
        ratio = self.ratios[rng.randrange(len(self.ratios))]
        return ratio, self.overhead_us[rng.randrange(len(self.overhead_us))] if self.overhead_us else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"ratios": list(self.ratios), "overhead_us": list(self.overhead_us), "at_s": list(self.at_s)}

    @classmethod
    def from_json(cls, data: Any) -> Residuals:
        """Inverse of :meth:`to_json`; ValueError on malformed data."""
        data = json_dict(data, "residuals")
        ratios = json_list(json_field(data, "ratios", "residuals"), "residuals.ratios")
        overhead = json_list(json_field(data, "overhead_us", "residuals"), "residuals.overhead_us")
        at_s = json_list(data.get("at_s", []), "residuals.at_s")
        return cls(
            tuple(json_float(v, "residuals.ratios[]", low=0.0) for v in ratios),
            tuple(json_float(v, "residuals.overhead_us[]", low=0.0) for v in overhead),
            tuple(json_float(v, "residuals.at_s[]") for v in at_s),
        )


def profile_sigma(profile: Profile) -> float:
    """Log-spread of the profile's timings: median over its table entries of ``log(p95/median) / z95``."""
    tables = (*profile.branch_latency.values(), *profile.fusion_latency.values())
    logs = [
        math.log(max(p95 / median, 1.0))
        for table in tables
        for median, p95 in zip(table.median_us, table.p95_us)
        if median > 0
    ]
    return statistics.median(logs) / _Z95 if logs else 0.0


class TailModel:
    """The online price of a deadline: a margin on the corrected median, plus the dispatch overhead.

    ``price(t) = margin * t + overhead_us`` for a corrected median ``t``, where ``margin`` is the
    ``quantile`` of recent measured/corrected execution ratios and ``overhead_us`` the same
    quantile of recent per-batch overheads (each a quantile, so their sum is conservative).
    :meth:`typical` is the same at the median: what throughput estimates use.
    """

    __slots__ = (
        "_overheads",
        "_prior",
        "_ratios",
        "_record",
        "_record_count",
        "_sample",
        "margin",
        "median_overhead_us",
        "overhead_us",
        "quantile",
    )

    def __init__(self, quantile: float, prior_sigma: float = 0.0) -> None:
        self.quantile = quantile
        z = statistics.NormalDist().inv_cdf(quantile) if 0.5 < quantile < 1.0 else 0.0
        self.margin = math.exp(prior_sigma * z)
        self.overhead_us = 0.0
        self.median_overhead_us = 0.0
        self._ratios = _Ring(WINDOW)
        self._overheads = _Ring(WINDOW)
        # The last RECORD batches: raw ratio, overhead, start time (plain arrays: one batch's
        # record costs three item stores, not a numpy column assignment).
        self._record = tuple(array.array("d", bytes(8 * RECORD)) for _ in range(3))
        self._record_count = 0
        # Until enough batches ran: the profile's spread as ratios at evenly spaced quantiles.
        quantiles = (np.arange(PRIOR_POINTS) + 0.5) / PRIOR_POINTS
        prior = np.exp(prior_sigma * np.array([statistics.NormalDist().inv_cdf(q) for q in quantiles]))
        self._prior = (prior, np.zeros(PRIOR_POINTS))
        self._sample: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None

    def observe(self, ratio: float, raw_ratio: float, overhead_us: float, at_s: float) -> bool:
        """Record one settled batch.

        Its measured execution over its corrected and its raw prediction, its dispatch
        overhead, and when it started. Returns True when the margin or the overhead moved
        enough to re-read prices (2%, and 2 µs for the overhead).
        """
        i = self._record_count % RECORD
        raw, overheads, times = self._record
        raw[i], overheads[i], times[i] = raw_ratio, overhead_us, at_s
        self._record_count += 1
        self._overheads.add(overhead_us)
        self._sample = None
        if not self._ratios.add(ratio):
            return False
        margin = max(self._ratios.quantiles((self.quantile,))[0], 1.0) if self.quantile > 0.5 else 1.0
        overhead, median_overhead = self._overheads.quantiles((self.quantile, 0.5))
        moved = abs(margin / self.margin - 1.0) > 0.02 or abs(overhead - self.overhead_us) > max(
            2.0, 0.02 * self.overhead_us
        )
        self.margin, self.overhead_us, self.median_overhead_us = margin, overhead, median_overhead
        return moved

    def sample(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Recent batches' residuals as paired arrays: execution ratios and overheads (µs).

        A batch whose corrected median is ``c`` took ``c * ratio + overhead`` in each of them:
        the measured distribution, tail included, that :class:`mosel.pricing.Pricer` prices
        risks with. Before :data:`MIN_SAMPLES` batches, the profile's own spread.
        """
        if self._sample is None:
            count = min(self._ratios.count, WINDOW)
            if count < MIN_SAMPLES:
                return self._prior
            self._sample = (
                np.frombuffer(self._ratios.data)[:count].copy(),
                np.frombuffer(self._overheads.data)[:count].copy(),
            )
        return self._sample

    def price(self, corrected_us: float) -> int:
        """The latency to plan with for a batch whose corrected median is ``corrected_us``."""
        return math.ceil(self.margin * corrected_us + self.overhead_us)

    def typical(self, priced_us: float) -> float:
        """The median time of a batch priced ``priced_us`` (for throughput estimates)."""
        corrected = max(priced_us - self.overhead_us, 0.0) / self.margin
        return corrected + self.median_overhead_us

    def residuals(self) -> Residuals | None:
        """The last :data:`RECORD` batches as a :class:`Residuals` sample (None before any batch).

        Batch start times are on the scheduler's clock.
        """
        count = self._record_count
        if not count:
            return None
        full = np.array([np.frombuffer(column) for column in self._record])
        record = full[:, :count] if count <= RECORD else np.roll(full, -(count % RECORD), axis=1)
        record = record[:, np.argsort(record[2], kind="stable")]
        ratios, overheads, times = (tuple(float(v) for v in row) for row in record)
        return Residuals(ratios, overheads, times)


class _Ring:
    """The last ``size`` values; :meth:`add` says when a refit is due."""

    __slots__ = ("count", "data")

    def __init__(self, size: int) -> None:
        self.data = array.array("d", bytes(8 * size))
        self.count = 0

    def add(self, value: float) -> bool:
        self.data[self.count % len(self.data)] = value
        self.count += 1
        return self.count >= MIN_SAMPLES and self.count % REFIT_EVERY == 0

    def quantiles(self, qs: tuple[float, ...]) -> tuple[float, ...]:
        """Quantiles of the values held, exactly as ``numpy.quantile`` (method "linear") gives them."""
        ordered = sorted(self.data[: min(self.count, len(self.data))])
        return tuple(_quantile(ordered, q) for q in qs)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """``numpy.quantile(values, q)`` of sorted values, bit for bit, without numpy's per-call cost.

    Linear interpolation between the order statistics around ``(n - 1) * q``, in numpy's own
    arithmetic (its ``_lerp``); ``tests/unit/test_tail.py`` compares the two.
    """
    n = len(ordered)
    virtual = (n - 1) * q
    if virtual >= n - 1:
        return float(ordered[-1])
    low = math.floor(virtual)
    gamma = virtual - low
    a, b = ordered[low], ordered[low + 1]
    diff = b - a
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)


def merge(samples: Iterable[Residuals]) -> Residuals:
    """One sample from several (e.g. the repeats of a real run), without their times."""
    parts: Sequence[Residuals] = list(samples)
    ratios = tuple(r for s in parts for r in s.ratios)
    return Residuals(ratios, tuple(o for s in parts for o in s.overhead_us))


def outlasting(
    durations: npt.NDArray[np.float64], thresholds: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Per candidate (row of ``durations``) and threshold, the share of its durations above it.

    ``(durations[:, :, None] > thresholds).mean(axis=1)``, the same values, without the (C, S, T)
    comparison: a threshold below every duration is outlasted by all (1.0), one at or above every
    duration by none (0.0), and for the rest each candidate's durations are sorted once and
    counted by bisection (a count over the samples, exactly what the mean of the comparison is).
    """
    below = thresholds < durations.min()
    above = thresholds >= durations.max()
    shares = np.empty((len(durations), len(thresholds)))
    shares[:, below] = 1.0
    shares[:, above] = 0.0
    middle = ~(below | above)  # NaN thresholds too (outlasted by none, as the comparison says)
    if middle.any():
        within = thresholds[middle]
        samples = durations.shape[1]
        counts = [samples - np.searchsorted(row, within, side="right") for row in np.sort(durations, axis=1)]
        shares[:, middle] = np.asarray(counts, dtype=np.float64) / samples
    return shares
