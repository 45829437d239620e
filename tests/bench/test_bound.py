"""Fast checks of the clairvoyant bounds: sound against every policy, exact on tiny traces."""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import pytest

import mosel
from mosel.jobs import floor_units
from mosel.plan import ACCURACY_SCALE, CostModel, Strategy
from mosel.testing import Passthrough, synthetic_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bound

MAX_BATCH = 5
POLICIES = ("aggressive", "greedy", "mosel", "agnostic", "agnostic_plus", "batcher")


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    """Audio cheap, video costly, fusion of both costly to start: batching pays, mixes are admissible."""
    sizes = range(1, MAX_BATCH + 1)
    return synthetic_profile(
        Passthrough,
        branch_us={"audio": [1000 + 300 * b for b in sizes], "video": [3000 + 900 * b for b in sizes]},
        accuracy={"audio": 0.72, "video": 0.66, "audio+video": 0.74},
        fusion_us={"audio+video": [500 + 200 * b for b in sizes]},
    )


def trace(seed: int, jobs: int, gap_ms: float = 3.0) -> list[mosel.Arrival]:
    """A tight random trace on a microsecond grid (so that integer times are exact)."""
    rng = random.Random(seed)
    t_us, out = 0, []
    for _ in range(jobs):
        t_us += int(rng.expovariate(1 / (gap_ms * 1000)))
        n = rng.randint(1, MAX_BATCH)
        floor = rng.choice([0.71, 0.71, 0.73, None])
        available = frozenset({"audio"}) if rng.random() < 0.15 else None
        deadline = float(rng.randint(4, 12))
        out.append(
            mosel.Arrival(t_us / 1e6, n, deadline_ms=deadline, min_accuracy=floor, available=available)
        )
    return out


def simulated(profile: mosel.Profile, arrivals: list[mosel.Arrival], policy: str) -> mosel.Simulation:
    return mosel.simulate(profile, arrivals, mosel.SchedulerConfig(policy=policy))  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", POLICIES)
def test_the_bound_is_never_below_a_policy(profile: mosel.Profile, policy: str) -> None:
    for seed in (1, 2):
        arrivals = trace(seed, 12)
        sim = simulated(profile, arrivals, policy)
        units = bound.on_time_units(sim)
        best = bound.batched_optimum(profile, arrivals, hint=sim, time_limit_s=15.0)
        assert best.hint_units == units
        assert best.best_found_units >= units
        # Without the hint too: the proven optimum bounds the policy.
        free = bound.batched_optimum(profile, arrivals, time_limit_s=15.0)
        assert free.proven_optimal and best.proven_optimal
        assert free.best_found_units == best.best_found_units >= units
        assert best.cpsat_bound_units >= best.best_found_units
        assert best.jobs == len(arrivals) and best.requests == sum(a.n for a in arrivals)
        lp = bound.lp_upper_bound(profile, arrivals)
        assert lp >= best.best_found_units * (1 - 1e-9)
        assert lp <= best.requests * ACCURACY_SCALE


@pytest.mark.parametrize("policy", POLICIES)
def test_the_fixed_hint_reproduces_the_policy(profile: mosel.Profile, policy: str) -> None:
    merged = 0
    for seed, gap_ms in ((7, 0.5), (10, 1.0), (10, 1.5)):
        arrivals = trace(seed, 15, gap_ms)
        sim = simulated(profile, arrivals, policy)
        units, requests = bound.on_time_units(sim), bound.on_time_requests(sim)
        fixed = bound.batched_optimum(profile, arrivals, hint=sim, fix_hint=True, time_limit_s=10.0)
        assert (fixed.best_found_units, fixed.best_found_requests) == (units, requests)
        assert fixed.proven_optimal
        starts = [r.started_s for r in sim.records if r.on_time]
        merged += len(starts) - len(set(starts))
    if policy in ("aggressive", "greedy", "mosel"):
        assert merged, "the hints should hold batches of several jobs"


def options(profile: mosel.Profile, arrival: mosel.Arrival) -> list[Strategy]:
    """A job's admissible strategies: its frontier from the floor on, and every modality for all."""
    cost = profile.cost_model()
    available = arrival.available or frozenset(profile.modalities)
    floor = floor_units(arrival.min_accuracy, arrival.n)
    frontier = profile.plan.frontier(available, arrival.n)
    out = {frozenset(s.groups): s for s in frontier.strategies if s.accuracy_units >= floor}
    groups = ((available, arrival.n),)
    if cost.accuracy_units(groups) >= floor:
        out.setdefault(
            frozenset(groups), Strategy(groups, cost.latency_us(groups), cost.accuracy_units(groups))
        )
    return list(out.values())


def partitions(items: Sequence[int]) -> Iterator[list[list[int]]]:
    """Every way to split ``items`` into non-empty blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for split in partitions(rest):
        yield [[first], *split]
        for i in range(len(split)):
            yield [*split[:i], [first, *split[i]], *split[i + 1 :]]


def brute_force(profile: mosel.Profile, arrivals: Sequence[mosel.Arrival]) -> int:
    """The best on-time accuracy units over every drop/strategy choice, batching and batch order."""
    cost = profile.cost_model()
    arrive = [round(a.time_s * 1e6) for a in arrivals]
    due = [round(a.time_s * 1e6 + a.deadline_ms * 1000) for a in arrivals]  # type: ignore[operator]
    choices = [[None, *options(profile, a)] for a in arrivals]
    best = 0
    for pick in itertools.product(*choices):
        served = [j for j, s in enumerate(pick) if s is not None]
        units = sum(s.accuracy_units for s in pick if s is not None)
        if units <= best:
            continue
        for blocks in partitions(served):
            if any(sum(arrivals[j].n for j in b) > MAX_BATCH for b in blocks):
                continue
            for order in itertools.permutations(blocks):
                free, ok = 0, True
                for block in order:
                    groups: dict[frozenset[str], int] = {}
                    for j in block:
                        for c, count in pick[j].groups:  # type: ignore[union-attr]
                            groups[c] = groups.get(c, 0) + count
                    start = max(free, *(arrive[j] for j in block))
                    free = start + cost.latency_us(groups.items())
                    ok = ok and all(free <= due[j] for j in block)
                if ok:
                    best = units
                    break
            if best == units:
                break
    return best


def test_cpsat_matches_brute_force_on_tiny_traces(profile: mosel.Profile) -> None:
    found_merge = False
    for seed in range(8):
        arrivals = trace(100 + seed, 3, gap_ms=1.0)
        expected = brute_force(profile, arrivals)
        best = bound.batched_optimum(profile, arrivals, time_limit_s=10.0)
        assert best.proven_optimal
        assert best.best_found_units == expected, seed
        assert bound.lp_upper_bound(profile, arrivals) >= expected * (1 - 1e-9)
        alone = sum(
            max(
                (s.accuracy_units for s in options(profile, a) if s.latency_us <= a.deadline_ms * 1000),
                default=0,
            )  # type: ignore[operator]
            for a in arrivals
        )
        found_merge = found_merge or expected < alone
    assert found_merge, "some trace should make the jobs compete for the device"


def test_amortised_costs_bound_every_mix() -> None:
    rng = random.Random(7)
    configs = [frozenset({"a"}), frozenset({"b"}), frozenset({"a", "b"})]
    for trial in range(30):
        size = rng.randint(1, 12)

        def table(convex: bool, size: int = size) -> tuple[int, ...]:
            values = [rng.randint(0, 4000) for _ in range(size)]
            if convex:  # also monotone, concave and irregular tables
                values.sort()
            return (0, *values)

        cost = CostModel(
            modalities=("a", "b"),
            branch_us={"a": table(trial % 2 == 0), "b": table(trial % 3 == 0)},
            fusion_us={c: table(trial % 5 == 0) for c in configs},
            accuracy={c: 700_000 for c in configs},
        )
        amortised = bound.amortised_us(cost)
        for counts in itertools.product(range(size + 1), repeat=len(configs)):
            if not 0 < sum(counts) <= size:
                continue
            groups = list(zip(configs, counts))
            assert cost.latency_us(groups) >= sum((k * amortised[c] for c, k in groups), Fraction(0))


def test_the_lp_grows_with_grace_and_rejects_what_it_cannot_bound(profile: mosel.Profile) -> None:
    arrivals = trace(9, 10)
    assert bound.lp_upper_bound(profile, arrivals, grace_ms=5.0) >= bound.lp_upper_bound(profile, arrivals)
    with pytest.raises(ValueError, match="max_batch_size"):
        bound.lp_upper_bound(profile, [mosel.Arrival(0.0, MAX_BATCH + 1, deadline_ms=50.0)])
    with pytest.raises(ValueError, match="deadline"):
        bound.batched_optimum(profile, [mosel.Arrival(0.0, 1)])


def test_share_of_gain() -> None:
    assert bound.share_of_gain(150, 100, 200) == 0.5
    assert bound.share_of_gain(80, 100, 200) == -0.2
    assert bound.share_of_gain(100, 100, 100) == 1.0


def test_a_hint_off_the_frontier_becomes_an_option(profile: mosel.Profile) -> None:
    arrivals = [mosel.Arrival(0.0, 2, deadline_ms=50.0), mosel.Arrival(0.001, 1, deadline_ms=50.0)]
    sim = simulated(profile, arrivals, "aggressive")
    cost = profile.cost_model()
    video = ((frozenset({"video"}), 2),)
    dominated = Strategy(video, cost.latency_us(video), cost.accuracy_units(video))
    assert frozenset(video) not in {frozenset(s.groups) for s in options(profile, arrivals[0])}
    first = dataclasses.replace(sim.records[0], strategies=(dominated,))
    hint = dataclasses.replace(sim, records=(first, *sim.records[1:]))
    fixed = bound.batched_optimum(profile, arrivals, hint=hint, fix_hint=True)
    assert fixed.best_found_units == dominated.accuracy_units + bound.on_time_units(sim) - sum(
        s.accuracy_units for s in sim.records[0].strategies
    )
    best = bound.batched_optimum(profile, arrivals, hint=hint)
    assert best.proven_optimal and best.best_found_units == 3 * 740_000
    floored = [dataclasses.replace(a, min_accuracy=0.7) for a in arrivals]
    with pytest.raises(ValueError, match="floor"):
        bound.batched_optimum(profile, floored, hint=hint)
