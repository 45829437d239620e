"""What a batch will cost: the profile's tables, corrected online, at the tail model's quantile.

A :class:`Pricer` is the one place decisions ask for a latency. It holds the per-part online
correction (an EWMA of measured over predicted time for each branch and for fusion), the tail
model (a margin and the dispatch overhead, :class:`mosel.tail.TailModel`), the plan and cost model
of each size bucket, and bounded caches of what it has priced. Every price is
:meth:`mosel.plan.CostModel.parts` (one rule for what a strategy runs), corrected per part, at the
tail: ``margin * corrected + overhead``.

A size bucket beyond the largest one profiled is priced by extrapolation (the largest bucket's
table scaled linearly); its sized branch also has a correction of its own, per (modality, bucket),
learned from that bucket's runs on top of the branch's, so that a consistently mis-priced long input
converges without moving the prices of the measured buckets.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from mosel.chains import ESCALATION, LaterRows, StageBudget, Transition, later_parts, with_chains
from mosel.jobs import Batch, Job, Task, merged_groups
from mosel.memo import Cache
from mosel.plan import CostModel, Frontier, Plan, Strategy
from mosel.profiles import BucketKey, Profile
from mosel.queue import IntArray
from mosel.stats import Stats
from mosel.tail import TailModel, outlasting, profile_sigma

__all__ = ["BEYOND_BUCKETS", "CORRECTION_CLAMP", "BatchLatency", "Cache", "Delayed", "Pricer"]

Configuration = frozenset[str]
CORRECTION_CLAMP: Final = 4.0
"""A single measurement counts as at most this factor above or below the current correction."""
PRICED_CACHE: Final = 256
"""Size buckets kept priced besides those priced ahead (then they are dropped)."""
CHAIN_PARTS_CACHE: Final = 8192
"""Chain strategies whose later parts are kept (then all are forgotten and made again as asked)."""
BEYOND_BUCKETS: Final = 64
"""(modality, bucket) corrections kept beyond the measured buckets (then the least recently run goes)."""
Beyond = tuple[CostModel, dict[str, tuple[str, int]]]
"""A cost model of a bucket beyond the measured ones, and its extrapolated parts' correction keys."""
Groups = tuple[tuple[Configuration, int], ...]


@dataclass(frozen=True, slots=True)
class Delayed:
    """The jobs still to come that a longer batch delays, as the risk price sees them.

    Attributes:
        jobs: how many are expected before the device next idles (arrivals during the batch,
            the queued work and what arrives meanwhile: the rest of the busy period).
        requests: requests per job.
        share_missing: per delay (µs), the share of requests that would miss their deadline if
            delayed that much (from how close recent jobs came to theirs).
    """

    jobs: float
    requests: float
    share_missing: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]


class Pricer:
    """Corrected, tail-priced latencies of strategies and batches for one model's scheduler.

    Args:
        profile: the model's profile (its tables, plan, size buckets and timing spread).
        quantile: the tail model's quantile (:attr:`SchedulerConfig.latency_quantile`).
        alpha: the weight of a new measurement in the correction (EWMA).
        stats: where the correction and the tail model are published.
        priced: plans and cost models of size buckets priced ahead (at attach); kept for good.
        escalation: the quantile at which the rows a chain escalates are priced
            (:attr:`SchedulerConfig.escalation_quantile`); None: no chain is planned, even with
            a calibration.
    """

    def __init__(
        self,
        profile: Profile,
        quantile: float,
        alpha: float,
        stats: Stats,
        priced: Mapping[BucketKey, tuple[Plan, CostModel]] | None = None,
        escalation: float | None = None,
    ) -> None:
        self.profile = profile
        self.alpha = alpha
        self.stats = stats
        self.cost: CostModel = profile.cost_model()
        self.reference = profile.reference_bucket
        self.calibration = profile.calibration if escalation is not None else None
        """The calibration chains are planned from (None: no escalation)."""
        self.z = statistics.NormalDist().inv_cdf(escalation) if escalation is not None else 0.0
        """Escalated rows are priced at this many standard deviations above their mean."""
        parts = (*profile.modalities, "fusion") + ((ESCALATION,) if self.calibration is not None else ())
        self.correction: dict[str, float] = dict.fromkeys(parts, 1.0)
        everything = frozenset(profile.modalities)
        self._weights = {m: float(self.cost.branch_us[m][1]) for m in profile.modalities} | {
            "fusion": float(self.cost.fusion_us[everything][1])
        }
        self._measured_parts: set[str] = set()  # parts the correction has measured
        self._published = dict(self.correction)
        self.version = 0
        """Bumped whenever the correction or the tail model moves option latencies."""
        self.tail = TailModel(quantile, profile_sigma(profile))
        """The margin and overhead that turn a corrected median into the price decisions use."""
        ahead = {self.reference: (profile.plan, self.cost)} | dict(priced or {})
        if self.calibration is not None:  # priced-ahead entries kept as given without one
            ahead = {bucket: (self.chained(plan, cost), cost) for bucket, (plan, cost) in ahead.items()}
        self.reference_plan: Plan = ahead[self.reference][0]
        """The reference bucket's plan, its chains included."""
        self._plans: Cache[BucketKey, tuple[Plan, CostModel]] = Cache(PRICED_CACHE, ahead)
        self.beyond: dict[tuple[str, int], float] = {}
        """(modality, bucket) -> the correction of its branch at a bucket beyond the measured ones."""
        self._largest = tuple((m, s.largest) for m, s in profile.sized.items())
        self._beyond_costs: dict[int, Beyond] = {}  # id(cost model) -> it and its keys (identity-checked)
        self._published_beyond: dict[tuple[str, int], float] = {}
        for bucket, (_, cost) in ahead.items():
            self._note_beyond(bucket, cost)
        self._latencies: Cache[tuple[Configuration, int, BucketKey | None], tuple[int, ...]] = Cache(4096)
        self._chain_parts: dict[tuple[int, int], tuple[Strategy, CostModel, Mapping[str, float]]] = {}
        self._frontier_parts: dict[
            tuple[int, int],
            tuple[Frontier, CostModel, tuple[tuple[str, ...], npt.NDArray[np.float64], bool]],
        ] = {}
        self._every: Cache[tuple[Configuration, int, BucketKey | None], Strategy] = Cache(4096)
        self._parts: Cache[tuple[tuple[tuple[Configuration, int], ...], BucketKey | None], dict[str, int]]
        self._parts = Cache(4096)
        # (groups, id(cost model)) -> the cost model and the groups' parts (identity-checked)
        self._cost_parts: Cache[tuple[Groups, int], tuple[CostModel, dict[str, int]]] = Cache(4096)
        self._measured: tuple[Batch, float, float, float] | None = None  # for handed_over(): the last
        # completed batch, its measured time, and its corrected and raw predictions
        stats.set_tail(self.tail)
        stats.set_correction(self.correction)

    # ------------------------------------------------------------------ plans per size bucket

    def chained(self, plan: Plan, cost: CostModel) -> Plan:
        """``plan`` with the calibration's chains in its frontiers (``plan`` itself without one)."""
        if self.calibration is None:
            return plan
        return with_chains(plan, cost, self.calibration, self.z)

    def plan_outside_lock(self, bucket: BucketKey) -> tuple[Plan, CostModel]:
        """What :meth:`plan` will give for ``bucket``, for a job being built before admission.

        Needs no lock (a read of the cache, else the pure :meth:`Profile.priced_at`, which may
        reprice a plan: milliseconds), so a driver calls it outside its lock and hands the
        result to admission as ``job.priced``. It stores nothing.
        """
        priced = self._plans.data.get(bucket)
        if priced is not None:
            return priced
        plan, cost = self.profile.priced_at(bucket)
        return self.chained(plan, cost), cost

    def plan(
        self, bucket: BucketKey, computed: tuple[Plan, CostModel] | None = None
    ) -> tuple[Plan, CostModel]:
        """The plan and cost model of jobs of size ``bucket`` (cached; no solving).

        ``computed``: :meth:`plan_outside_lock`'s value for ``bucket``, stored when the cache
        lacks it (else computed here: a simulation, which holds no lock). The buckets priced
        ahead stay; the others are dropped every :data:`PRICED_CACHE` new ones.
        """
        if computed is not None and computed[1].accuracy != self.cost.accuracy:
            computed = None  # priced before set_profile swapped the accuracies: stale
        priced = self._plans.get(
            bucket, lambda: computed if computed is not None else self.plan_outside_lock(bucket)
        )
        if self._largest:
            self._note_beyond(bucket, priced[1])
        return priced

    def _note_beyond(self, bucket: BucketKey, cost: CostModel) -> None:
        """Remember ``cost`` as the cost model of ``bucket`` if it lies beyond the measured buckets."""
        keys = {
            m: (m, edge) for (m, largest), edge in zip(self._largest, bucket, strict=True) if edge > largest
        }
        if not keys:
            return
        known = self._beyond_costs.get(id(cost))
        if known is not None and known[0] is cost:
            return
        if len(self._beyond_costs) >= 2 * (PRICED_CACHE + len(self._plans.data)):
            # Forget the cost models no longer priced (their ids may be reused): keep the cached ones'.
            live = {id(c) for _, c in self._plans.data.values()}
            self._beyond_costs = {k: v for k, v in self._beyond_costs.items() if k in live}
        self._beyond_costs[id(cost)] = (cost, keys)

    def _beyond_of(self, cost: CostModel) -> dict[str, tuple[str, int]] | None:
        """The extrapolated parts of ``cost`` and their correction keys (None: a measured bucket's)."""
        known = self._beyond_costs.get(id(cost))
        return known[1] if known is not None and known[0] is cost else None

    # ------------------------------------------------------------------ prices

    def price(self, groups: Sequence[tuple[Configuration, int]], cost: CostModel | None = None) -> int:
        """The price of a strategy: its corrected median latency at the tail model's quantile.

        ``cost``: the cost model of the jobs' size bucket (default: the reference one).
        """
        return self.tail.price(self.corrected_us(groups, cost))

    def price_of(self, strategy: Strategy, cost: CostModel | None = None) -> int:
        """:meth:`price` of a strategy, a chain's later stages included."""
        chain = strategy.chain
        if chain is None:
            return self.price(strategy.groups, cost)
        cost = cost or self.cost
        key = (id(strategy), id(cost))
        entry = self._chain_parts.get(key)
        if entry is None or entry[0] is not strategy or entry[1] is not cost:
            # a chain's later parts depend on its shares, the job size and the quantile, not on
            # the correction: made once, only re-weighed when the correction moves
            later = LaterRows()
            later.add(chain, strategy.n)
            overhead = self.stage_overhead_us(strategy.n)
            if len(self._chain_parts) >= CHAIN_PARTS_CACHE:
                self._chain_parts.clear()
            parts = later_parts(cost, later.stages(self.z), overhead)
            entry = self._chain_parts[key] = (strategy, cost, parts)
        correction = self.correction
        extra = sum(correction.get(p, 1.0) * v for p, v in entry[2].items())
        return self.tail.price(self.corrected_us(strategy.groups, cost) + extra)

    def refresh(self, task: Task) -> None:
        """Bring the task's option latencies up to date with the correction."""
        if task.version == self.version:
            return
        job = task.job
        fixed = task.fixed
        if fixed is not None:
            key = (fixed.groups[0][0], -task.n, job.bucket)
            lat = self._latencies.data.get(key)
            if lat is None:
                priced = (self.price(fixed.groups, job.cost),)
                lat = self._latencies.get(key, lambda: priced)
            task.lat = lat
            task.acc = (fixed.accuracy_units,)
        else:
            frontier = task.frontier
            lat = self._latencies.data.get((frontier.available, frontier.n, job.bucket))
            task.lat = (lat if lat is not None else self.latencies(frontier, job))[task.first :]
            task.acc = frontier.accuracy_units[task.first :]
        task.version = self.version

    def latencies(self, frontier: Frontier, job: Job[Any]) -> tuple[int, ...]:
        """Every strategy of ``frontier`` priced for ``job``'s size bucket, ascending.

        Per-part corrections can reorder options; a running maximum keeps them ascending (a
        cheaper option further up is priced as the one below it: never optimistic).
        """
        cost = job.cost

        def make() -> tuple[int, ...]:
            names, values, chained = self._frontier_matrix(frontier, cost)
            if self._beyond_costs or (chained and self.calibration is None):
                return tuple(itertools.accumulate((self.price_of(s, cost) for s in frontier.strategies), max))
            correction = self.correction
            if chained:  # one product over its strategies
                corrected = values @ np.asarray([correction.get(p, 1.0) for p in names])
            else:  # corrected_us's sum, column by column in its order (an absent part adds 0.0)
                corrected = correction["fusion"] * values[:, len(names) - 2]
                for i, m in enumerate(names[:-2]):
                    corrected = corrected + correction[m] * values[:, i]
            prices = np.ceil(self.tail.margin * corrected + self.tail.overhead_us)
            return tuple(itertools.accumulate((int(x) for x in prices), max))

        return self._latencies.get((frontier.available, frontier.n, job.bucket), make)

    def _frontier_matrix(
        self, frontier: Frontier, cost: CostModel | None
    ) -> tuple[tuple[str, ...], npt.NDArray[np.float64], bool]:
        """Per strategy of a frontier, its uncorrected parts (a chain's later stages included).

        Columns: the branches in declaration order, fusion, escalation; and whether any strategy
        has a chain. Made once per frontier and cost model: a re-price only weighs them again.
        """
        cost = cost or self.cost
        key = (id(frontier), id(cost))
        entry = self._frontier_parts.get(key)
        if entry is not None and entry[0] is frontier and entry[1] is cost:
            return entry[2]
        names = (*cost.modalities, "fusion", ESCALATION)
        column = {p: i for i, p in enumerate(names)}
        values = np.zeros((len(frontier.strategies), len(names)))
        overhead = self.stage_overhead_us(frontier.n)
        for row, strategy in enumerate(frontier.strategies):
            parts: dict[str, float] = dict(cost.parts(strategy.groups))
            if strategy.chain is not None:
                later = LaterRows()
                later.add(strategy.chain, strategy.n)
                for p, v in later_parts(cost, later.stages(self.z), overhead).items():
                    parts[p] = parts.get(p, 0.0) + v
            for p, v in parts.items():
                values[row, column[p]] += v
        matrix = (names, values, any(s.chain is not None for s in frontier.strategies))
        if len(self._frontier_parts) >= CHAIN_PARTS_CACHE:
            self._frontier_parts.clear()
        self._frontier_parts[key] = (frontier, cost, matrix)
        return matrix

    def every_modality(self, available: Configuration, n: int, job: Job[Any]) -> Strategy:
        """Every available modality for every request (need not be on the frontier)."""
        key = (available, n, job.bucket)
        strategy = self._every.data.get(key)
        if strategy is None:
            groups = ((available, n),)
            cost = job.cost or self.cost
            made = Strategy(groups, cost.latency_us(groups), cost.accuracy_units(groups))
            strategy = self._every.get(key, lambda: made)
        return strategy

    def corrected_us(
        self,
        groups: Sequence[tuple[Configuration, int]],
        cost: CostModel | None = None,
        later: LaterRows | None = None,
    ) -> float:
        """A strategy's corrected median execution (what :meth:`price` puts the tail on).

        Each part weighed by its online correction, and a branch priced at a size bucket beyond
        the measured ones by that bucket's own correction too. ``later``: the rows chains
        escalate, priced at the escalation quantile (:func:`mosel.chains.later_parts`).
        """
        cost = cost or self.cost
        if later:
            base = self.corrected_us(groups, cost)
            overhead = self.stage_overhead_us(sum(k for _, k in groups))
            extra = later_parts(cost, later.stages(self.z), overhead)
            return base + sum(self.correction.get(p, 1.0) * v for p, v in extra.items())
        memo = (tuple(groups), id(cost))
        known = self._cost_parts.data.get(memo)
        if known is None or known[0] is not cost:
            known = self._cost_parts.data[memo] = (cost, cost.parts(groups))
            if len(self._cost_parts.data) > self._cost_parts.size:
                self._cost_parts.clear()
        parts = known[1]
        correction = self.correction
        total = correction["fusion"] * parts["fusion"]
        beyond = self._beyond_of(cost) if self._beyond_costs else None
        if beyond is None:
            for part, value in parts.items():
                if part != "fusion":
                    total += correction[part] * value
        else:
            own = self.beyond
            for part, value in parts.items():
                if part != "fusion":
                    key = beyond.get(part)
                    total += correction[part] * value * (1.0 if key is None else own.get(key, 1.0))
        return total

    def expected_misses(
        self,
        corrected_us: npt.NDArray[np.float64],
        thresholds_us: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        delayed: Delayed | None = None,
    ) -> npt.NDArray[np.float64]:
        """Expected requests that miss their deadline if the batch about to run is each candidate.

        The risk price of an upgrade is this at the upgraded batch less this at the batch as it
        is (the last candidate). A batch of corrected median ``c`` lasts ``c * ratio + overhead``
        for the recent batches' residuals (:meth:`mosel.tail.TailModel.sample`: the measured
        distribution, its tail included, not one quantile). A job ``j`` misses when the batch
        outlasts its ``thresholds_us[j]`` (the time it can wait: its own deadline for the
        batch's jobs, its slack behind the batch for a queued one). The jobs still to come
        (``delayed``) are delayed by what the candidate adds to the batch as it is, and miss
        as often as recent jobs had less slack than that.

        Args:
            corrected_us: the candidates' corrected medians, shape (C,); the last is the batch
                as it is.
            thresholds_us: per job, the longest the batch may take before the job misses.
            weights: per job, its requests.
            delayed: the jobs still to come that the batch delays (None: none expected).

        Returns:
            Expected missed requests per candidate, shape (C,).
        """
        durations, misses = self._misses_known(corrected_us, thresholds_us, weights)
        if delayed is not None and delayed.jobs > 0.0:
            extra = durations - durations[-1]
            share = delayed.share_missing(extra.ravel()).reshape(extra.shape).mean(axis=1)
            misses = misses + delayed.jobs * delayed.requests * share
        result: npt.NDArray[np.float64] = np.asarray(misses, dtype=np.float64)
        return result

    def first_within(
        self,
        corrected_us: npt.NDArray[np.float64],
        thresholds_us: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        credit: float,
        delayed: Delayed | None = None,
    ) -> tuple[int, float]:
        """The first candidate whose expected misses exceed the last one's by at most ``credit``.

        The last when none does; and by how much. :meth:`expected_misses`'s values to the last
        bit, the jobs still to come priced only for the candidates looked at (usually two).
        """
        durations, misses = self._misses_known(corrected_us, thresholds_us, weights)

        def expected(i: int) -> float:
            if delayed is None or not delayed.jobs > 0.0:
                return float(misses[i])
            share = delayed.share_missing(durations[i] - durations[-1]).mean()
            return float(misses[i] + delayed.jobs * delayed.requests * share)

        last = len(misses) - 1
        floor = expected(last)
        for i in range(last):
            added = expected(i) - floor
            if added <= credit:
                return i, added
        return last, floor - floor

    def _misses_known(
        self,
        corrected_us: npt.NDArray[np.float64],
        thresholds_us: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The candidates' durations over the residuals, (C, S), and the known jobs' expected misses, (C,)."""
        ratios, overheads = self.tail.sample()
        durations = corrected_us[:, None] * ratios[None, :] + overheads[None, :]
        misses: npt.NDArray[np.float64] = outlasting(durations, thresholds_us) @ weights
        return durations, misses

    def merged_latency_us(self, tasks: Sequence[Task]) -> int:
        """Predicted latency of ``tasks`` run as one batch at their current options."""
        if len(tasks) == 1:
            self.refresh(tasks[0])
            return tasks[0].lat[tasks[0].k]
        if self.calibration is not None and any(t.strategy.chain is not None for t in tasks):
            batch = self.batch(tasks[0].job.cost)
            for task in tasks:
                batch.add(task.strategy)
            return batch.latency_us()
        return self.price(list(merged_groups(tasks).items()), tasks[0].job.cost)

    def batch(self, cost: CostModel | None = None) -> BatchLatency:
        """An empty batch whose corrected latency grows as tasks join (for predictions)."""
        return BatchLatency(self, cost)

    def typical_us(self, priced_us: IntArray) -> IntArray:
        """Median times of spans priced ``priced_us`` (vectorised :meth:`TailModel.typical`).

        Options are chosen at the tail price; a job is refused or failed as doomed only when it
        would miss its deadline even at the median (trying costs no more than refusing it).
        """
        tail = self.tail
        if tail.margin == 1.0 and tail.overhead_us == tail.median_overhead_us:
            return priced_us
        typical: IntArray = (
            np.maximum(priced_us - tail.overhead_us, 0.0) / tail.margin + tail.median_overhead_us
        ).astype(np.int64)
        return typical

    @property
    def latency_correction(self) -> float:
        """The online correction as one factor.

        Measured over profiled time of one request on every modality: each part's correction
        weighted by its profiled time, over the parts measured so far (a part no batch ran, e.g.
        a modality no job carried, knows nothing of this device and does not dilute the
        others); 1 before any.
        """
        weights = {p: w for p, w in self._weights.items() if p in self._measured_parts}
        total = sum(weights.values())
        if total <= 0.0:
            return 1.0
        return sum(self.correction[p] * w for p, w in weights.items()) / total

    # ------------------------------------------------------------------ learning

    def observe(
        self,
        batch: Batch,
        measured_us: float,
        parts_us: Mapping[str, float] | None,
        later: Sequence[Mapping[Transition, int]] | None = None,
    ) -> bool:
        """A batch ran in ``measured_us`` (``parts_us``: per branch and fusion, when measured).

        Moves the correction towards the measurement, each part by at most
        :data:`CORRECTION_CLAMP`; returns True when prices moved (then :meth:`reprice`).
        ``later``: the rows its chains escalated, per later stage and transition (their parts
        are predicted at those rows).
        """
        job = batch.tasks[0].job
        groups = batch.merged.groups
        key = (groups, job.bucket)
        predicted: Mapping[str, float] | None = self._parts.data.get(key)
        if predicted is None:
            cost = job.cost or self.cost
            predicted = self._parts.get(key, lambda: cost.parts(groups))
        if later:
            predicted = self._with_later(predicted, job.cost or self.cost, later, batch.merged.n)
        if self._beyond_costs:
            beyond = self._beyond_of(job.cost or self.cost)
            if beyond is not None:
                return self._observe_beyond(batch, measured_us, parts_us, predicted, beyond)
        raw = sum(predicted.values())
        correction = self.correction
        if raw > 0:
            corrected = 0.0  # summed in the parts' order, the same rounding every time
            for part, value in predicted.items():
                corrected += correction[part] * value
            self._measured = (batch, measured_us, corrected, raw)
        if parts_us is None:
            parts_us = {p: measured_us * v / raw for p, v in predicted.items()} if raw else {}
        alpha = self.alpha
        for part, value in predicted.items():
            measured = parts_us.get(part)
            if value > 0 and measured is not None and math.isfinite(measured):
                # One stall (a page fault, a preempted thread) must not swing predictions: each
                # measurement is clamped to a factor of the current level, so the step is bounded
                # but a lasting change of any size is followed.
                self._measured_parts.add(part)
                level = correction[part]
                ratio = min(max(measured / value, level / CORRECTION_CLAMP), level * CORRECTION_CLAMP)
                correction[part] = min(max((1 - alpha) * level + alpha * ratio, 1e-3), 1e6)
        return self._publish(predicted, moved=False)

    def _with_later(
        self,
        predicted: Mapping[str, float],
        cost: CostModel,
        later: Sequence[Mapping[Transition, int]],
        rows: int,
    ) -> Mapping[str, float]:
        """``predicted`` parts and those of the later stages that ran these rows (a batch of ``rows``)."""
        if self.calibration is None:
            return predicted
        total = dict(predicted)
        for part, value in later_parts(cost, later, self.stage_overhead_us(rows)).items():
            total[part] = total.get(part, 0.0) + value
        return total

    def _publish(self, parts: Iterable[str], moved: bool) -> bool:
        """Publish the corrections when ``moved`` or one of ``parts`` moved by over 2%; whether so."""
        if not moved:
            correction, published = self.correction, self._published
            for part in parts:
                if abs(correction[part] / published[part] - 1) > 0.02:
                    moved = True
                    break
        if moved:
            self._published = dict(self.correction)
            self._published_beyond = dict(self.beyond)
            beyond = {f"{m}@{edge}": factor for (m, edge), factor in self.beyond.items()}
            self.stats.set_correction(self.correction | beyond if beyond else self.correction)
        return moved

    def _observe_beyond(
        self,
        batch: Batch,
        measured_us: float,
        parts_us: Mapping[str, float] | None,
        predicted: Mapping[str, float],
        beyond: Mapping[str, tuple[str, int]],
    ) -> bool:
        """:meth:`observe` for a bucket beyond the measured ones.

        Its extrapolated parts move their own (modality, bucket) correction, not the branch's.
        Without a measurement per part, the other parts are taken as priced and the rest of
        the time is the extrapolated parts' (split by their prediction); only they learn.
        """
        correction, own, alpha = self.correction, self.beyond, self.alpha
        factor = {p: own.get(beyond[p], 1.0) if p in beyond else 1.0 for p in predicted}
        expected = {p: correction[p] * v * factor[p] for p, v in predicted.items()}
        if sum(predicted.values()) > 0:
            self._measured = (batch, measured_us, sum(expected.values()), float(sum(predicted.values())))
        if parts_us is None:
            guess = sum(e for p, e in expected.items() if p in beyond)
            rest = max(measured_us - sum(e for p, e in expected.items() if p not in beyond), 0.0)
            parts_us = {p: rest * e / guess for p, e in expected.items() if p in beyond and guess > 0}
        moved = False
        for part, value in predicted.items():
            measured = parts_us.get(part)
            if not (value > 0 and measured is not None and math.isfinite(measured)):
                continue
            key = beyond.get(part)
            if key is None:  # a measured bucket's part: the branch's own correction, as in observe
                self._measured_parts.add(part)
                level = correction[part]
                ratio = min(max(measured / value, level / CORRECTION_CLAMP), level * CORRECTION_CLAMP)
                correction[part] = min(max((1 - alpha) * level + alpha * ratio, 1e-3), 1e6)
                continue
            level = own.pop(key, 1.0)  # re-inserted last: the least recently run is dropped first
            ratio = measured / (correction[part] * value)
            ratio = min(max(ratio, level / CORRECTION_CLAMP), level * CORRECTION_CLAMP)
            own[key] = min(max((1 - alpha) * level + alpha * ratio, 1e-3), 1e6)
            moved = moved or abs(own[key] / self._published_beyond.get(key, 1.0) - 1) > 0.02
            if len(own) > BEYOND_BUCKETS:
                del own[next(iter(own))]
        return self._publish([p for p in predicted if p not in beyond], moved)

    def handed_over(self, batch: Batch, now: float) -> bool:
        """The batch's results were handed over at ``now``: its dispatch overhead is known.

        The overhead is the batch's time from dispatch to hand-over less its measured execution
        (taking the batch, assembling and delivering outputs, thread hand-offs); the tail model
        adds it to every price. Returns True when prices moved (then :meth:`reprice`).
        """
        if self._measured is None or self._measured[0] is not batch:
            return False
        _, measured_us, corrected, raw = self._measured
        self._measured = None
        overhead_us = max((now - batch.started) * 1e6 - measured_us, 0.0)
        return self.tail.observe(measured_us / corrected, measured_us / raw, overhead_us, batch.started)

    def stage_overhead_us(self, rows: int) -> float:
        """The calibrated overhead of one later stage of a batch of ``rows`` rows (0: no calibration)."""
        calibration = self.calibration
        return calibration.overhead_us(rows) if calibration is not None else 0.0

    def stage_budget(self, cost: CostModel | None, finish_by: float, rows: int) -> StageBudget | None:
        """What the executor of a batch of ``rows`` with chains prices its later stages with.

        None: no calibration.
        """
        if self.calibration is None:
            return None
        tail = self.tail
        return StageBudget(
            cost or self.cost, dict(self.correction), tail.margin, self.stage_overhead_us(rows),
            finish_by, tail.overhead_us,
        )  # fmt: skip

    def reprice(self) -> None:
        """Option latencies moved (correction or tail): every cached price is forgotten."""
        self.version += 1
        self._latencies.clear()

    def set_profile(
        self, profile: Profile, priced: Mapping[BucketKey, tuple[Plan, CostModel]] | None = None
    ) -> None:
        """Price with ``profile`` from now on: its accuracies and plans (the latencies are the same).

        The correction and the tail model are kept; the plans and strategies cached are not.
        """
        self.profile = profile
        self.cost = profile.cost_model()
        if self.calibration is not None:
            self.calibration = profile.calibration
        ahead = {self.reference: (profile.plan, self.cost)} | dict(priced or {})
        if self.calibration is not None:  # priced-ahead entries kept as given without one
            ahead = {bucket: (self.chained(plan, cost), cost) for bucket, (plan, cost) in ahead.items()}
        self.reference_plan = ahead[self.reference][0]
        self._plans = Cache(PRICED_CACHE, ahead)
        self._chain_parts.clear()
        self._frontier_parts.clear()
        self._every.clear()
        self.reprice()


class BatchLatency:
    """The corrected latency of a batch being formed, one task at a time, without building it.

    Rows per configuration are kept as running sums, and with them what :meth:`CostModel.parts`
    would make of them: the rows each branch runs and the fusion calls' time (integers, so the
    running sums are exact). The latency of "this batch plus one more task" is then a few table
    lookups, weighed by the correction in :meth:`Pricer.corrected_us`'s order (the same float
    arithmetic, so the same price to the microsecond). Batches with chains, and cost models of
    buckets beyond the measured ones, are priced by :meth:`Pricer.price` itself.
    """

    __slots__ = ("cost", "counts", "fusion", "later", "pricer", "rows")

    def __init__(self, pricer: Pricer, cost: CostModel | None = None) -> None:
        self.pricer = pricer
        self.cost = cost or pricer.cost
        self.counts: dict[Configuration, int] = {}
        self.rows = dict.fromkeys(self.cost.modalities, 0)  # rows per branch, declaration order
        self.fusion = 0  # the fusion calls' time, µs
        self.later = LaterRows()  # the rows its chains may escalate

    def clear(self, cost: CostModel | None = None) -> None:
        """Empty the batch (for jobs of the size bucket of ``cost``, default the reference)."""
        cost = cost or self.pricer.cost
        if cost.modalities is not self.cost.modalities:
            self.rows = dict.fromkeys(cost.modalities, 0)
        else:
            rows = self.rows
            for m in rows:
                rows[m] = 0
        self.cost = cost
        self.counts.clear()
        self.fusion = 0
        if self.later:
            self.later.clear()

    def add(self, strategy: Strategy) -> None:
        """Put a task's rows, at ``strategy``, into the batch."""
        self._put(strategy, 1)
        if strategy.chain is not None:
            self.later.add(strategy.chain, strategy.n)

    def _put(self, strategy: Strategy, sign: int) -> None:
        counts, rows, tables = self.counts, self.rows, self.cost.fusion_us
        for config, count in strategy.groups:
            added = sign * count
            old = counts.get(config, 0)
            counts[config] = old + added
            table = tables[config]
            self.fusion += table[old + added] - table[old]
            for m in config:
                rows[m] += added

    def with_(self, strategy: Strategy) -> int:
        """The batch's corrected latency if a task at ``strategy`` joined it (the batch is unchanged)."""
        groups = strategy.groups
        if strategy.chain is None and len(groups) == 1 and not self.later and not self._beyond():
            ((config, count),) = groups
            old = self.counts.get(config, 0)
            table = self.cost.fusion_us[config]
            fusion = self.fusion + table[old + count] - table[old]
            return self.pricer.tail.price(self._corrected(fusion, config, count))
        self.add(strategy)
        latency = self.latency_us()
        self._put(strategy, -1)
        if strategy.chain is not None:
            self.later.add(strategy.chain, strategy.n, -1)
        return latency

    def latency_us(self) -> int:
        """The batch's corrected latency."""
        pricer = self.pricer
        if self.later:
            corrected = pricer.corrected_us(tuple(self.counts.items()), self.cost, self.later)
            return pricer.tail.price(corrected)
        if self._beyond():
            return pricer.price(tuple(self.counts.items()), self.cost)
        return self.pricer.tail.price(self._corrected(self.fusion, frozenset(), 0))

    def _beyond(self) -> bool:
        pricer = self.pricer
        return bool(pricer._beyond_costs) and pricer._beyond_of(self.cost) is not None

    def swap(self, old: Strategy, new: Strategy) -> None:
        """One task of the batch goes from ``old`` to ``new``."""
        self._put(old, -1)
        if old.chain is not None:
            self.later.add(old.chain, old.n, -1)
        self.add(new)

    def corrected_us(self) -> float | None:
        """:meth:`Pricer.corrected_us` of the batch's rows, to the last bit.

        None when the batch has chains or its cost model lies beyond the measured buckets: ask
        the pricer then.
        """
        if self.later or self._beyond():
            return None
        return self._corrected(self.fusion, frozenset(), 0)

    def _corrected(self, fusion: int, config: Configuration, count: int) -> float:
        """The corrected median of the batch's rows and ``fusion``, ``count`` more rows in ``config``.

        :meth:`Pricer.corrected_us`'s arithmetic in its order: fusion first, then each branch
        that runs, in declaration order.
        """
        correction = self.pricer.correction
        branch = self.cost.branch_us
        total = correction["fusion"] * fusion
        for m, k in self.rows.items():
            runs = k + count if m in config else k
            if runs:
                total += correction[m] * branch[m][runs]
        return total
