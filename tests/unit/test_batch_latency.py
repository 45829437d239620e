"""BatchLatency, the running price of a batch being formed, prices exactly as Pricer.price does.

Batch formation asks it "this batch plus one more task" dozens of times per dispatch, so it keeps
running sums instead of re-deriving the batch's parts; the decisions depend on its answers to the
microsecond, so every answer must equal the price of the merged rows, whatever the correction.
"""

from __future__ import annotations

import random

import pytest

from mosel.scheduler import Scheduler, SchedulerConfig

from .test_dominance import PROFILES


@pytest.mark.parametrize("which", range(len(PROFILES)))
def test_the_running_price_equals_the_price_of_the_merged_rows(which: int) -> None:
    profile = PROFILES[which]
    pricer = Scheduler(profile, SchedulerConfig()).pricer
    strategies = [s for f in profile.plan.frontiers.values() for s in f.strategies]
    assert any(len(s.groups) > 1 for s in strategies)  # several configurations in one task, too
    rng = random.Random(which)
    limit = profile.max_batch_size
    for trial in range(200):
        for part in pricer.correction:  # any correction: the float arithmetic must match too
            pricer.correction[part] = rng.uniform(0.5, 2.0) if trial % 2 else 1.0
        batch = pricer.batch()
        rows: dict[frozenset[str], int] = {}
        for _ in range(rng.randint(1, 6)):
            strategy = rng.choice(strategies)
            if sum(rows.values()) + strategy.n > limit:
                break
            joined = dict(rows)
            for config, count in strategy.groups:
                joined[config] = joined.get(config, 0) + count
            expected = pricer.price(tuple(joined.items()))
            assert batch.with_(strategy) == expected
            assert batch.latency_us() == pricer.price(tuple(rows.items()))  # with_ left it as it was
            batch.add(strategy)
            rows = joined
            assert batch.latency_us() == expected
        batch.clear()
        assert batch.latency_us() == pricer.price(())
