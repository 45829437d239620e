"""The offline planner: for every job size, the exact Pareto frontier of modality strategies.

A *strategy* for a job of ``n`` requests says how many requests get each configuration. Its cost
under the :class:`CostModel` is one gathered sub-batch per branch plus one fusion call per
configuration group::

    latency_us(x) = sum_m L_m(sum_{c ∋ m} x_c) + sum_c F_c(x_c)
    accuracy(x)   = sum_c A_c x_c / n

The frontier of size ``n`` lists the strategies no other strategy beats on both latency and
accuracy. It is built in two steps, both exact with respect to integer microseconds and integer
accuracy units (``ACCURACY_SCALE`` per request):

1. candidates: every strategy that mixes at most ``PlannerConfig.candidate_support``
   configurations, evaluated with numpy; their staircase is a lower bound of the frontier;
2. proof: one CP-SAT model asks for any strategy strictly above that staircase; each one found is
   added and the question is asked again, until CP-SAT proves there is none.

OR-Tools is imported here and nowhere else, and only when a plan is built.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from mosel.jsonvalues import json_bool, json_dict, json_field, json_float, json_int, json_list, json_str, show

if TYPE_CHECKING:
    from mosel.escalation import Chain

__all__ = [
    "ACCURACY_SCALE",
    "CostModel",
    "Frontier",
    "Plan",
    "PlannerConfig",
    "Strategy",
    "brute_force_frontier",
    "build_plan",
    "solve_frontier",
]

ACCURACY_SCALE: Final = 1_000_000
"""Integer accuracy units per request: 1.0 accuracy = 1,000,000 units (parts per million)."""

_INT64_MAX: Final = 2**63 - 1
"""Largest latency in microseconds a plan may hold (the planner computes in int64)."""

Configuration = frozenset[str]
IntArray = npt.NDArray[np.int64]

_log = logging.getLogger("mosel")


def configuration_key(configuration: Configuration, order: Sequence[str]) -> str:
    """The text form of a configuration, modalities in declaration order: ``"audio+video"``."""
    return "+".join(m for m in order if m in configuration)


def parse_configuration(text: str, modalities: Sequence[str]) -> Configuration:
    """Inverse of :func:`configuration_key`; ValueError for an empty or unknown configuration."""
    configuration = frozenset(str(text).split("+"))
    if not configuration or not configuration <= set(modalities):
        raise ValueError(f"unknown configuration {show(text)}; modalities are {list(modalities)}")
    return configuration


def accuracy_units(accuracy: float) -> int:
    """Accuracy as integer units per request (the planner's and the lookup's resolution).

    Rounded *down* from the number's shortest decimal form, so that a strategy's units never
    claim more than its measured accuracy: 0.6999996 is 699,999 units and does not meet a 0.7
    floor, while 0.29 is exactly 290,000.

    Raises:
        ValueError: ``accuracy`` is not a finite number in [0, 1].
    """
    if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
        raise ValueError(f"accuracy must be a finite number in [0, 1], got {show(accuracy)}")
    return math.floor(Fraction(repr(float(accuracy))) * ACCURACY_SCALE)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Integer tables the planner optimises over.

    Attributes:
        modalities: modality names, in the model's declaration order.
        branch_us: modality -> latency in microseconds of the branch over ``b`` rows, for
            ``b = 0..max_batch_size`` (entry 0 is 0).
        fusion_us: configuration -> latency of one fusion call over ``b`` rows (entry 0 is 0).
        accuracy: configuration -> accuracy units per request (``ACCURACY_SCALE`` = 100%).
    """

    modalities: tuple[str, ...]
    branch_us: Mapping[str, tuple[int, ...]]
    fusion_us: Mapping[Configuration, tuple[int, ...]]
    accuracy: Mapping[Configuration, int]

    @property
    def max_batch_size(self) -> int:
        """Largest job size the tables cover."""
        return len(next(iter(self.branch_us.values()))) - 1

    def configurations(self, available: Configuration) -> tuple[Configuration, ...]:
        """Configurations that use only ``available`` modalities, smallest first, in declaration order."""
        names = [m for m in self.modalities if m in available]
        return tuple(frozenset(c) for r in range(1, len(names) + 1) for c in itertools.combinations(names, r))

    def parts(self, groups: Iterable[tuple[Configuration, int]]) -> dict[str, int]:
        """What a strategy (or a batch) runs, in microseconds per part.

        Each branch runs once over every row whose configuration holds it, and fusion once per
        configuration: one entry per branch that runs (in declaration order), then
        ``"fusion"``, the fusion calls together. The one rule for what a strategy costs: its
        latency is their sum, a corrected price weighs each part by its own correction.
        """
        rows = dict.fromkeys(self.modalities, 0)
        fusion = 0
        for config, count in groups:
            if count:
                fusion += self.fusion_us[config][count]
                for m in config:
                    rows[m] += count
        parts = {m: self.branch_us[m][k] for m, k in rows.items() if k}
        parts["fusion"] = fusion
        return parts

    def latency_us(self, groups: Iterable[tuple[Configuration, int]]) -> int:
        """Predicted latency of a strategy given as (configuration, count) pairs."""
        return sum(self.parts(groups).values())

    def accuracy_units(self, groups: Iterable[tuple[Configuration, int]]) -> int:
        """Sum of accuracy units over the strategy's requests."""
        return sum(self.accuracy[c] * count for c, count in groups)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (configurations as ``"a+b"`` keys)."""

        def key(config: Configuration) -> str:
            return configuration_key(config, self.modalities)

        return {
            "modalities": list(self.modalities),
            "branch_us": {m: list(t) for m, t in self.branch_us.items()},
            "fusion_us": {key(c): list(t) for c, t in self.fusion_us.items()},
            "accuracy": {key(c): a for c, a in self.accuracy.items()},
        }

    def digest(self) -> str:
        """A stable hash of the tables, used to tie a saved plan to its cost model."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Strategy:
    """How many requests of a job get each configuration, with its predicted cost.

    ``groups`` lists the non-empty configuration groups in execution order: rows are assigned to
    groups in this order, which keeps each branch's rows contiguous where possible.

    An escalation chain (``chain``, see :mod:`mosel.escalation`) runs its first configuration on
    every row (its one group) and the later ones on the rows whose confidence is too low;
    ``latency_us`` then prices the escalated rows at a quantile, and ``accuracy_units`` is the
    calibrated expectation. Plans are saved without chains: they are added where a profile with
    a calibration is served (:func:`mosel.chains.with_chains`).
    """

    groups: tuple[tuple[Configuration, int], ...]
    latency_us: int
    accuracy_units: int
    chain: Chain | None = None

    @property
    def n(self) -> int:
        """Number of requests."""
        return sum(count for _, count in self.groups)

    @property
    def expected_accuracy(self) -> float:
        """Request-weighted expected accuracy, from the profile."""
        return self.accuracy_units / (self.n * ACCURACY_SCALE)

    @property
    def predicted_latency_ms(self) -> float:
        """Predicted execution time in milliseconds."""
        return self.latency_us / 1000.0


@dataclass(frozen=True, slots=True)
class Frontier:
    """The Pareto frontier for one job size and one set of available modalities.

    ``strategies`` are sorted by latency, and accuracy strictly increases along them.
    ``exact`` is False only when CP-SAT ran out of time before proving the frontier complete.
    """

    available: Configuration
    n: int
    strategies: tuple[Strategy, ...]
    exact: bool = True
    _latency: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _accuracy: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_latency", tuple(s.latency_us for s in self.strategies))
        object.__setattr__(self, "_accuracy", tuple(s.accuracy_units for s in self.strategies))

    @property
    def best(self) -> Strategy:
        """The most accurate strategy."""
        return self.strategies[-1]

    def best_within(self, budget_us: float) -> Strategy | None:
        """The most accurate strategy predicted to take at most ``budget_us``, or None."""
        i = bisect.bisect_right(self._latency, budget_us) - 1
        return self.strategies[i] if i >= 0 else None

    def cheapest_meeting(self, floor_units: int) -> Strategy | None:
        """The fastest strategy whose accuracy units reach ``floor_units``, or None."""
        i = self.index_meeting(floor_units)
        return self.strategies[i] if i < len(self.strategies) else None

    def index_meeting(self, floor_units: int) -> int:
        """Index of the fastest strategy reaching ``floor_units`` (``len(strategies)`` if none)."""
        return bisect.bisect_left(self._accuracy, floor_units)

    @property
    def accuracy_units(self) -> tuple[int, ...]:
        """Each strategy's accuracy units, in order."""
        return self._accuracy

    def points(self) -> list[tuple[int, int]]:
        """(latency_us, accuracy_units) of every strategy, for comparisons."""
        return list(zip(self._latency, self._accuracy))


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """Knobs of the offline planner.

    Attributes:
        time_limit_s: CP-SAT time limit for one proof; past it the frontier is kept, marked inexact.
        workers: threads solving job sizes in parallel (CP-SAT releases the GIL); None = CPU count.
        seed: CP-SAT random seed (each proof runs on one CP-SAT worker, so plans are deterministic).
        candidate_support: candidates mix at most this many configurations.
    """

    time_limit_s: float = 10.0
    workers: int | None = None
    seed: int = 0
    candidate_support: int = 3


@dataclass(frozen=True, slots=True)
class Plan:
    """Frontiers for every job size ``1..max_batch_size`` and every set of available modalities."""

    modalities: tuple[str, ...]
    max_batch_size: int
    frontiers: Mapping[tuple[Configuration, int], Frontier]
    cost_model_digest: str
    build_seconds: float = 0.0

    @property
    def exact(self) -> bool:
        """True when every frontier was proven complete."""
        return all(f.exact for f in self.frontiers.values())

    def frontier(self, available: Configuration, n: int) -> Frontier:
        """The frontier for ``n`` requests that carry the ``available`` modalities."""
        return self.frontiers[(available, n)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""

        def key(config: Configuration) -> str:
            return configuration_key(config, self.modalities)

        return {
            "modalities": list(self.modalities),
            "max_batch_size": self.max_batch_size,
            "cost_model_digest": self.cost_model_digest,
            "build_seconds": self.build_seconds,
            "frontiers": [
                {
                    "available": key(f.available),
                    "n": f.n,
                    "exact": f.exact,
                    "strategies": [
                        [[[key(c), k] for c, k in s.groups], s.latency_us, s.accuracy_units]
                        for s in f.strategies
                    ],
                }
                for f in self.frontiers.values()
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        """Inverse of :meth:`to_json`.

        Checks the shape and types of ``data`` strictly (integers where integers belong, each
        frontier once) but not its numbers: :meth:`verify` checks those against a cost model.

        Raises:
            ValueError: ``data`` is malformed; the message names the field.
        """
        data = json_dict(data, "plan")
        modalities = tuple(
            json_str(m, "plan.modalities[]")
            for m in json_list(json_field(data, "modalities", "plan"), "plan.modalities")
        )
        max_batch = json_int(json_field(data, "max_batch_size", "plan"), "plan.max_batch_size", low=1)

        def config(text: object, what: str) -> Configuration:
            return parse_configuration(json_str(text, what), modalities)

        frontiers: dict[tuple[Configuration, int], Frontier] = {}
        for i, item in enumerate(json_list(json_field(data, "frontiers", "plan"), "plan.frontiers")):
            where = f"plan.frontiers[{i}]"
            f = json_dict(item, where)
            available = config(json_field(f, "available", where), f"{where}.available")
            n = json_int(json_field(f, "n", where), f"{where}.n", low=1, high=max_batch)
            name = frontier_name(available, n, modalities)
            strategies = []
            for j, entry in enumerate(json_list(json_field(f, "strategies", where), f"{name}.strategies")):
                what = f"{name}.strategies[{j}]"
                groups, latency, accuracy = json_list(entry, what, length=3)
                pairs = []
                for group in json_list(groups, f"{what}.groups"):
                    c, k = json_list(group, f"{what}.groups[]", length=2)
                    count = json_int(k, f"{what}.groups[] count", low=1, high=n)
                    pairs.append((config(c, f"{what}.groups[]"), count))
                strategies.append(
                    Strategy(
                        tuple(pairs),
                        json_int(latency, f"{what} latency_us", low=0, high=_INT64_MAX),
                        json_int(accuracy, f"{what} accuracy_units", low=0, high=n * ACCURACY_SCALE),
                    )
                )
            if not strategies:
                raise ValueError(f"{name} has no strategies")
            if (available, n) in frontiers:
                raise ValueError(f"{name} appears twice")
            exact = json_bool(json_field(f, "exact", where), f"{name}.exact")
            frontiers[(available, n)] = Frontier(available, n, tuple(strategies), exact)
        return cls(
            modalities=modalities,
            max_batch_size=max_batch,
            frontiers=MappingProxyType(frontiers),
            cost_model_digest=json_str(
                json_field(data, "cost_model_digest", "plan"), "plan.cost_model_digest"
            ),
            build_seconds=json_float(
                json_field(data, "build_seconds", "plan"), "plan.build_seconds", low=0.0
            ),
        )

    def verify(self, cost: CostModel) -> None:
        """Check every frontier against ``cost``, in time linear in the plan's size.

        Every (available, n) for each non-empty set of modalities and ``n = 1..max_batch_size``
        must have one frontier, whose strategies split exactly ``n`` requests between distinct
        configurations of ``available``, carry the latency and accuracy ``cost`` gives them, grow
        strictly in both, and end at the best accuracy ``available`` reaches.  This catches a plan
        edited by hand; it does not prove the frontier complete (only rebuilding does).

        Raises:
            ValueError: the plan does not fit ``cost``; the message names the frontier.
        """
        if self.modalities != cost.modalities or self.max_batch_size != cost.max_batch_size:
            raise ValueError(
                f"the plan is for modalities {list(self.modalities)} and sizes 1..{self.max_batch_size}, "
                f"the tables for {list(cost.modalities)} and 1..{cost.max_batch_size}"
            )
        everything = frozenset(cost.modalities)
        for (available, n), frontier in self.frontiers.items():
            if (frontier.available, frontier.n) != (available, n) or not available <= everything:
                raise ValueError(
                    f"the plan files {frontier_name(frontier.available, frontier.n, cost.modalities)}"
                    f" under available={sorted(available)}, n={n}"
                )
            if not 1 <= n <= self.max_batch_size:
                raise ValueError(
                    f"the plan has a {frontier_name(available, n, cost.modalities)} beyond "
                    f"max_batch_size {self.max_batch_size}"
                )
            _verify_frontier(cost, frontier)
        for available in cost.configurations(everything):
            for n in range(1, self.max_batch_size + 1):
                if (available, n) not in self.frontiers:
                    raise ValueError(f"the plan has no {frontier_name(available, n, cost.modalities)}")


def frontier_name(available: Configuration, n: int, modalities: Sequence[str]) -> str:
    """How error messages name a frontier: ``frontier (available='audio+video', n=4)``."""
    return f"frontier (available={configuration_key(available, modalities)!r}, n={n})"


def _verify_frontier(cost: CostModel, frontier: Frontier) -> None:  # noqa: C901 (one check per way a tampered frontier can lie, in the order read)
    name = frontier_name(frontier.available, frontier.n, cost.modalities)

    def key(config: Configuration) -> str:
        return configuration_key(config, cost.modalities)

    if not frontier.strategies:
        raise ValueError(f"{name} has no strategies")
    previous: Strategy | None = None
    for i, strategy in enumerate(frontier.strategies):
        what = f"{name}, strategy {i}"
        configs = [c for c, _ in strategy.groups]
        outside = [key(c) for c in configs if not c <= frontier.available]
        if outside:
            raise ValueError(f"{what} uses {outside[0]!r}, a configuration outside the available modalities")
        if len(set(configs)) != len(configs):
            raise ValueError(f"{what} lists a configuration twice: {[key(c) for c in configs]}")
        counts = [k for _, k in strategy.groups]
        if any(k < 1 for k in counts) or sum(counts) != frontier.n:
            raise ValueError(f"{what} has counts {counts}; they must be positive and sum to {frontier.n}")
        latency = cost.latency_us(strategy.groups)
        if strategy.latency_us != latency:
            raise ValueError(f"{what} claims latency {strategy.latency_us} us; the tables give {latency} us")
        accuracy = cost.accuracy_units(strategy.groups)
        if strategy.accuracy_units != accuracy:
            raise ValueError(
                f"{what} claims {strategy.accuracy_units} accuracy units; the tables give {accuracy}"
            )
        if previous is not None and not (
            strategy.latency_us > previous.latency_us and strategy.accuracy_units > previous.accuracy_units
        ):
            raise ValueError(
                f"{what} (latency {strategy.latency_us} us, {strategy.accuracy_units} accuracy units) does "
                f"not improve on the one before it ({previous.latency_us} us, {previous.accuracy_units}); "
                f"a frontier grows strictly in both"
            )
        previous = strategy
    best = frontier.n * max(cost.accuracy[c] for c in cost.configurations(frontier.available))
    if frontier.best.accuracy_units != best:
        raise ValueError(
            f"{name} ends at {frontier.best.accuracy_units} accuracy units, but its best configuration "
            f"reaches {best}"
        )


# ----------------------------------------------------------------------------------------------
# numpy evaluation shared by the candidates and the brute-force oracle


def _evaluate(cost: CostModel, configs: Sequence[Configuration], x: IntArray) -> tuple[IntArray, IntArray]:
    """Latency and accuracy units of each row of ``x`` (rows = strategies, columns = configs)."""
    latency = np.zeros(len(x), dtype=np.int64)
    for m in cost.modalities:
        cols = [i for i, c in enumerate(configs) if m in c]
        if cols:
            latency += np.asarray(cost.branch_us[m], dtype=np.int64)[x[:, cols].sum(axis=1)]
    for i, c in enumerate(configs):
        latency += np.asarray(cost.fusion_us[c], dtype=np.int64)[x[:, i]]
    acc = x @ np.asarray([cost.accuracy[c] for c in configs], dtype=np.int64)
    return latency, acc


def _staircase(latency: IntArray, acc: IntArray) -> IntArray:
    """Indices of the Pareto-optimal rows, by increasing latency (first row wins ties)."""
    order = np.lexsort((np.arange(len(latency)), -acc, latency))
    acc_sorted = acc[order]
    running = np.maximum.accumulate(acc_sorted)
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = acc_sorted[1:] > running[:-1]
    return order[keep]


def _positive_compositions(n: int, parts: int) -> IntArray:
    """All ways to write n as an ordered sum of ``parts`` positive integers."""
    if parts == 1:
        return np.array([[n]], dtype=np.int64) if n >= 1 else np.zeros((0, 1), dtype=np.int64)
    rows = [
        [b - a for a, b in zip((0, *bars), (*bars, n))]
        for bars in itertools.combinations(range(1, n), parts - 1)
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, parts)


def _strategies_with_support(n: int, k: int, max_support: int) -> IntArray:
    blocks = []
    for s in range(1, min(max_support, k, n) + 1):
        comps = _positive_compositions(n, s)
        for support in itertools.combinations(range(k), s):
            block = np.zeros((len(comps), k), dtype=np.int64)
            block[:, support] = comps
            blocks.append(block)
    return np.concatenate(blocks)


def _to_strategy(cost: CostModel, configs: Sequence[Configuration], row: Sequence[int]) -> Strategy:
    groups = [(c, int(k)) for c, k in zip(configs, row) if k]
    ordered = execution_order(groups, cost.modalities)
    return Strategy(ordered, cost.latency_us(ordered), cost.accuracy_units(ordered))


def execution_order(
    groups: list[tuple[Configuration, int]], modalities: tuple[str, ...]
) -> tuple[tuple[Configuration, int], ...]:
    """Order groups so that as many branches as possible read one contiguous run of rows."""
    if len(groups) <= 2 or len(groups) > 6:
        return tuple(groups)

    def runs(order: tuple[tuple[Configuration, int], ...]) -> int:
        total = 0
        for m in modalities:
            inside = [m in c for c, _ in order]
            total += sum(1 for i, v in enumerate(inside) if v and (i == 0 or not inside[i - 1]))
        return total

    return min(itertools.permutations(groups), key=runs)


def brute_force_frontier(cost: CostModel, available: Configuration, n: int) -> Frontier:
    """The frontier by enumerating every strategy: the test oracle (exponential; small cases only)."""
    configs = cost.configurations(available)
    x = _strategies_with_support(n, len(configs), len(configs))
    latency, acc = _evaluate(cost, configs, x)
    idx = _staircase(latency, acc)
    return Frontier(available, n, tuple(_to_strategy(cost, configs, x[i]) for i in idx))


# ----------------------------------------------------------------------------------------------
# CP-SAT


def _find_above(
    cost: CostModel,
    configs: Sequence[Configuration],
    n: int,
    staircase: Sequence[tuple[int, int]],
    config: PlannerConfig,
) -> tuple[str, list[int] | None]:
    """Ask CP-SAT for a strategy that no staircase point dominates (weakly).

    Returns ("infeasible", None) when it proves there is none, ("found", counts) when there is
    one, and ("unknown", None) when the time limit hits first.
    """
    from ortools.sat.python import cp_model  # noqa: PLC0415  (keep `import mosel` light)

    model = cp_model.CpModel()
    x = [model.new_int_var(0, n, f"x[{'+'.join(sorted(c))}]") for c in configs]
    model.add(sum(x) == n)

    # Latency: each branch once over all rows that need it, plus one fusion call per group.
    terms = []
    for m in cost.modalities:
        uses = [x[i] for i, c in enumerate(configs) if m in c]
        if not uses:
            continue
        table = list(cost.branch_us[m][: n + 1])
        rows = model.new_int_var(0, n, f"rows[{m}]")
        model.add(rows == sum(uses))
        lat = model.new_int_var(min(table), max(table), f"branch_us[{m}]")
        model.add_element(rows, table, lat)
        terms.append(lat)
    for i, c in enumerate(configs):
        table = list(cost.fusion_us[c][: n + 1])
        lat = model.new_int_var(min(table), max(table), f"fusion_us[{i}]")
        model.add_element(x[i], table, lat)
        terms.append(lat)
    latency_ub = sum(max(cost.branch_us[m][: n + 1]) for m in cost.modalities) + sum(
        max(cost.fusion_us[c][: n + 1]) for c in configs
    )
    latency = model.new_int_var(0, latency_ub, "latency_us")
    model.add(latency == sum(terms))
    acc = model.new_int_var(0, n * max(cost.accuracy[c] for c in configs), "accuracy_units")
    model.add(acc == sum(cost.accuracy[c] * x[i] for i, c in enumerate(configs)))

    # Above the staircase: at least as slow as step i means strictly more accurate than step i.
    previous = None
    for i, (step_latency, step_acc) in enumerate(staircase):
        reached = model.new_bool_var(f"reached[{i}]")
        model.add(latency >= step_latency).only_enforce_if(reached)
        model.add(latency <= step_latency - 1).only_enforce_if(~reached)
        model.add(acc >= step_acc + 1).only_enforce_if(reached)
        if previous is not None:
            model.add_implication(reached, previous)
        previous = reached

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = config.seed
    solver.parameters.max_time_in_seconds = config.time_limit_s
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        return "infeasible", None
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return "found", [int(solver.value(v)) for v in x]
    return "unknown", None


def _neighbours(rows: IntArray) -> IntArray:
    """Every strategy reached from a row of ``rows`` by moving one request to another configuration."""
    k = rows.shape[1]
    moves = np.array(
        [
            np.eye(k, dtype=np.int64)[j] - np.eye(k, dtype=np.int64)[i]
            for i in range(k)
            for j in range(k)
            if i != j
        ]
    )
    out: IntArray = (rows[:, None, :] + moves[None, :, :]).reshape(-1, k)
    return out[(out >= 0).all(axis=1)]


def _climb(
    cost: CostModel,
    configs: Sequence[Configuration],
    x: IntArray,
    latency: IntArray,
    acc: IntArray,
    new: IntArray,
) -> tuple[IntArray, IntArray, IntArray]:
    """Add ``new`` rows, then their one-move neighbours while that improves the staircase."""
    while len(new):
        new_latency, new_acc = _evaluate(cost, configs, new)
        x = np.concatenate([x, new])
        latency = np.concatenate([latency, new_latency])
        acc = np.concatenate([acc, new_acc])
        stair = _staircase(latency, acc)
        fresh = stair[stair >= len(x) - len(new)]
        new = np.unique(_neighbours(x[fresh]), axis=0) if len(fresh) else new[:0]
    return x, latency, acc


def solve_frontier(
    cost: CostModel,
    available: Configuration,
    n: int,
    config: PlannerConfig | None = None,
) -> Frontier:
    """The exact frontier for ``n`` requests carrying the ``available`` modalities (CP-SAT proof)."""
    config = config or PlannerConfig()
    configs = cost.configurations(available)
    x = _strategies_with_support(n, len(configs), config.candidate_support)
    latency, acc = _evaluate(cost, configs, x)
    exact = True
    deadline = time.monotonic() + config.time_limit_s
    while True:
        idx = _staircase(latency, acc)
        staircase = [(int(latency[i]), int(acc[i])) for i in idx]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            exact = False
            break
        status, found = _find_above(
            cost, configs, n, staircase, PlannerConfig(remaining, 1, config.seed, config.candidate_support)
        )
        if status == "infeasible":
            break
        if status == "unknown" or found is None:
            exact = False
            break
        x, latency, acc = _climb(cost, configs, x, latency, acc, np.asarray([found], dtype=np.int64))
    if not exact:
        _log.warning(
            "planner: frontier for n=%d on %s not proven exact within %.1f s; using the best found",
            n,
            sorted(available),
            config.time_limit_s,
        )
    return Frontier(available, n, tuple(_to_strategy(cost, configs, x[i]) for i in idx), exact)


def repriced_plan(plan: Plan, cost: CostModel) -> Plan:
    """``plan``'s strategies, and every pure one, priced by ``cost``: a plan without solving.

    For tables that differ from the ones ``plan`` was solved for (a size bucket beyond the
    measured ones, its tables scaled): each frontier becomes the Pareto-optimal subset, under
    ``cost``, of its strategies plus every single-configuration strategy. Not proven complete
    (``exact`` is False): a mix that only the new tables make optimal is missing.
    """
    frontiers = {}
    for (available, n), frontier in plan.frontiers.items():
        candidates = {s.groups for s in frontier.strategies}
        candidates |= {((c, n),) for c in cost.configurations(available)}
        strategies = [
            Strategy(g, cost.latency_us(g), cost.accuracy_units(g)) for g in sorted(candidates, key=str)
        ]
        keep = _staircase(
            np.array([s.latency_us for s in strategies], dtype=np.int64),
            np.array([s.accuracy_units for s in strategies], dtype=np.int64),
        )
        frontiers[available, n] = Frontier(available, n, tuple(strategies[i] for i in keep), exact=False)
    return dataclasses.replace(plan, frontiers=MappingProxyType(frontiers), cost_model_digest=cost.digest())


def build_plan(cost: CostModel, config: PlannerConfig | None = None) -> Plan:
    """Frontiers for every job size and every non-empty set of available modalities.

    Job sizes are solved in parallel threads; the result does not depend on their number.
    """
    config = config or PlannerConfig()
    started = time.perf_counter()
    names = cost.modalities
    subsets = [frozenset(c) for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]
    tasks = [(s, n) for s in subsets for n in range(1, cost.max_batch_size + 1)]
    # Largest problems first, so the pool does not end waiting on one long proof.
    tasks.sort(key=lambda t: (-len(t[0]), -t[1]))
    workers = config.workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        solved = dict(zip(tasks, pool.map(lambda t: solve_frontier(cost, t[0], t[1], config), tasks)))
    frontiers = {t: solved[t] for t in sorted(tasks, key=lambda t: (len(t[0]), sorted(t[0]), t[1]))}
    return Plan(
        modalities=names,
        max_batch_size=cost.max_batch_size,
        frontiers=MappingProxyType(frontiers),
        cost_model_digest=cost.digest(),
        build_seconds=time.perf_counter() - started,
    )
