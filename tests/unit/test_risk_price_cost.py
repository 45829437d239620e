"""The risk price computed cheaply gives the very values of its plain definition (issue 24, goal 5).

Each dispatch that may buy an upgrade prices every candidate batch (dozens at 64 queued jobs) over
every residual and every job at risk. The cheaper computations here (counting by bisection, the
jobs still to come priced only for the candidates looked at, a slack sample kept sorted, one
running batch stepped from candidate to candidate) must agree with the definitions to the last
bit: the miss budget's credit accumulates what they return, and a decision may turn on it.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from mosel.estimators import SlackSample
from mosel.pricing import Delayed
from mosel.scheduler import Job, Scheduler, SchedulerConfig
from mosel.tail import outlasting

from .helpers import Tiny, tiny_profile
from .test_dominance import PROFILES


def test_outlasting_is_the_mean_of_the_comparison_to_the_last_bit() -> None:
    rng = np.random.default_rng(0)
    for trial in range(400):
        candidates, samples, jobs = (
            int(rng.integers(1, 40)),
            int(rng.choice([1, 7, 64, 100, 256])),
            int(rng.integers(0, 30)),
        )
        durations = rng.uniform(100, 20_000, (candidates, 1)) * np.exp(rng.normal(0, 0.5, samples))
        if trial % 3 == 0:
            durations = np.round(durations, -2)  # ties between durations and thresholds
        thresholds = rng.uniform(-1_000, 40_000, jobs)
        if jobs and trial % 2 == 0:
            thresholds[: jobs // 2] = rng.choice(durations.ravel(), jobs // 2)
        if jobs and trial % 5 == 0:
            thresholds[0] = np.nan
        weights = rng.integers(1, 9, jobs).astype(np.float64)
        plain = (durations[:, :, None] > thresholds[None, None, :]).mean(axis=1)
        cheap = outlasting(durations, thresholds)
        assert np.array_equal(plain, cheap)
        assert np.array_equal(plain @ weights, cheap @ weights)


def _sorted_reference(pairs: list[tuple[float, int]], delays: np.ndarray) -> np.ndarray:
    """SlackSample.share_missing's definition: sort the window's pairs, cumulate their requests."""
    kept = sorted(p for p in pairs if p[0] >= 0.0)
    total = sum(n for _, n in pairs) or 1
    values = np.asarray([s for s, _ in kept], dtype=np.float64)
    shares = np.concatenate([[0.0], np.cumsum(np.asarray([n for _, n in kept], dtype=np.float64)) / total])
    return shares[np.searchsorted(values, delays, side="left")]


def test_the_slack_sample_kept_sorted_prices_delays_as_sorting_its_window_would() -> None:
    rng = random.Random(3)
    sample = SlackSample(size=40)
    headroom: list[tuple[float, int]] = []
    slack: list[tuple[float, int]] = []
    delays = np.asarray([-5.0, 0.0, 0.5, 3.0, 10.0, 50.0, 99.0, 1e9])
    for step in range(600):
        value = float(rng.choice([rng.uniform(-20, 100), rng.randrange(-3, 12), 0.0]))  # ties, zeros
        requests = rng.randint(1, 4)
        if step < 100 or rng.random() < 0.3:
            sample.arrived(value, requests)
            headroom = [*headroom, (value, requests)][-40:]
        else:
            sample.finished(value, requests)
            slack = [*slack, (value, requests)][-40:]
        window = slack if len(slack) >= 32 else headroom
        assert np.array_equal(sample.share_missing(delays), _sorted_reference(window, delays))


@pytest.mark.parametrize("with_coming", [False, True])
def test_first_within_chooses_what_expected_misses_chooses_with_the_same_value(with_coming: bool) -> None:
    pricer = Scheduler(tiny_profile(Tiny()), SchedulerConfig()).pricer
    rng = np.random.default_rng(1)
    slack = SlackSample()
    for _ in range(200):
        slack.finished(float(rng.uniform(0, 30_000)), int(rng.integers(1, 4)))
    for trial in range(300):
        if trial % 50 == 0:  # residual samples of sizes that are not powers of two, then the full window
            for i in range(int(rng.integers(1, 90))):
                pricer.tail.observe(
                    float(np.exp(rng.normal(0, 0.3))), 1.0, float(rng.uniform(0, 300)), float(i)
                )
        candidates = int(rng.integers(1, 30))
        corrected = np.concatenate([np.sort(rng.uniform(1_000, 20_000, candidates - 1))[::-1], [900.0]])
        jobs = int(rng.integers(0, 40))
        thresholds = rng.uniform(0, 40_000, jobs)
        weights = rng.integers(1, 9, jobs).astype(np.float64)
        delayed = (
            Delayed(float(rng.uniform(0, 5)), float(rng.uniform(1, 3)), slack.share_missing)
            if with_coming
            else None
        )
        credit = float(rng.choice([0.0, 1e-3, 0.05, 0.5, 5.0, -1.0]))
        added = pricer.expected_misses(corrected, thresholds, weights, delayed)
        added = added - added[-1]
        chosen = next(i for i, extra in enumerate(added) if extra <= credit or i == len(added) - 1)
        assert pricer.first_within(corrected, thresholds, weights, credit, delayed) == (chosen, added[chosen])


@pytest.mark.parametrize("which", range(len(PROFILES)))
def test_a_batch_stepped_between_options_is_corrected_as_the_pricer_corrects_its_rows(which: int) -> None:
    profile = PROFILES[which]
    pricer = Scheduler(profile, SchedulerConfig()).pricer
    frontiers = list(profile.plan.frontiers.values())
    rng = random.Random(which)
    for trial in range(100):
        for part in pricer.correction:
            pricer.correction[part] = rng.uniform(0.5, 2.0) if trial % 2 else 1.0
        chosen, rows_in = [], 0
        for f in rng.sample(frontiers, len(frontiers)):  # tasks whose rows fit one batch
            if len(chosen) < 4 and rows_in + f.n <= profile.max_batch_size:
                chosen.append((f, rng.randrange(len(f.strategies))))
                rows_in += f.n
        batch = pricer.batch()
        for frontier, k in chosen:
            batch.add(frontier.strategies[k])
        for _ in range(6):
            i = rng.randrange(len(chosen))
            frontier, k = chosen[i]
            new = rng.randrange(len(frontier.strategies))
            batch.swap(frontier.strategies[k], frontier.strategies[new])
            chosen[i] = (frontier, new)
            rows: dict[frozenset[str], int] = {}
            for f, j in chosen:
                for config, count in f.strategies[j].groups:
                    rows[config] = rows.get(config, 0) + count
            assert batch.corrected_us() == pricer.corrected_us(tuple(rows.items()))


@pytest.mark.parametrize("which", range(len(PROFILES)))
def test_a_frontier_repriced_at_once_is_priced_as_each_strategy_alone(which: int) -> None:
    profile = PROFILES[which]
    scheduler = Scheduler(profile, SchedulerConfig())
    pricer = scheduler.pricer
    rng = random.Random(which)
    for trial in range(60):
        for part in pricer.correction:
            pricer.correction[part] = rng.uniform(0.5, 2.0) if trial % 3 else 1.0
        pricer.tail.margin, pricer.tail.overhead_us = rng.uniform(1.0, 1.5), rng.uniform(0.0, 300.0)
        pricer.reprice()
        for frontier in profile.plan.frontiers.values():
            job = Job(n=frontier.n, available=frontier.available, arrival=0.0)
            one_by_one = list(itertools.accumulate((pricer.price_of(s) for s in frontier.strategies), max))
            assert list(pricer.latencies(frontier, job)) == one_by_one
