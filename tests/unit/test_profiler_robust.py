"""Robust profiling (issue 13, item 6): the estimator, threads, re-timing on failed checks."""

from __future__ import annotations

import warnings

import pytest
import torch

import mosel
from mosel import profiler
from mosel.profiles import CostCheck

from .helpers import Tiny, tiny_inputs


def batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    return [(tiny_inputs(8), torch.zeros(8, dtype=torch.int64))]


def test_the_central_estimate_is_a_low_quantile_that_ignores_interference() -> None:
    quiet = [100.0] * 9
    assert profiler._central(quiet) == 100.0
    interfered = [100.0, 101.0, 102.0, 180.0, 190.0, 250.0, 300.0, 900.0, 2000.0]
    assert profiler._central(interfered) == pytest.approx(100.8)
    assert profiler._central([5.0]) == 5.0


def test_threads_are_set_while_profiling_recorded_and_restored() -> None:
    before = torch.get_num_threads()
    model = Tiny().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)  # a sub-microsecond toy: checks are noise
        profile = mosel.profile(
            model, batches(), max_batch_size=4, repeats=2, warmup=0, cost_checks=1, threads=1
        )
    assert profile.fingerprint.threads == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        mosel.profile(model, batches(), max_batch_size=4, threads=0)


def test_failed_cost_checks_time_every_table_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = profiler._check_costs

    def failing_then_real(*args: object) -> tuple[CostCheck, ...]:
        calls.append(1)
        checks = real(*args)  # type: ignore[arg-type]
        factor = 4.0 if len(calls) == 1 else 1.0  # the first round disagrees with the tables by 300%
        return tuple(CostCheck(c.groups, c.predicted_us, factor * c.predicted_us) for c in checks)

    monkeypatch.setattr(profiler, "_check_costs", failing_then_real)
    timed: list[int] = []
    real_once = profiler._Timer.once

    def counting(self: profiler._Timer, fn: object) -> float:
        timed.append(1)
        return real_once(self, fn)  # type: ignore[arg-type]

    monkeypatch.setattr(profiler._Timer, "once", counting)
    # threads given: the count is kept as it is, every table timed again at it
    mosel.profile(Tiny().eval(), batches(), max_batch_size=4, repeats=2, warmup=0, cost_checks=2, threads=2)
    assert len(calls) == 2  # re-checked once, then the checks agreed
    tables = 3 * 4 + 7 * 4  # 3 branches and 7 fusions at sizes 1..4
    assert len(timed) >= 2 * 2 * tables  # every table timed for two rounds, twice
