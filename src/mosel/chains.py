"""Escalation chains as options: in the plan's frontiers, what their later stages cost, which rows go on.

* :func:`with_chains`: every chain the calibration allows (A ⊂ B, and A ⊂ B ⊂ C, at every pair
  of confidence cuts) priced for each job size and merged into the plan's frontiers beside the
  static strategies; a chain is a strategy like any other (its ``groups`` are its first stage,
  its ``chain`` the rest), so admission, repair, late binding and the risk price treat it unchanged.
  Each is credited (:func:`credited`) its validation accuracy less :data:`FIT_Z` standard errors
  of its gap to its final configuration: picked among hundreds of cuts on the rows that measured
  them, the cheapest chain to clear a floor is the most optimistic.
* the cost rule of the later stages (:func:`later_parts`): per stage, each branch that a
  transition adds runs once over the rows that escalate, fusion once per target configuration,
  plus the stage's own overhead. The rows that escalate are random (Binomial over a job's rows
  at the calibrated share); a price counts them at the ``z`` quantile of their normal
  approximation (:class:`LaterRows`, summed over a merged batch's chains), not their mean.
* :func:`select_rows`: which rows escalate when not every row below its threshold fits the
  batch's remaining time: the highest expected gain per microsecond first.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np
import numpy.typing as npt

from mosel.escalation import Calibration, Chain
from mosel.plan import CostModel, Frontier, Plan, Strategy, accuracy_units

__all__ = [
    "ESCALATION",
    "FIT_Z",
    "Escalated",
    "LaterRows",
    "StageBudget",
    "Transition",
    "credited",
    "later_parts",
    "select_rows",
    "with_chains",
]

Configuration = frozenset[str]
Transition = tuple[Configuration, Configuration]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ESCALATION: Final = "escalation"
"""The cost part of the later stages' own work (confidences, choosing rows, gathers and scatters)."""
FIT_Z: Final = 0.5
"""Standard errors of its gap to its final configuration that a chain's credited accuracy loses."""


def _interpolated(table: Sequence[int], rows: float) -> float:
    """A latency table at a fractional number of rows (linear between its entries)."""
    if rows <= 0.0:
        return 0.0
    low = min(int(rows), len(table) - 1)
    high = min(low + 1, len(table) - 1)
    return table[low] + (rows - low) * (table[high] - table[low])


def later_parts(
    cost: CostModel, stages: Sequence[Mapping[Transition, float]], overhead_us: float
) -> dict[str, float]:
    """What the later stages of a batch run, in microseconds per part.

    ``stages``: per later stage, rows per transition (fractional: a quantile). In each stage
    every branch a transition adds runs once over all the rows that need it, fusion once per
    target configuration, and the stage costs ``overhead_us`` besides (part
    :data:`ESCALATION`, charged in proportion up to one row).
    """
    parts: dict[str, float] = {}
    for stage in stages:
        branch: dict[str, float] = {}
        fusion: dict[Configuration, float] = {}
        total = 0.0
        for (lower, upper), rows in stage.items():
            if rows <= 0.0:
                continue
            total += rows
            for m in upper - lower:
                branch[m] = branch.get(m, 0.0) + rows
            fusion[upper] = fusion.get(upper, 0.0) + rows
        if total <= 0.0:
            continue
        for m in cost.modalities:
            if m in branch:
                parts[m] = parts.get(m, 0.0) + _interpolated(cost.branch_us[m], branch[m])
        for upper, rows in fusion.items():
            parts["fusion"] = parts.get("fusion", 0.0) + _interpolated(cost.fusion_us[upper], rows)
        parts[ESCALATION] = parts.get(ESCALATION, 0.0) + overhead_us * min(1.0, total)
    return parts


def quantile_rows(mean: float, var: float, cap: float, z: float) -> float:
    """Escalated rows at the ``z`` quantile (normal approximation), at most ``cap``."""
    return min(cap, mean + z * math.sqrt(max(var, 0.0)))


class LaterRows:
    """The rows a batch's chains escalate, per (stage, transition): their mean, variance and most."""

    __slots__ = ("cap", "mean", "var")

    def __init__(self) -> None:
        self.mean: dict[tuple[int, Configuration, Configuration], float] = {}
        self.var: dict[tuple[int, Configuration, Configuration], float] = {}
        self.cap: dict[tuple[int, Configuration, Configuration], int] = {}

    def __bool__(self) -> bool:
        return bool(self.cap)

    def add(self, chain: Chain, n: int, sign: int = 1) -> None:
        """Count (or with ``sign=-1``, uncount) ``n`` rows of ``chain``."""
        for t, share in enumerate(chain.shares):
            key = (t, chain.stages[t], chain.stages[t + 1])
            cap = self.cap.get(key, 0) + sign * n
            if cap <= 0:
                self.cap.pop(key, None)
                self.mean.pop(key, None)
                self.var.pop(key, None)
                continue
            self.cap[key] = cap
            self.mean[key] = self.mean.get(key, 0.0) + sign * n * share
            self.var[key] = self.var.get(key, 0.0) + sign * n * share * (1.0 - share)

    def clear(self) -> None:
        """Forget every row."""
        self.mean.clear()
        self.var.clear()
        self.cap.clear()

    def stages(self, z: float) -> list[dict[Transition, float]]:
        """Rows per transition in each later stage, at the ``z`` quantile."""
        out: list[dict[Transition, float]] = []
        for (t, lower, upper), mean in self.mean.items():
            while len(out) <= t:
                out.append({})
            out[t][(lower, upper)] = quantile_rows(
                mean, self.var[(t, lower, upper)], self.cap[(t, lower, upper)], z
            )
        return out


def strategy_stages(strategy: Strategy, z: float) -> list[dict[Transition, float]]:
    """The later stages of one strategy, at the ``z`` quantile (none for a static strategy)."""
    chain = strategy.chain
    if chain is None:
        return []
    rows = LaterRows()
    rows.add(chain, strategy.n)
    return rows.stages(z)


@dataclass(frozen=True, slots=True)
class StageBudget:
    """What the executor of a batch with chains needs to decide, stage by stage, which rows go on.

    Attributes:
        cost: the batch's size bucket's cost model.
        correction: the online correction per part when the batch was launched (a copy).
        margin: the tail model's margin on corrected times.
        overhead_us: the calibrated overhead of one later stage of this batch's size (part
            :data:`ESCALATION`).
        finish_by: when the batch must be done (the scheduler's clock, seconds): its jobs'
            earliest deadline, and no later than the queued jobs' slack allows (never before its
            own price).
        reserve_us: time kept for handing the results over (the tail model's dispatch overhead).
    """

    cost: CostModel
    correction: Mapping[str, float]
    margin: float
    overhead_us: float
    finish_by: float
    reserve_us: float

    def price_us(self, stage: Mapping[Transition, float]) -> float:
        """The price of one later stage with these rows per transition."""
        parts = later_parts(self.cost, [stage], self.overhead_us)
        correction = self.correction
        return self.margin * sum(correction.get(p, 1.0) * v for p, v in parts.items())

    def budget_us(self, now: float) -> float:
        """The time a later stage starting ``now`` may take."""
        return (self.finish_by - now) * 1e6 - self.reserve_us


@dataclass(frozen=True, slots=True)
class Escalated:
    """What a batch's chains did, for the online correction and the statistics.

    Attributes:
        stages: per later stage, the rows escalated per transition.
        first: per configuration a chain started with, the batch's rows per confidence bin
            (the calibration's bins): set against the validation rows', a label-free drift signal.
        decisions: per transition (0: after the first stage), the rows whose confidence was read,
            those below their threshold, those escalated (fewer when the time ran short), and how
            many the calibration expected below.
    """

    stages: tuple[Mapping[Transition, int], ...]
    first: Mapping[Configuration, tuple[int, ...]]
    decisions: tuple[tuple[int, int, int, float], ...]


def select_rows(
    transitions: Sequence[Transition],
    which: IntArray,
    gains: FloatArray,
    budget_us: float,
    price: Callable[[Mapping[Transition, float]], float],
) -> npt.NDArray[np.bool_]:
    """Which of the candidate rows escalate within ``budget_us``.

    Args:
        transitions: the transitions the candidates take.
        which: per candidate row, the index of its transition.
        gains: per candidate row, its expected score gain (calibrated, from its confidence bin).
        budget_us: the time the stage may take.
        price: a stage's price for rows per transition.

    Every candidate escalates when they all fit; otherwise the rows with the highest expected
    gain per microsecond (each transition's price per row) first, as many as fit, none with no
    expected gain.
    """
    counts = np.bincount(which, minlength=len(transitions))
    everything = {transitions[i]: float(k) for i, k in enumerate(counts) if k}
    if not everything:
        return np.zeros(len(which), dtype=bool)
    if price(everything) <= budget_us:
        return np.ones(len(which), dtype=bool)
    per_row = np.array(
        [price({t: float(k)}) / k if k else math.inf for t, k in zip(transitions, counts.tolist())]
    )
    value = gains / np.maximum(per_row[which], 1e-9)
    order = np.argsort(-value, kind="stable")
    order = order[value[order] > 0.0]
    low, high = 0, len(order)  # the longest prefix of ``order`` whose price fits
    while low < high:
        mid = (low + high + 1) // 2
        prefix = np.bincount(which[order[:mid]], minlength=len(transitions))
        if price({transitions[i]: float(k) for i, k in enumerate(prefix) if k}) <= budget_us:
            low = mid
        else:
            high = mid - 1
    chosen = np.zeros(len(which), dtype=bool)
    chosen[order[:low]] = True
    return chosen


# ----------------------------------------------------------------------------------------------
# chains in the frontiers


@dataclass(frozen=True, slots=True)
class _Family:
    """Every chain of one sequence of configurations, over its grid of confidence cuts."""

    stages: tuple[Configuration, ...]
    cuts: IntArray  # (F, T)
    shares: FloatArray  # (F, T)
    accuracy: FloatArray  # (F,): on the validation rows
    spread: FloatArray  # (F,): the standard error of its gap to its final configuration
    units: IntArray  # (F,): accuracy units per request, as credited (:func:`credited`)

    @classmethod
    def of(
        cls,
        stages: tuple[Configuration, ...],
        cuts: IntArray,
        shares: FloatArray,
        accuracy: FloatArray,
        spread: FloatArray,
    ) -> _Family:
        accuracy = np.clip(accuracy, 0.0, 1.0)
        units = np.asarray([accuracy_units(a) for a in credited(accuracy, spread).tolist()], dtype=np.int64)
        return cls(stages, cuts, shares, accuracy, spread, units)


def credited(accuracy: FloatArray, spread: FloatArray) -> FloatArray:
    """The accuracy a chain is credited: its validation accuracy less :data:`FIT_Z` standard errors."""
    out: FloatArray = np.clip(accuracy - FIT_Z * spread, 0.0, 1.0)
    return out


def _variance(rows: FloatArray, low: FloatArray, high: FloatArray) -> FloatArray:
    """Per bin, the variance of the summed score gap of ``rows`` rows between two configurations.

    ``low`` and ``high``: the bin's summed scores under each. Each row's gap counted as the
    difference of two independent scores at the bin's means (``p(1 - p)`` each, the most a score
    in [0, 1] of that mean can vary): the bins keep no row's pair of scores.
    """
    k = np.maximum(rows, 1.0)
    p, q = np.clip(low / k, 0.0, 1.0), np.clip(high / k, 0.0, 1.0)
    out: FloatArray = rows * (p * (1.0 - p) + q * (1.0 - q))
    return out


def _families(calibration: Calibration, configurations: Sequence[Configuration]) -> list[_Family]:
    """The chains among ``configurations``: two stages at every cut, three at every pair of cuts."""
    rows = calibration.rows
    out = []
    for a in configurations:
        k = calibration.bins(a)
        if k < 2:
            continue
        per_bin = np.asarray(calibration.counts[a], dtype=np.float64)
        counts = np.cumsum(per_bin)
        own = np.asarray(calibration.scores[(a, a)])
        kept = own.sum() - np.cumsum(own)  # A's score over the bins at or above each cut
        cuts = np.arange(1, k)
        for b in configurations:
            if not a < b:
                continue
            above = np.cumsum(calibration.scores[(a, b)])
            accuracy = (kept[cuts - 1] + above[cuts - 1]) / rows
            shares = counts[cuts - 1] / rows
            gap = _variance(per_bin, own, np.asarray(calibration.scores[(a, b)]))
            spread = np.sqrt(np.maximum(gap.sum() - np.cumsum(gap)[cuts - 1], 0.0)) / rows  # rows A keeps
            out.append(_Family.of((a, b), cuts[:, None], shares[:, None], accuracy, spread))
            for c in configurations:
                if b < c and (a, b) in calibration.joint_counts:
                    out.append(_three(calibration, a, b, c, counts, kept))
    return out


def _three(
    calibration: Calibration,
    a: Configuration,
    b: Configuration,
    c: Configuration,
    counts: FloatArray,
    kept: FloatArray,
) -> _Family:
    """The chains A -> B -> C over every pair of cuts (A's cut, then B's among A's escalated rows)."""
    ka, kb = calibration.bins(a), calibration.bins(b)

    def prefix(values: Sequence[float] | FloatArray) -> FloatArray:
        summed: FloatArray = np.asarray(values, dtype=np.float64).reshape(ka, kb).cumsum(0).cumsum(1)
        return summed

    cells = np.asarray(calibration.joint_counts[(a, b)], dtype=np.float64)
    joint = prefix(cells)
    middle = prefix(calibration.joint_scores[(a, b, b)])
    top = prefix(calibration.joint_scores[(a, b, c)])
    grid = np.meshgrid(np.arange(1, ka), np.arange(1, kb), indexing="ij")
    first, second = grid[0].ravel(), grid[1].ravel()
    i, j = first - 1, second - 1
    accuracy = (kept[i] + middle[i, kb - 1] - middle[i, j] + top[i, j]) / calibration.rows
    shares = np.stack([counts[i] / calibration.rows, joint[i, j] / calibration.rows], axis=1)
    # the gap to C: of the rows A keeps (A's bins at or above its cut), and of those B keeps
    at_a = np.cumsum(
        _variance(
            np.asarray(calibration.counts[a], dtype=np.float64),
            np.asarray(calibration.scores[(a, a)]),
            np.asarray(calibration.scores[(a, c)]),
        )
    )
    at_b = prefix(
        _variance(
            cells,
            np.asarray(calibration.joint_scores[(a, b, b)]),
            np.asarray(calibration.joint_scores[(a, b, c)]),
        )
    )
    variance = at_a[ka - 1] - at_a[i] + at_b[i, kb - 1] - at_b[i, j]
    spread = np.sqrt(np.maximum(variance, 0.0)) / calibration.rows
    return _Family.of((a, b, c), np.stack([first, second], axis=1), shares, accuracy, spread)


def _latencies(family: _Family, cost: CostModel, n: int, z: float, overhead_us: float) -> IntArray:
    """Every chain of ``family`` for a job of ``n`` rows, priced as :func:`later_parts` prices it."""
    total = np.full(len(family.accuracy), float(cost.latency_us(((family.stages[0], n),))))
    for t in range(len(family.stages) - 1):
        share = family.shares[:, t]
        rows = np.minimum(float(n), n * share + z * np.sqrt(np.maximum(n * share * (1.0 - share), 0.0)))
        lower, upper = family.stages[t], family.stages[t + 1]
        tables = [cost.branch_us[m] for m in cost.modalities if m in upper - lower] + [cost.fusion_us[upper]]
        for table in tables:
            values = np.asarray(table, dtype=np.float64)
            low = np.minimum(np.floor(rows).astype(np.int64), len(values) - 1)
            high = np.minimum(low + 1, len(values) - 1)
            total += values[low] + (rows - low) * (values[high] - values[low])
        total += overhead_us * np.minimum(1.0, rows)
    latencies: IntArray = np.ceil(total - 1e-9).astype(np.int64)
    return latencies


def _chain(calibration: Calibration, family: _Family, row: int) -> Chain:
    stages = family.stages
    return Chain(
        stages=stages,
        cuts=tuple(int(c) for c in family.cuts[row]),
        edges=tuple(calibration.edges[s] for s in stages[:-1]),
        gains=tuple(calibration.gains(lower, upper) for lower, upper in itertools.pairwise(stages)),
        shares=tuple(float(s) for s in family.shares[row]),
        accuracy=min(
            float(credited(family.accuracy[row : row + 1], family.spread[row : row + 1])[0]),
            _ceiling(calibration, family),
        ),
        rows=calibration.rows,
    )


def _ceiling(calibration: Calibration, family: _Family) -> float:
    """The most a chain is credited: its final configuration's own accuracy.

    A chain that seems to beat its final configuration on the validation rows does so by their
    noise, mostly (its first stage's confident answers are those the final one also gets right):
    credited above it, such a chain would take the top of a frontier at a higher price and serve
    every upgraded job with it.
    """
    return calibration.accuracy(family.stages[-1])


def with_chains(plan: Plan, cost: CostModel, calibration: Calibration, z: float) -> Plan:
    """``plan`` with the chains the calibration allows merged into every frontier.

    Each frontier becomes the Pareto-optimal subset of its static strategies and the chains
    over its available modalities, each chain priced for the frontier's job size by
    :func:`later_parts` at the ``z`` quantile of its escalated rows, each later stage at the
    calibration's overhead for a batch of that size. A static strategy wins a tie. The frontiers
    stay exact for static strategies and these chains.
    """
    families: dict[Configuration, list[_Family]] = {}
    made: dict[tuple[Configuration, int, int], Chain] = {}  # (available, family, row): one chain object each
    frontiers = {}
    for (available, n), frontier in plan.frontiers.items():
        if available not in families:
            configurations = [c for c in cost.configurations(available) if c in calibration.edges]
            families[available] = _families(calibration, configurations)
        overhead = calibration.overhead_us(n)  # a job of n rows runs its later stages in a batch of n
        frontiers[(available, n)] = _merged(
            frontier, families[available], cost, n, z, overhead, calibration, made
        )
    return dataclasses.replace(plan, frontiers=MappingProxyType(frontiers))


def _merged(
    frontier: Frontier,
    families: list[_Family],
    cost: CostModel,
    n: int,
    z: float,
    overhead_us: float,
    calibration: Calibration,
    made: dict[tuple[Configuration, int, int], Chain],
) -> Frontier:
    if not families:
        return frontier
    latency = [np.asarray([s.latency_us for s in frontier.strategies], dtype=np.int64)]
    units = [np.asarray([s.accuracy_units for s in frontier.strategies], dtype=np.int64)]
    owner = [np.full(len(frontier.strategies), -1, dtype=np.int64)]
    rows = [np.arange(len(frontier.strategies), dtype=np.int64)]
    for f, family in enumerate(families):
        latency.append(_latencies(family, cost, n, z, overhead_us))
        units.append(np.minimum(family.units, accuracy_units(_ceiling(calibration, family))) * n)
        owner.append(np.full(len(family.accuracy), f, dtype=np.int64))
        rows.append(np.arange(len(family.accuracy), dtype=np.int64))
    lat, acc = np.concatenate(latency), np.concatenate(units)
    who, row = np.concatenate(owner), np.concatenate(rows)
    order = np.lexsort((np.arange(len(lat)), -acc, lat))
    running = np.maximum.accumulate(acc[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = acc[order][1:] > running[:-1]
    strategies = []
    for i in order[keep].tolist():
        if who[i] < 0:
            strategies.append(frontier.strategies[int(row[i])])
            continue
        key = (frontier.available, int(who[i]), int(row[i]))
        chain = made.get(key)
        if chain is None:
            chain = made[key] = _chain(calibration, families[key[1]], key[2])
        strategies.append(Strategy(((chain.first, n),), int(lat[i]), int(acc[i]), chain=chain))
    return Frontier(frontier.available, n, tuple(strategies), frontier.exact)
