"""In-process inputs are checked against the profiled schema before any work (issue 23)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mosel
from mosel.testing import ToyAV, toy_av_batches, toy_av_data


@pytest.fixture(scope="module")
def model() -> ToyAV:
    toy = ToyAV().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)
        mosel.profile(toy, toy_av_batches(16, 8), max_batch_size=8, repeats=2, warmup=1, progress=False)
    return toy


def test_float64_inputs_for_a_float32_model_are_cast_and_served(model: ToyAV) -> None:
    inputs, _ = toy_av_data(3, seed=5)
    wide = {m: x.double() for m, x in inputs.items()}  # what numpy and soundfile give
    with mosel.serving(model):
        got = model.infer(wide).output
        want = model.infer(inputs).output
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("modality", "make", "message"),
    [
        ("audio", lambda x: (x * 32767).to(torch.int16), "int16, the model takes float32"),
        ("video", lambda x: x[:, :, :3], r"has shape \(2, 1, 3, 16\), the model takes \(B, 1, 16, 16\)"),
        ("video", lambda x: x.unsqueeze(1), "dimensions"),
    ],
)
def test_inputs_that_do_not_fit_the_schema_are_refused_before_any_work(
    model: ToyAV, modality: str, make: object, message: str
) -> None:
    inputs, _ = toy_av_data(2, seed=6)
    bad = dict(inputs)
    bad[modality] = make(inputs[modality])  # type: ignore[operator]
    before = mosel.stats(model).counters.get("submitted", 0)
    with mosel.serving(model), pytest.raises(mosel.InputError, match=message):
        model.infer(bad)
    assert mosel.stats(model).counters.get("submitted", 0) == before  # refused before admission


def test_a_model_moved_to_float64_with_on_stale_warn_takes_its_new_dtype() -> None:
    toy = ToyAV().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)
        profile = mosel.profile(
            toy, toy_av_batches(16, 8), max_batch_size=8, repeats=2, warmup=1, progress=False
        )
        mosel.attach(toy, profile, on_stale="warn")
        toy.double()
        inputs, _ = toy_av_data(2, seed=7)
        with mosel.serving(toy):
            for given in (inputs, {m: x.double() for m, x in inputs.items()}):
                assert toy.infer(given).output.dtype == torch.float64
