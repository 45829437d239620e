"""Per-row escalation offline: the calibration, chains in the frontiers, their prices, the profile file."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

import mosel
from mosel.admission import Admission
from mosel.calibrating import overhead_sizes, recalibrated
from mosel.chains import (
    FIT_Z,
    LaterRows,
    StageBudget,
    _families,
    credited,
    later_parts,
    select_rows,
    with_chains,
)
from mosel.escalation import Calibration, ranking_score, wilson_lower
from mosel.jobs import Job
from mosel.plan import ACCURACY_SCALE, accuracy_units
from mosel.pricing import Pricer
from mosel.scheduler import Scheduler, SchedulerConfig
from mosel.stats import Stats
from tests.unit.votes import Votes, votes_batches, votes_profile

PROFILES = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles"
A, B, C = frozenset({"a"}), frozenset({"a", "b"}), frozenset({"a", "b", "c"})


@pytest.fixture(scope="module")
def votes() -> mosel.Profile:
    return votes_profile(Votes().eval())


def _rows(
    n: int = 2000, seed: int = 0
) -> tuple[dict[frozenset[str], np.ndarray], dict[frozenset[str], np.ndarray]]:
    """Random rows over a chain of nested configurations: higher confidence, more often right."""
    rng = np.random.default_rng(seed)
    confidences, scores = {}, {}
    for c, skill in ((A, 0.0), (B, 0.7), (C, 1.2)):
        x = rng.normal(skill, 1.0, n)
        confidences[c] = 1 / (1 + np.exp(-x + rng.normal(0, 0.5, n)))
        scores[c] = (rng.random(n) < 1 / (1 + np.exp(-x))).astype(np.float64)
    return confidences, scores


def test_the_calibration_counts_every_row_and_gives_each_configurations_accuracy() -> None:
    confidences, scores = _rows()
    calibration = Calibration.fit("max_probability", confidences, scores, bins=10)
    for c in (A, B, C):
        assert sum(calibration.counts[c]) == 2000
        assert calibration.accuracy(c) == pytest.approx(scores[c].mean())
        assert sum(calibration.histogram(c)) == pytest.approx(1.0)
        assert len(calibration.edges[c]) == 9
    assert set(calibration.joint_counts) == {(A, B)}  # only a pair with a configuration above it
    assert sum(calibration.joint_counts[(A, B)]) == 2000
    assert calibration.gains(A, C)[0] > calibration.gains(A, C)[-1]  # unsure rows gain the most


def test_a_calibration_survives_its_json_and_refuses_a_malformed_one() -> None:
    confidences, scores = _rows()
    calibration = Calibration.fit(
        "margin", confidences, scores, ranking={"margin": 0.7}, stage_overhead_us=12.5
    )
    text = json.dumps(calibration.to_json(("a", "b", "c")))
    assert Calibration.from_json(json.loads(text), ("a", "b", "c")) == calibration
    broken = json.loads(text)
    broken["bins"]["a"]["counts"][0] += 1
    with pytest.raises(ValueError, match="count"):
        Calibration.from_json(broken, ("a", "b", "c"))
    broken = json.loads(text)
    broken["signal"] = "entropy"
    with pytest.raises(ValueError, match="signal"):
        Calibration.from_json(broken, ("a", "b", "c"))


def test_a_stage_overhead_per_batch_size_survives_its_json_and_an_older_single_figure_still_loads() -> None:
    confidences, scores = _rows()
    calibration = Calibration.fit(
        "margin", confidences, scores, stage_overhead_us={8: 800.0, 1: 100.0, 32: 1040.0}
    )
    assert calibration.stage_overhead_by_rows == ((1, 100.0), (8, 800.0), (32, 1040.0))
    assert [calibration.overhead_us(n) for n in (1, 4, 8, 20, 32, 64)] == [
        100.0,
        400.0,
        800.0,
        920.0,
        1040.0,
        1040.0,
    ]
    assert calibration.stage_overhead_us == 800.0  # the one figure: the table's median
    data = json.loads(json.dumps(calibration.to_json(("a", "b", "c"))))
    assert Calibration.from_json(data, ("a", "b", "c")) == calibration
    older = dict(data)  # a profile written before the table: one figure for every batch size
    del older["stage_overhead_by_rows"]
    single = Calibration.from_json(older, ("a", "b", "c"))
    assert single.stage_overhead_by_rows == () and single.overhead_us(1) == single.overhead_us(32) == 800.0
    for bad in ([[8, 1.0], [1, 2.0]], [[0, 1.0]], [[1, -1.0]], [[1]]):
        with pytest.raises(ValueError, match="stage_overhead_by_rows"):
            Calibration.from_json({**data, "stage_overhead_by_rows": bad}, ("a", "b", "c"))
    with pytest.raises(ValueError, match="stage overhead"):
        calibration.with_overhead({0: 1.0})


def test_a_later_stage_is_priced_at_the_overhead_of_the_batch_at_hand(votes: mosel.Profile) -> None:
    """A frontier's chains, a job's price, a batch's stage budget and its observed parts each take
    the figure for their own batch size, not one figure for every size."""
    assert votes.calibration is not None
    calibration = votes.calibration.with_overhead({1: 10.0, 8: 3000.0})
    profile = dataclasses.replace(votes, calibration=calibration)
    cost = profile.cost_model()
    z = 1.2815515655446004
    plan = with_chains(profile.plan, cost, calibration, z)
    pricer = Scheduler(profile, SchedulerConfig()).pricer
    everything = frozenset(profile.modalities)
    for n in (1, 4, 8):
        frontier = plan.frontier(everything, n)
        assert pricer.reference_plan.frontier(everything, n).points() == frontier.points()
        for strategy in (s for s in frontier.strategies if s.chain is not None):
            later = LaterRows()
            later.add(strategy.chain, n)
            parts = later_parts(cost, later.stages(z), calibration.overhead_us(n))
            assert strategy.latency_us == math.ceil(
                cost.latency_us(strategy.groups) + sum(parts.values()) - 1e-9
            )
        assert pricer.stage_overhead_us(n) == calibration.overhead_us(n)
        budget = pricer.stage_budget(cost, 1.0, n)
        assert budget is not None and budget.overhead_us == calibration.overhead_us(n)
    # 8-row jobs' chains pay 3 ms a stage: fewer of them are worth it than at one row's 10 us
    share = {n: sum(s.chain is not None for s in plan.frontier(everything, n).strategies) for n in (1, 8)}
    assert share[1] > 0 and share[8] < share[1]


def test_the_overhead_is_timed_per_batch_size_and_recalibrating_keeps_the_table(votes: mosel.Profile) -> None:
    assert overhead_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert overhead_sizes(12) == [1, 2, 4, 8, 12]
    assert overhead_sizes(1) == [1]
    assert votes.calibration is not None
    table = votes.calibration.with_overhead({1: 10.0, 8: 80.0})
    again = recalibrated(dataclasses.replace(votes, calibration=table), Votes().eval(), votes_batches(400, 3))
    assert again.calibration is not None and again.calibration.rows == 400
    assert again.calibration.stage_overhead_by_rows == ((1, 10.0), (8, 80.0))


def test_ranking_scores_and_wilson_bounds() -> None:
    score = np.array([0.0, 0.0, 1.0, 1.0])
    assert ranking_score(np.array([0.1, 0.2, 0.3, 0.4]), score) == 1.0
    assert ranking_score(np.array([0.4, 0.3, 0.2, 0.1]), score) == 0.0
    assert ranking_score(np.ones(4), score) == 0.5
    assert wilson_lower(0.9, 10_000, 0.95) == pytest.approx(0.895, abs=1e-3)
    assert wilson_lower(0.9, 100, 0.95) < wilson_lower(0.9, 10_000, 0.95) < 0.9


def _brute(
    rows: tuple[dict, dict], calibration: Calibration, stages: tuple, cuts: tuple
) -> tuple[float, list[float]]:
    """A chain's accuracy and shares, row by row."""
    confidences, scores = rows
    n = len(scores[A])
    level = {c: np.searchsorted(calibration.edges[c], confidences[c], side="right") for c in stages}
    at = np.zeros(n, dtype=np.int64)  # each row's stage
    shares = []
    for t, cut in enumerate(cuts):
        going = (at == t) & (level[stages[t]] < cut)
        at[going] = t + 1
        shares.append(going.mean())
    accuracy = np.mean([scores[stages[s]][i] for i, s in enumerate(at)])
    return float(accuracy), shares


def test_every_chain_in_the_frontiers_has_the_accuracy_and_shares_of_its_rows() -> None:
    rows = _rows()
    calibration = Calibration.fit("max_probability", *rows, bins=8)
    families = _families(calibration, [A, B, C])  # the grid the frontiers are built from
    seen = 0
    for stages in ((A, B), (A, C), (B, C), (A, B, C)):
        for cuts in itertools.product(*(range(1, calibration.bins(s)) for s in stages[:-1])):
            accuracy, shares = _brute(rows, calibration, stages, cuts)
            for family in families:
                if family.stages != stages:
                    continue
                i = int(np.flatnonzero((family.cuts == np.asarray(cuts)).all(axis=1))[0])
                assert family.accuracy[i] == pytest.approx(accuracy, abs=1e-12)
                assert family.shares[i] == pytest.approx(shares, abs=1e-12)
                seen += 1
    assert seen == 7 * 3 + 7 * 7  # every cut of the three pairs, every pair of cuts of the triple


def _spread(rows: tuple[dict, dict], calibration: Calibration, stages: tuple, cuts: tuple) -> float:
    """The standard error of a chain's gap to its final configuration, row by row.

    Each row that stops before the last stage adds the variance of two independent scores at its
    bin's mean scores (its first stage's bin; its joint bin of the first two where it stops at
    the second).
    """
    confidences, scores = rows
    n = len(scores[A])
    level = {c: np.searchsorted(calibration.edges[c], confidences[c], side="right") for c in stages}
    at = np.zeros(n, dtype=np.int64)
    for t, cut in enumerate(cuts):
        at[(at == t) & (level[stages[t]] < cut)] = t + 1
    cell = level[stages[0]] if len(stages) == 2 else level[stages[0]] * 100 + level[stages[1]]
    variance = 0.0
    for i in range(n):
        if at[i] == len(stages) - 1:
            continue
        same = (cell == cell[i]) if at[i] == 1 else (level[stages[0]] == level[stages[0]][i])
        for c in (stages[at[i]], stages[-1]):
            p = scores[c][same].mean()
            variance += p * (1 - p)
    return math.sqrt(variance) / n


def test_every_chain_is_credited_its_accuracy_less_the_noise_of_its_gap_to_its_final_configuration() -> None:
    rows = _rows(n=400, seed=3)
    calibration = Calibration.fit("max_probability", *rows, bins=5)
    families = _families(calibration, [A, B, C])
    seen = 0
    for stages in ((A, B), (A, C), (B, C), (A, B, C)):
        for cuts in itertools.product(*(range(1, calibration.bins(s)) for s in stages[:-1])):
            accuracy, _ = _brute(rows, calibration, stages, cuts)
            spread = _spread(rows, calibration, stages, cuts)
            family = next(f for f in families if f.stages == stages)
            i = int(np.flatnonzero((family.cuts == np.asarray(cuts)).all(axis=1))[0])
            assert family.spread[i] == pytest.approx(spread, rel=1e-9, abs=1e-12)
            assert family.units[i] == accuracy_units(max(0.0, accuracy - FIT_Z * spread))
            seen += 1
    assert seen == 4 * 3 + 4 * 4
    family = next(f for f in families if f.stages == (A, C))
    assert credited(family.accuracy, family.spread)[0] < family.accuracy[0]


def test_a_chain_picked_for_a_floor_on_few_validation_rows_holds_it_on_fresh_rows() -> None:
    """Picked as the planner picks (the fewest escalated rows whose credit meets the floor) on 600
    validation rows, a chain A -> C misses the floor (C's accuracy less 2 points) on fresh rows of
    the same kind in at most 1 seed in 20 (credited its validation accuracy: 8 seeds in 40)."""
    missed, picked = 0, 0
    for seed in range(40):
        confidences, scores = _rows(n=600, seed=seed)
        calibration = Calibration.fit("max_probability", confidences, scores, bins=8)
        family = next(f for f in _families(calibration, [A, B, C]) if f.stages == (A, C))
        meets = np.flatnonzero(family.units >= accuracy_units(calibration.accuracy(C) - 0.02))
        if not len(meets):
            continue
        picked += 1
        cut = family.cuts[meets[np.argmin(family.shares[meets, 0])], 0]
        fresh_confidences, fresh_scores = _rows(n=20_000, seed=10_000 + seed)
        level = np.searchsorted(calibration.edges[A], fresh_confidences[A], side="right")
        accuracy = np.where(level < cut, fresh_scores[C], fresh_scores[A]).mean()
        missed += accuracy < fresh_scores[C].mean() - 0.02
    assert picked >= 35
    assert missed / picked <= 0.05


def test_chains_join_the_frontier_priced_by_the_later_stages_rule(votes: mosel.Profile) -> None:
    calibration = votes.calibration
    assert calibration is not None
    cost = votes.cost_model()
    z = 1.2815515655446004
    plan = with_chains(votes.plan, cost, calibration, z)
    chained = 0
    for (available, n), frontier in plan.frontiers.items():
        points = frontier.points()
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(points))
        for strategy in frontier.strategies:
            chain = strategy.chain
            if chain is None:
                assert strategy in votes.plan.frontier(available, n).strategies
                continue
            chained += 1
            assert all(stage <= available for stage in chain.stages)
            later = LaterRows()
            later.add(chain, n)
            parts = later_parts(cost, later.stages(z), calibration.overhead_us(n))
            expected = cost.latency_us(strategy.groups) + sum(parts.values())
            assert strategy.latency_us == math.ceil(expected - 1e-9)
            assert strategy.accuracy_units == n * math.floor(chain.accuracy * ACCURACY_SCALE + 1e-6)
        # nothing static that a chain does not beat was dropped
        for static in votes.plan.frontier(available, n).strategies:
            assert static in frontier.strategies or any(
                s.latency_us <= static.latency_us and s.accuracy_units >= static.accuracy_units
                for s in frontier.strategies
            )
    assert chained > 0


def test_no_chain_is_credited_above_its_final_configuration(votes: mosel.Profile) -> None:
    """A chain that beats its last stage only on the validation rows' noise never tops a frontier.

    (Credited above it, such a chain was the most accurate option at a higher price than the
    static strategy: every job upgraded in spare time took it.)
    """
    calibration = votes.calibration
    assert calibration is not None
    # the calibration has chains that seem to beat their final configuration
    seeming = [
        (family.stages[-1], float(a))
        for family in _families(calibration, list(calibration.edges))
        for a in family.accuracy
        if a > calibration.accuracy(family.stages[-1]) + 1e-9
    ]
    assert seeming
    plan = with_chains(votes.plan, votes.cost_model(), calibration, 1.2815515655446004)
    for (available, n), frontier in plan.frontiers.items():
        best_static = votes.plan.frontier(available, n).best
        for strategy in frontier.strategies:
            chain = strategy.chain
            if chain is None:
                continue
            assert chain.accuracy <= calibration.accuracy(chain.stages[-1])
            assert strategy.accuracy_units <= n * math.floor(
                calibration.accuracy(chain.stages[-1]) * ACCURACY_SCALE + 1e-6
            )
            assert not (
                strategy.latency_us > best_static.latency_us
                and strategy.accuracy_units <= best_static.accuracy_units
            )


def test_a_profile_without_a_calibration_plans_no_chain(votes: mosel.Profile) -> None:
    plain = dataclasses.replace(votes, calibration=None)
    pricer = Pricer(plain, 0.5, 0.1, Stats(), escalation=0.9)
    assert pricer.reference_plan is plain.plan
    off = Pricer(votes, 0.5, 0.1, Stats(), escalation=None)
    assert off.reference_plan is votes.plan and off.calibration is None
    assert "escalation" not in off.correction


def test_a_frontier_with_chains_is_priced_strategy_by_strategy_at_any_correction(
    votes: mosel.Profile,
) -> None:
    """The frontier's prices (one product over its strategies' parts) are each option's own price."""
    pricer = Scheduler(votes, SchedulerConfig()).pricer
    everything = frozenset(votes.modalities)
    for step in range(3):
        for n in (1, 4, 8):
            frontier = pricer.reference_plan.frontier(everything, n)
            assert any(s.chain is not None for s in frontier.strategies)
            job = Job(n=n, available=everything, arrival=0.0)
            job.cost = pricer.cost
            prices = pricer.latencies(frontier, job)
            own = list(
                itertools.accumulate((pricer.price_of(s, pricer.cost) for s in frontier.strategies), max)
            )
            assert all(abs(a - b) <= 1 for a, b in zip(prices, own, strict=True))
        for i, part in enumerate(pricer.correction):  # the correction moves: prices follow
            pricer.correction[part] = 1.0 + 0.3 * ((i + step) % 3)
        pricer.reprice()


def test_a_merged_batch_of_one_chain_task_costs_its_option(votes: mosel.Profile) -> None:
    scheduler = Scheduler(votes, SchedulerConfig())
    frontier = scheduler.pricer.reference_plan.frontier(frozenset(votes.modalities), 6)
    job = Job(n=6, available=frozenset(votes.modalities), arrival=0.0)
    job.cost = scheduler.cost
    prices = scheduler.pricer.latencies(frontier, job)
    for strategy, price in zip(frontier.strategies, prices):
        batch = scheduler.batch_latency()
        batch.add(strategy)
        assert batch.latency_us() <= price  # the running maximum may only raise an option's price
    # two chain tasks merged cost less than one after another, and more than one alone
    small = scheduler.pricer.reference_plan.frontier(frozenset(votes.modalities), 4)
    chain = next(s for s in small.strategies if s.chain is not None)
    batch = scheduler.batch_latency()
    batch.add(chain)
    alone = batch.latency_us()
    together = batch.with_(chain)
    assert alone < together < 2 * alone


def test_rows_are_chosen_by_gain_per_microsecond_within_the_budget() -> None:
    steps = [(A, B), (A, C)]

    def price(stage: dict) -> float:
        return 10.0 * stage.get((A, B), 0.0) + 100.0 * stage.get((A, C), 0.0)

    which = np.array([0, 0, 1, 1])
    gains = np.array([0.2, 0.1, 0.9, 0.0])
    assert select_rows(steps, which, gains, 1e9, price).all()
    assert select_rows(steps, which, gains, 15.0, price).tolist() == [True, False, False, False]
    # gain per microsecond: 0.02, 0.01, 0.009 and nothing: the row with no gain never goes
    assert select_rows(steps, which, gains, 120.0, price).tolist() == [True, True, True, False]
    assert select_rows(steps, which, gains, 119.0, price).tolist() == [True, True, False, False]
    assert not select_rows(steps, which, gains, 0.0, price).any()
    cost = mosel.testing.synthetic_profile(
        mosel.testing.Passthrough, branch_us={"audio": [1.0], "video": [1.0]},
        accuracy={"audio": 0.5, "video": 0.5, "audio+video": 0.5},
    ).cost_model()  # fmt: skip
    budget = StageBudget(cost, {}, 1.0, 0.0, finish_by=1.0, reserve_us=100.0)
    assert budget.budget_us(0.5) == pytest.approx(0.5e6 - 100.0)


def test_floors_per_request_and_at_a_confidence_hold_for_chains(votes: mosel.Profile) -> None:
    scheduler = Scheduler(votes, SchedulerConfig())
    admission: Admission = scheduler.admission
    everything = frozenset(votes.modalities)
    audio = frozenset({"audio"})
    floor = votes.accuracy[audio] + 0.05  # audio alone misses it; chains from audio reach it on the mean
    frontier = scheduler.pricer.reference_plan.frontier(everything, 4)
    for per_request, confidence in ((True, None), (False, 0.95), (True, 0.95)):
        job = Job(
            n=4, available=everything, arrival=0.0, min_accuracy=floor, per_request=per_request,
            confidence=confidence,
        )  # fmt: skip
        job.cost = scheduler.cost
        first = admission._first_admissible(frontier, job)
        for strategy in frontier.strategies[first:]:
            chain = strategy.chain
            if chain is None:
                continue
            if per_request:
                assert votes.accuracy[chain.first] >= floor
            if confidence is not None and not per_request:
                assert wilson_lower(chain.accuracy, chain.rows, confidence) >= floor - 1e-6


def test_old_profiles_load_and_new_ones_keep_their_calibration(votes: mosel.Profile, tmp_path: Path) -> None:
    old = mosel.Profile.load(PROFILES / "av-digits.profile.json")  # format 3
    assert old.calibration is None
    path = tmp_path / "votes.json"
    votes.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 4
    again = mosel.Profile.load(path)
    assert again.calibration == votes.calibration
    data["calibration"]["bins"]["audio"]["scores"]["audio"][0] += 1.0  # no longer the profile's accuracy
    path.write_text(json.dumps(data))
    with pytest.raises(mosel.ProfileError, match="calibration"):
        mosel.Profile.load(path)
    data = json.loads(path.read_text())
    data["calibration"] = {"signal": "max_probability"}
    path.write_text(json.dumps(data))
    with pytest.raises(mosel.ProfileError, match="calibration"):
        mosel.Profile.load(path)


def test_live_floors_that_move_an_accuracy_drop_the_calibration(votes: mosel.Profile) -> None:
    """A drifted configuration means the calibration's bins no longer describe the live rows."""
    from mosel.monitoring import live_profile

    assert votes.calibration is not None
    unchanged = live_profile(votes, {})
    assert unchanged.calibration is votes.calibration
    audio = frozenset({"audio"})
    drifted = live_profile(votes, {audio: votes.accuracy[audio] - 0.1})
    assert drifted.calibration is None
    pricer = Pricer(votes, 0.5, 0.1, Stats(), escalation=0.9)
    pricer.set_profile(drifted)
    assert not any(
        s.chain is not None for f in pricer.reference_plan.frontiers.values() for s in f.strategies
    )
