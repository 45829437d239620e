"""Fast checks of issue 24's benchmark: a common machine, stalls, bisection, the budget axis, refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

import mosel
from mosel.machine import Machine, fit_stalls, stall_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import budget
import common
import conditions
import decisions
from scenarios import AV_DIGITS_STALLS, av_digits, scenario_named


def logged_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[float, float, float, float]]]:
    """Every Machine's batches as (start_s, predicted_us, execution_us, overhead_us), one list per machine."""
    machines: list[list[tuple[float, float, float, float]]] = []
    original_init, original_batch = Machine.__init__, Machine.batch

    def init(self: Machine, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.log = []  # type: ignore[attr-defined]
        machines.append(self.log)  # type: ignore[attr-defined]

    def batch(self: Machine, start_s: float, predicted_us: float) -> tuple[float, float]:
        exec_us, overhead_us = original_batch(self, start_s, predicted_us)
        self.log.append((start_s, predicted_us, exec_us, overhead_us))  # type: ignore[attr-defined]
        return exec_us, overhead_us

    monkeypatch.setattr(Machine, "__init__", init)
    monkeypatch.setattr(Machine, "batch", batch)
    return machines


def draws_by_slot(log: list[tuple[float, float, float, float]]) -> dict[tuple[int, int], tuple[float, float]]:
    """(slot, k-th batch of the slot) -> (ratio, overhead) of one run."""
    out: dict[tuple[int, int], tuple[float, float]] = {}
    slot, k = -1, 0
    for start_s, predicted_us, exec_us, overhead_us in log:
        j = math.floor(start_s / 0.001)  # as the machine slots them
        k = k + 1 if j == slot else 0
        slot = j
        out[(j, k)] = (exec_us / predicted_us, overhead_us)
    return out


@pytest.mark.parametrize("draws", ["time-grid", "per-batch"])
def test_two_policies_get_the_same_machine_draws_in_the_same_slot(
    monkeypatch: pytest.MonkeyPatch, draws: str
) -> None:
    """mosel and aggressive on one av-digits trace (recorded residuals, no stalls): every pair of
    batches that starts in the same 1 ms slot (as the k-th of that slot) got the same ratio and
    overhead under the time grid. The per-batch stream (before) fails this."""
    scenario = av_digits()
    cond = conditions.CONDITIONS["strict"]
    arrivals = conditions.arrivals_for(
        scenario.profile, cond, 1.0, 0.8, seed=2, slack_ms=scenario.slack_ms, drop=scenario.drop
    )
    machines = logged_batches(monkeypatch)
    for policy in ("aggressive", "mosel"):
        mosel.simulate(
            scenario.profile, arrivals, common.config_for(policy, cond), residuals=scenario.residuals, seed=2,
            draws=draws,
        )  # fmt: skip
    one, two = (draws_by_slot(log) for log in machines)
    shared = sorted(set(one) & set(two))
    assert len(shared) > 50
    differing = [key for key in shared if one[key] != pytest.approx(two[key], rel=1e-12)]
    if draws == "time-grid":
        assert not differing
    else:
        assert differing  # the old stream: equal slots, different luck


def test_a_stall_hits_both_policies_when_both_are_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stalls on the wall clock begin at the same instants for every policy: at 1x on one seed,
    every stall instant at which both mosel and aggressive are running a batch stalls both."""
    scenario = av_digits()
    assert scenario.stalls is not None and scenario.body is not None
    cond = conditions.CONDITIONS["strict"]
    arrivals = conditions.arrivals_for(
        scenario.profile, cond, 1.0, 3.0, seed=1, slack_ms=scenario.slack_ms, drop=scenario.drop
    )
    often = dataclasses.replace(scenario.stalls, rate_per_s=5.0, clock="wall")
    instants = [t for b in range(5) for t in Machine(None, seed=1, stalls=often)._stall_block(b)[0]]
    machines = logged_batches(monkeypatch)
    for policy in ("aggressive", "mosel"):
        mosel.simulate(
            scenario.profile, arrivals, common.config_for(policy, cond), residuals=scenario.body,
            stalls=often, seed=1,
        )  # fmt: skip
    machines = machines[-2:]

    def running(
        log: list[tuple[float, float, float, float]], t: float
    ) -> tuple[float, float, float, float] | None:
        return next((b for b in log if b[0] <= t < b[0] + (b[2] + b[3]) / 1e6), None)

    both = 0
    for t in instants:
        one, two = running(machines[0], t), running(machines[1], t)
        if one is not None and two is not None:
            both += 1
            assert one[2] / one[1] > 5.0 and two[2] / two[1] > 5.0  # both stalled (the body stays below 2.2)
    assert both >= 3


def test_the_committed_stalls_are_the_fit_of_the_committed_residuals() -> None:
    """One stall (18.8x) split from the body (largest 2.18x); rate and length from the recorded
    device-time estimate (``stalls.py`` replays the recording for it: not repeated here)."""
    committed = json.loads(AV_DIGITS_STALLS.read_text())
    scenario = av_digits()
    assert stall_indices(scenario.residuals.ratios) == committed["removed"] == [418]
    replay = committed["method"]["replay"]
    device_s = replay["recorded_batches"] * replay["busy_us_mean"] / 1e6
    body, stalls = fit_stalls(scenario.residuals, device_s=device_s, predicted_us=replay["predicted_us_mean"])
    assert stalls == mosel.Stalls.from_json(committed["stalls"]) == scenario.stalls
    assert body == scenario.body and max(body.ratios) < 3.0 < max(scenario.residuals.ratios)
    assert 90.0 < stalls.lengths_ms[0] < 120.0 and 0.1 < stalls.rate_per_s < 0.4


def test_the_fitted_stalls_are_drawn_at_their_rate() -> None:
    """The scenario's stall process, on a device busy back to back for 2,000 s: about rate x 2,000 stalls."""
    scenario = av_digits()
    assert scenario.stalls is not None
    machine = Machine(None, seed=0, stalls=scenario.stalls)
    t = 0.0
    while t < 2000.0:
        exec_us, _ = machine.batch(t, 50_000.0)
        t += exec_us / 1e6
    expected = scenario.stalls.rate_per_s * t
    assert machine.stalls_met == pytest.approx(expected, abs=4 * math.sqrt(expected))


def test_bisection_finds_a_known_crossing_to_its_precision() -> None:
    crossing = 0.731
    calls: list[float] = []

    def violation_at(load: float) -> float:
        calls.append(load)
        return 0.01 * (load / crossing) ** 3

    grid = [0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
    found = common.bisect_capacity(violation_at, grid, 0.01, precision=0.02)
    assert found.load <= crossing <= found.above and found.above / found.load - 1 <= 0.02
    assert found.bracketed and len(calls) == len(grid) + math.ceil(math.log2(math.log(2) / math.log(1.02)))
    assert [p[0] for p in found.probes] == calls
    # Below the grid: loads halve until one passes.
    low = common.bisect_capacity(lambda x: 0.01 * (x / 0.03) ** 3, grid, 0.01, precision=0.05)
    assert low.load <= 0.03 <= low.above and low.above / low.load - 1 <= 0.05
    # Never passing, always passing.
    assert common.bisect_capacity(lambda x: 1.0, grid, 0.01).load == 0.0
    always = common.bisect_capacity(lambda x: 0.0, grid, 0.01)
    assert always.load == 4.0 and always.above == math.inf and not always.bracketed
    # Not monotone: the crossing above the largest passing grid load.
    bumpy = common.bisect_capacity(lambda x: 0.02 if 0.2 < x < 0.4 else 0.01 * (x / 1.5) ** 3, grid, 0.01)
    assert bumpy.load <= 1.5 <= bumpy.above
    with pytest.raises(ValueError, match="precision"):
        common.bisect_capacity(violation_at, grid, 0.01, precision=0.0)


def test_the_median_interval_covers_at_least_its_level() -> None:
    assert common.median_interval(list(range(10))) == (1, 8)  # x(2), x(9): 97.9%
    assert common.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few: the range
    assert common.median_interval(list(range(20))) == (5, 14)  # x(6), x(15): 95.9%


def test_the_budget_axis_reaches_mosel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = budget.entries_for([0.005, 0.01, None], [0.005, 0.01, 0.05], ["aggressive", "paper"])
    assert [e.label for e in entries] == ["aggressive", "paper", "mosel@0.5%", "mosel@1%", "mosel"]
    assert [e.targets for e in entries][2:] == [(0.005,), (0.01,), (0.005, 0.01, 0.05)]
    cond = conditions.CONDITIONS["strict"]
    configs = [e.config(cond) for e in entries]
    assert [c.miss_budget for c in configs] == [None, None, 0.005, 0.01, None]
    assert configs[0].policy == "aggressive" and configs[3].policy == "mosel"
    # The budget reaches the scheduler that the simulation runs.
    seen: list[float | None] = []
    original = mosel.simulate

    def spy(profile: Any, arrivals: Any, config: mosel.SchedulerConfig, **kw: Any) -> Any:
        seen.append(config.miss_budget)
        return original(profile, arrivals, config, **kw)

    monkeypatch.setattr(mosel, "simulate", spy)
    small = budget.curve("paper-tvlt", "strict", 0, entries[3], (1.0, 4.0), 60, True, 0.2)
    assert set(small["capacity"]) == {"0.01"} and set(small["grid"]) == {"1", "4"}
    assert seen and set(seen) == {0.01}


def test_goal_tables_and_capacity_ratios_from_a_tiny_run() -> None:
    entries = budget.entries_for([None], [0.01], ["aggressive", "agnostic_plus"])
    seeds = [0, 1]
    grid = (0.5, 2.0)
    curves = {
        (s, e.label): budget.curve("paper-tvlt", "strict", s, e, grid, 80, True, 0.2)
        for s in seeds
        for e in entries
    }
    summary = budget.summarise(curves, entries, seeds, grid, [0.01])
    ratio = summary["ratios"]["0.01"]["agnostic_plus"]
    per_seed = [
        curves[(s, "mosel")]["capacity"]["0.01"]["load"]
        / curves[(s, "agnostic_plus")]["capacity"]["0.01"]["load"]
        for s in seeds
    ]
    assert ratio["per_seed"] == pytest.approx(per_seed) and ratio["min"] <= ratio["median"] <= ratio["max"]
    row = summary["goals"]["mosel"]["loads"]["0.5"]
    assert row["seeds"] == 2 and 0 <= row["miss_goal_seeds"] <= 2 and "accuracy_gain" in row
    line = budget.conditions_line("paper-tvlt", "strict", True, 2, 80, 0.2)
    assert "slack 17.0 ms" in budget.describe(line) and line["machine"].startswith("exact")


def test_bucket_shares_count_the_costly_modality_per_bucket() -> None:
    scenario = scenario_named("text-sized")
    assert budget.costly_modality(scenario.profile) == "text"
    cond = conditions.CONDITIONS["strict"]
    arrivals = conditions.arrivals_for(
        scenario.profile, cond, 0.5, 0.3, 0, slack_ms=scenario.slack_ms, drop=scenario.drop
    )
    arrivals = budget.sized_arrivals(arrivals, scenario.profile, 0)
    assert all(a.sizes and 1 <= a.sizes["text"] <= 256 for a in arrivals)
    sim = mosel.simulate(scenario.profile, arrivals, common.config_for("mosel", cond))
    shares = budget.bucket_shares(sim, scenario.profile)
    assert set(shares) <= {"24", "64", "128", "256"} and all(0.0 <= v <= 1.0 for v in shares.values())
    everything = mosel.simulate(scenario.profile, arrivals, common.config_for("agnostic", cond))
    assert all(v == 1.0 for v in budget.bucket_shares(everything, scenario.profile).values())


class RefusedForTheTest(mosel.DeadlineError):
    """The test's own refusals, told apart from any real one (a slow machine's deadlines)."""


def test_the_admission_loop_survives_refused_submits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every 7th submit is refused at admission: counted, and the measurement completes."""
    original = decisions.gated_class

    def refusing(m: int) -> type:
        cls = original(m)
        submit = cls.submit
        calls = {"n": 0}

        def sometimes(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if kwargs and calls["n"] % 7 == 0:
                raise RefusedForTheTest(
                    "refused for the test",
                    deadline_ms=1.0,
                    predicted_ms=2.0,
                    best_accuracy_within_deadline=None,
                )
            return submit(self, *args, **kwargs)

        cls.submit = sometimes  # type: ignore[attr-defined]
        return cls

    monkeypatch.setattr(decisions, "gated_class", refusing)
    result = decisions.submit_latency(20, timed=30, max_batch=4)
    ours = {k: v for k, v in result["refusals"].items() if k.endswith("_RefusedForTheTest")}
    assert sum(ours.values()) == (20 + 30 + 1) // 7  # a real refusal on a busy machine is counted beside
    assert ours["refused_queueing_RefusedForTheTest"] > 0 and ours["refused_timed_RefusedForTheTest"] > 0
    assert result["refused_queueing"] + result["refused_timed"] >= sum(ours.values())
    assert result["submit_max_ms"] >= result["submit_p99_ms"] >= result["submit_p50_ms"] > 0


def test_decision_times_run_with_the_risk_price_and_report_cpu_and_max() -> None:
    times = decisions.decision_times(decisions.profile_for(2, 8), 16, 40, miss_budget=0.01)
    assert times["cpu_p50_ms"] <= times["cpu_p99_ms"] <= times["cpu_max_ms"]
    assert times["wait_p50_ms"] <= times["wait_p99_ms"] <= times["wait_max_ms"]
    assert 0.0 <= times["risk_limited_share"] <= 1.0


def test_live_mode_labels_take_a_miss_budget() -> None:
    import real

    cond = conditions.CONDITIONS["strict"]
    budgeted = real.labelled_config("mosel b=0.01", cond)
    assert (budgeted.policy, budgeted.miss_budget) == ("mosel", 0.01)
    both = real.labelled_config("mosel q=0.7 b=0.05", cond)
    assert (both.latency_quantile, both.miss_budget) == (0.7, 0.05)
    assert real.labelled_config("aggressive", cond).miss_budget is None
    with pytest.raises(ValueError, match="unknown knob"):
        real.labelled_config("mosel x=1", cond)
