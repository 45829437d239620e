"""Per-row escalation on a real model: exact rows under concurrency, floors, profiling, no signal."""

from __future__ import annotations

import concurrent.futures
import random
import warnings
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

import mosel
from mosel.calibrating import overhead_sizes
from mosel.runtime import _state
from tests.unit.votes import Votes, votes_batches, votes_data, votes_profile


def _quick_profile(model: torch.nn.Module, rows: int) -> tuple[mosel.Profile, list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        profile = mosel.profile(
            model,
            votes_batches(rows, seed=4),
            max_batch_size=4,
            warmup=0,
            repeats=1,
            cost_checks=0,
            progress=False,
        )
    return profile, [str(w.message) for w in seen if issubclass(w.category, mosel.MoselWarning)]


def test_rows_stay_exact_and_floors_hold_under_concurrency_with_escalation() -> None:
    model = Votes().eval()
    profile = votes_profile(model)
    mosel.attach(model, profile)
    floor = round(max(profile.accuracy.values()) - 0.05, 3)
    inputs, _ = votes_data(600, seed=21)
    rng = random.Random(0)
    jobs = []
    start = 0
    while start < 560:
        n = rng.choice((1, 2, 3, 5, 8))
        jobs.append((start, n))
        start += n

    def call(job: tuple[int, int]) -> tuple[tuple[int, int], mosel.Result]:
        first, n = job
        rows = {m: x[first : first + n] for m, x in inputs.items()}
        if first % 2:
            return job, model.infer(rows, deadline_ms=500.0, min_accuracy=floor)
        return job, model.submit(rows, deadline_ms=500.0, min_accuracy=floor).result()

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            done = list(pool.map(call, jobs))
        escalated = 0
        for (first, n), result in done:
            assert len(result.modalities) == len(result.escalated) == n
            assert result.expected_accuracy >= floor
            escalated += sum(result.escalated)
            for i in range(n):
                row = {m: x[first + i : first + i + 1] for m, x in inputs.items()}
                alone = mosel.run_configuration(model, row, result.modalities[i])
                assert torch.allclose(alone, result.output[i : i + 1], atol=1e-6), (
                    first,
                    i,
                    result.modalities[i],
                )
                if result.escalated[i]:
                    assert any(
                        s.chain is not None and result.modalities[i] in s.chain.stages[1:]
                        for s in result.strategies
                    )
        assert escalated > 0
        stages = mosel.stats(model).escalation["stages"]
        assert stages[0]["escalated"] >= escalated - sum(s["escalated"] for s in stages[1:])
    finally:
        mosel.close(model)


def test_profiling_calibrates_from_enough_rows_and_warns_below_a_thousand() -> None:
    model = Votes().eval()
    profile, notes = _quick_profile(model, 600)
    calibration = profile.calibration
    assert calibration is not None and calibration.rows == 600
    assert calibration.signal in ("max_probability", "margin") and set(calibration.ranking) == {
        "max_probability",
        "margin",
    }
    assert calibration.signal == max(calibration.ranking, key=calibration.ranking.__getitem__)
    assert calibration.stage_overhead_us > 0.0
    sizes = [n for n, _ in calibration.stage_overhead_by_rows]  # timed per batch size
    assert sizes == overhead_sizes(profile.max_batch_size) and sizes[0] == 1 and len(sizes) >= 3
    assert all(us > 0.0 for _, us in calibration.stage_overhead_by_rows)
    assert any("calibrated on 600 validation rows" in n for n in notes)
    assert _state(model).serve(model).scheduler.pricer.reference_plan is not profile.plan
    mosel.close(model)
    few, notes = _quick_profile(Votes().eval(), 150)
    assert few.calibration is None and not any("escalation" in n for n in notes)


@mosel.multimodal
class VotesDict(Votes):
    """The same votes, the output wrapped in a dict: no default confidence signal."""

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            "logits": torch.stack([features[m] for m in ("audio", "image", "video") if m in features]).sum(0)
        }


@mosel.multimodal
class VotesOwnSignal(Votes):
    """The votes with a confidence of their own: the largest summed vote."""

    @mosel.confidence
    def sure(self, output: Tensor) -> Tensor:
        return output.amax(dim=-1)


def test_a_model_without_a_confidence_signal_serves_as_before() -> None:
    model = VotesDict().eval()
    metric = lambda o, t: (o["logits"].argmax(-1) == t).double()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)
        profile = mosel.profile(
            model, votes_batches(600, seed=4), metric=metric, max_batch_size=4, warmup=0, repeats=1,
            cost_checks=0, progress=False,
        )  # fmt: skip
    assert profile.calibration is None
    server = _state(model).serve(model)
    assert server.scheduler.pricer.reference_plan is profile.plan and server.later is None
    inputs, _ = votes_data(4, seed=5)
    result = model.infer(inputs, deadline_ms=200.0, min_accuracy=0.6)
    assert result.escalated == (False,) * 4
    mosel.close(model)


def test_a_confidence_of_the_models_own_is_calibrated_and_served() -> None:
    model = VotesOwnSignal().eval()
    assert mosel.spec_of(model).confidence == "sure"
    profile, _ = _quick_profile(model, 600)
    assert profile.calibration is not None and profile.calibration.signal == "custom"
    inputs, _ = votes_data(8, seed=6)
    result = model.infer(
        inputs, deadline_ms=500.0, min_accuracy=round(max(profile.accuracy.values()) - 0.05, 3)
    )
    for i in range(8):
        row = {m: x[i : i + 1] for m, x in inputs.items()}
        assert torch.allclose(
            mosel.run_configuration(model, row, result.modalities[i]), result.output[i : i + 1]
        )
    mosel.close(model)


def test_a_second_confidence_mark_is_refused() -> None:
    with pytest.raises(mosel.SpecError, match="confidence"):

        @mosel.multimodal
        class Two(Votes):
            @mosel.confidence
            def one(self, output: Tensor) -> Tensor:
                return output.amax(-1)

            @mosel.confidence
            def two(self, output: Tensor) -> Tensor:
                return output.amax(-1)
