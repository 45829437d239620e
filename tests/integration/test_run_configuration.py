"""``mosel.run_configuration``: what a served row must equal, computed by hand (issue 23)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mosel
from mosel.testing import ToyAV, synthetic_profile, toy_av_data


@pytest.fixture(scope="module")
def model() -> ToyAV:
    toy = ToyAV().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)
        mosel.attach(
            toy,
            synthetic_profile(
                toy,
                branch_us={
                    "audio": [100.0 * b for b in range(1, 17)],
                    "video": [400.0 * b for b in range(1, 17)],
                },
                accuracy={"audio": 0.7, "video": 0.6, "audio+video": 0.9},
            ),
            scheduler=mosel.SchedulerConfig(policy="aggressive"),  # the cheapest mix meeting a floor
        )
    return toy


def test_every_served_row_equals_its_configuration_run_by_hand(model: ToyAV) -> None:
    inputs, _ = toy_av_data(12, seed=3)
    present = {"video": torch.tensor([i % 3 != 0 for i in range(12)])}
    with mosel.serving(model):
        mixed = model.infer(inputs, deadline_ms=10_000.0, min_accuracy=0.78)  # audio, and both
        masked = model.infer(inputs, deadline_ms=10_000.0, min_accuracy=0.65, present=present)
    assert len(set(mixed.modalities)) > 1
    assert all(c == frozenset({"audio"}) for i, c in enumerate(masked.modalities) if i % 3 == 0)
    for result in (mixed, masked):
        for i, configuration in enumerate(result.modalities):
            row = {m: x[i : i + 1] for m, x in inputs.items()}
            torch.testing.assert_close(
                result.output[i : i + 1], mosel.run_configuration(model, row, configuration)
            )


def test_a_configuration_the_inputs_cannot_run_is_refused(model: ToyAV) -> None:
    inputs, _ = toy_av_data(2, seed=4)
    with pytest.raises(mosel.InputError, match="needs inputs for"):
        mosel.run_configuration(model, {"audio": inputs["audio"]}, {"audio", "video"})
    with pytest.raises(mosel.InputError, match="unknown"):
        mosel.run_configuration(model, inputs, {"smell"})
    with pytest.raises(mosel.InputError, match="non-empty"):
        mosel.run_configuration(model, inputs, set())
