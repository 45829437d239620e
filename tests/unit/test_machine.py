"""The simulated device: common random numbers on a time grid, stalls, and their fit."""

from __future__ import annotations

import math
import random
import statistics

import pytest

import mosel
from mosel.machine import Machine, Stalls, fit_stalls, stall_indices
from mosel.testing import Passthrough, synthetic_profile

pytestmark = pytest.mark.unit

SAMPLE = mosel.Residuals(tuple(0.7 + 0.01 * i for i in range(61)), tuple(100.0 + 10.0 * i for i in range(37)))


def ratio_and_overhead(machine: Machine, start_s: float, predicted_us: float = 1000.0) -> tuple[float, float]:
    exec_us, overhead_us = machine.batch(start_s, predicted_us)
    return exec_us / predicted_us, overhead_us


def test_batches_starting_in_the_same_slot_get_the_same_draw_whatever_came_before() -> None:
    """Two machines of one seed: the k-th batch of a slot gets the slot's k-th draw, whatever
    the batches before it and whatever its size."""
    one = Machine(SAMPLE, seed=7, noise=0.2)
    two = Machine(SAMPLE, seed=7, noise=0.2)
    first = [ratio_and_overhead(one, t) for t in (0.0005, 0.0102, 0.0107, 0.5031)]
    second = [ratio_and_overhead(two, t, 3000.0) for t in (0.0003, 0.0031, 0.0101, 0.0109, 0.5039)]
    assert second[2] == pytest.approx(first[1]) and second[3] == pytest.approx(first[2])
    assert second[4] == pytest.approx(first[3])
    assert second[0] == pytest.approx(first[0])
    assert first[1] != first[2]  # one run never takes a draw twice
    other = Machine(SAMPLE, seed=8, noise=0.2)
    assert [ratio_and_overhead(other, t) for t in (0.0005, 0.0102, 0.0107, 0.5031)] != first


def test_per_batch_draws_are_the_old_stream() -> None:
    machine = Machine(SAMPLE, seed=3, noise=0.1, draws="per-batch")
    rng = random.Random(3)
    for t in (0.0, 0.0001, 0.0002, 2.0):
        ratio, overhead = SAMPLE.sample(rng, t)
        expected = 1000.0 * ratio * math.exp(rng.gauss(-0.01 / 2, 0.1))
        assert machine.batch(t, 1000.0) == (expected, overhead)


def test_time_grid_draws_follow_the_sample() -> None:
    machine = Machine(SAMPLE, seed=1)
    ratios = [ratio_and_overhead(machine, 0.002 * i, 1.0)[0] for i in range(20_000)]
    assert set(ratios) <= set(SAMPLE.ratios)
    assert statistics.mean(ratios) == pytest.approx(statistics.mean(SAMPLE.ratios), rel=0.01)
    noisy = Machine(None, seed=1, noise=0.3)
    logs = [math.log(ratio_and_overhead(noisy, 0.002 * i)[0]) for i in range(20_000)]
    assert statistics.stdev(logs) == pytest.approx(0.3, rel=0.03)


@pytest.mark.parametrize(
    ("draws", "clock"), [("time-grid", "device"), ("per-batch", "device"), ("time-grid", "wall")]
)
def test_stalls_begin_at_their_rate_per_second_of_device_time(draws: str, clock: str) -> None:
    """A device busy back to back for 400 s meets the stalls of 400 s, each adding its length."""
    stalls = Stalls(rate_per_s=20.0, lengths_ms=(2.0, 6.0), clock=clock)
    machine = Machine(None, seed=5, stalls=stalls, draws=draws)
    t, added_us = 0.0, 0.0
    while t < 400.0:
        exec_us, _ = machine.batch(t, 9000.0)
        added_us += exec_us - 9000.0
        t += exec_us / 1e6
    busy_s = t
    expected = stalls.rate_per_s * busy_s
    assert machine.stalls_met == pytest.approx(expected, abs=4 * math.sqrt(expected))
    assert added_us / 1e3 / machine.stalls_met == pytest.approx(stalls.mean_ms, rel=0.05)
    # The same machine again stalls at the same instants.
    one, two = (Machine(None, seed=5, stalls=stalls, draws=draws) for _ in range(2))
    assert [one.batch(0.001 * i, 900.0) for i in range(3000)] == [
        two.batch(0.001 * i, 900.0) for i in range(3000)
    ]


def test_a_stall_on_the_device_clock_strikes_after_the_same_work_whatever_the_idle_time() -> None:
    stalls = Stalls(rate_per_s=5.0, lengths_ms=(10.0,))
    first = Machine(None, seed=2, stalls=stalls)._stall_block(0)[0][0]  # device seconds
    batches = math.ceil(first / 0.001) + 3

    def stalled(gap_s: float) -> list[int]:
        machine, t, hit = Machine(None, seed=2, stalls=stalls), 0.0, []
        for i in range(batches):
            exec_us, _ = machine.batch(t, 1000.0)
            if exec_us > 1000.0:
                hit.append(i)
            t += exec_us / 1e6 + gap_s
        return hit

    assert stalled(0.0) == stalled(0.05) == [math.floor(first / 0.001)]


def test_a_stall_on_the_wall_clock_hits_whichever_batch_runs_when_it_begins() -> None:
    stalls = Stalls(rate_per_s=5.0, lengths_ms=(10.0,), clock="wall")
    probe = Machine(None, seed=2, stalls=stalls)
    instants = probe._stall_block(0)[0]
    assert instants, "seed 2 has a stall in its first second"
    first = instants[0]
    early = Machine(None, seed=2, stalls=stalls)
    assert early.batch(first - 0.0005, 1000.0)[0] == pytest.approx(1000.0 + 10_000.0)
    late = Machine(None, seed=2, stalls=stalls)
    assert late.batch(first - 0.0015, 1000.0)[0] == pytest.approx(1000.0)  # ended before it began
    idle = Machine(None, seed=2, stalls=stalls)
    assert idle.batch(first + 0.0001, 1000.0)[0] == pytest.approx(1000.0)  # began while idle


def test_fit_separates_stalls_from_the_body() -> None:
    rng = random.Random(0)
    body = [math.exp(rng.gauss(0.0, 0.13)) for _ in range(766)]
    ratios = (*body[:100], 19.0, *body[100:500], 9.0, *body[500:])
    sample = mosel.Residuals(ratios, tuple(float(i) for i in range(len(ratios))))
    assert stall_indices(ratios) == [100, 501]
    fitted_body, stalls = fit_stalls(sample, device_s=8.0, predicted_us=6000.0)
    assert len(fitted_body.ratios) == 766 and max(fitted_body.ratios) < 2.0
    assert 100.0 not in fitted_body.overhead_us and 501.0 not in fitted_body.overhead_us
    median = statistics.median(fitted_body.ratios)
    assert stalls.rate_per_s == pytest.approx(2 / 8.0)
    assert stalls.lengths_ms == pytest.approx(sorted([(19.0 - median) * 6.0, (9.0 - median) * 6.0]))
    assert (stalls.observed, stalls.device_s) == (2, 8.0)
    assert Stalls.from_json(stalls.to_json()) == stalls
    nothing, none = fit_stalls(mosel.Residuals(tuple(body)), device_s=8.0, predicted_us=6000.0)
    assert nothing.ratios == tuple(body) and none.rate_per_s == 0.0


def test_bad_stalls_and_draws_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        Stalls(-1.0, (1.0,))
    with pytest.raises(ValueError, match="lengths_ms"):
        Stalls(1.0, ())
    with pytest.raises(ValueError, match="clock='cpu'"):
        Stalls(1.0, (1.0,), clock="cpu")
    with pytest.raises(ValueError, match="device_s"):
        fit_stalls(SAMPLE, device_s=0.0, predicted_us=1.0)
    profile = synthetic_profile(
        Passthrough,
        branch_us={"audio": [100.0], "video": [100.0]},
        accuracy={"audio": 0.7, "video": 0.6, "audio+video": 0.8},
    )
    with pytest.raises(mosel.InputError, match="draws='sometimes'"):
        mosel.simulate(profile, [mosel.Arrival(0.0, 1)], draws="sometimes")
