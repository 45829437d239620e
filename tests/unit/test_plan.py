from __future__ import annotations

import itertools
import json
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosel.plan import (
    ACCURACY_SCALE,
    CostModel,
    Plan,
    PlannerConfig,
    brute_force_frontier,
    build_plan,
    solve_frontier,
)

NAMES = ("a", "b", "c", "d")


def subsets(names: tuple[str, ...]) -> list[frozenset[str]]:
    return [frozenset(c) for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


@st.composite
def monotone_table(draw: st.DrawFn, size: int, scale: int) -> tuple[int, ...]:
    steps = draw(st.lists(st.integers(0, scale), min_size=size, max_size=size))
    return (0, *itertools.accumulate(steps))


@st.composite
def cost_models(draw: st.DrawFn) -> CostModel:
    m = draw(st.integers(2, 4))
    size = {2: 12, 3: 8, 4: 5}[m]
    names = NAMES[:m]
    configs = subsets(names)
    return CostModel(
        modalities=names,
        branch_us=MappingProxyType({n: draw(monotone_table(size, 500)) for n in names}),
        fusion_us=MappingProxyType({c: draw(monotone_table(size, 40)) for c in configs}),
        accuracy=MappingProxyType({c: draw(st.integers(0, ACCURACY_SCALE)) for c in configs}),
    )


def is_pareto(points: list[tuple[int, int]]) -> bool:
    return all(l1 < l2 and a1 < a2 for (l1, a1), (l2, a2) in itertools.pairwise(points))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cost=cost_models(), data=st.data())
def test_cpsat_frontier_equals_brute_force(cost: CostModel, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, cost.max_batch_size), label="n")
    available = data.draw(st.sampled_from(subsets(cost.modalities)), label="available")
    # Support 1 leaves nearly all of the frontier to CP-SAT; the default starts from richer candidates.
    support = data.draw(st.sampled_from([1, 3]), label="candidate_support")
    oracle = brute_force_frontier(cost, available, n)
    got = solve_frontier(cost, available, n, PlannerConfig(candidate_support=support))
    assert got.exact
    assert got.points() == oracle.points()
    assert is_pareto(got.points())
    for strategy in got.strategies:
        assert strategy.n == n
        assert all(count > 0 and config <= available for config, count in strategy.groups)
        assert strategy.latency_us == cost.latency_us(strategy.groups)
        assert strategy.accuracy_units == cost.accuracy_units(strategy.groups)


def small_cost_model(max_batch: int = 6) -> CostModel:
    names = ("audio", "video")
    configs = subsets(names)
    per_row = {"audio": 10, "video": 50}
    return CostModel(
        modalities=names,
        branch_us={m: (0, *(100 + per_row[m] * b for b in range(1, max_batch + 1))) for m in names},
        fusion_us={c: (0, *(5 * b for b in range(1, max_batch + 1))) for c in configs},
        accuracy={
            frozenset({"audio"}): 700_000,
            frozenset({"video"}): 600_000,
            frozenset({"audio", "video"}): 900_000,
        },
    )


def test_plan_covers_every_size_and_available_subset_and_round_trips() -> None:
    cost = small_cost_model()
    plan = build_plan(cost, PlannerConfig(workers=2))
    assert plan.exact
    assert set(plan.frontiers) == {(s, n) for s in subsets(cost.modalities) for n in range(1, 7)}
    audio_only = plan.frontier(frozenset({"audio"}), 4)
    assert [s.groups for s in audio_only.strategies] == [((frozenset({"audio"}), 4),)]
    # Video-only rows never pay off here: video is slower and less accurate than audio.
    both = plan.frontier(frozenset({"audio", "video"}), 6)
    assert all(frozenset({"video"}) not in dict(s.groups) for s in both.strategies)
    assert both.best.groups == ((frozenset({"audio", "video"}), 6),)
    restored = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert restored.frontiers == plan.frontiers
    assert restored.cost_model_digest == cost.digest()


def test_frontier_lookups() -> None:
    frontier = build_plan(small_cost_model()).frontier(frozenset({"audio", "video"}), 4)
    cheapest, best = frontier.strategies[0], frontier.best
    assert frontier.best_within(cheapest.latency_us - 1) is None
    assert frontier.best_within(cheapest.latency_us) == cheapest
    assert frontier.best_within(10**9) == best
    assert frontier.cheapest_meeting(0) == cheapest
    assert frontier.cheapest_meeting(best.accuracy_units) == best
    assert frontier.cheapest_meeting(best.accuracy_units + 1) is None
    for s in frontier.strategies:
        assert frontier.best_within(s.latency_us) == s
        assert frontier.cheapest_meeting(s.accuracy_units) == s


def test_plan_is_deterministic_whatever_the_thread_count() -> None:
    cost = small_cost_model(8)
    one = build_plan(cost, PlannerConfig(workers=1))
    two = build_plan(cost, PlannerConfig(workers=3))
    assert one.frontiers == two.frontiers


def test_time_limit_keeps_a_valid_inexact_frontier(caplog: pytest.LogCaptureFixture) -> None:
    cost = small_cost_model()
    frontier = solve_frontier(cost, frozenset(cost.modalities), 6, PlannerConfig(time_limit_s=0.0))
    assert not frontier.exact
    assert is_pareto(frontier.points())
    assert "not proven exact" in caplog.text
