"""The Hugging Face worked examples, run small: ViT + BERT (image + text), Wav2Vec2 + BERT (audio + text).

Each example is built once per module (trained, profiled) and then served: every served row
equals ``mosel.run_configuration`` for the configuration its result names, rows missing a
modality are never computed for it, expected accuracy agrees with accuracy measured against the
labels, and over HTTP raw captions, pixels and waveforms, pre-processed server-side by the
hook, give what ``infer`` gives on the same pre-processed inputs; a bad raw field is a 400
naming it. Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import base64
import inspect
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import mosel

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("PIL")  # the image processor's backend

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import hf_audio_text
import hf_image_text

Example = tuple[ModuleType, Any]


def _built(module: ModuleType) -> Iterator[Example]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the examples run; a busy host makes more threads erratic
    try:
        with warnings.catch_warnings():  # a busy host's cost-check warning is not what these tests test
            warnings.simplefilter("ignore", mosel.MoselWarning)
            built = module.build(small=True)
        yield module, built
        mosel.close(built.model)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_text() -> Iterator[Example]:
    yield from _built(hf_image_text)


@pytest.fixture(scope="module")
def audio_text() -> Iterator[Example]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    yield from _built(hf_audio_text)


@pytest.fixture(params=["image_text", "audio_text"])
def example(request: pytest.FixtureRequest) -> Example:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def test_every_served_row_equals_its_configuration_run_by_hand(example: Example) -> None:
    module, built = example
    profile = built.profile
    frontier = profile.plan.frontier(frozenset(profile.modalities), 8)
    fastest, best = frontier.strategies[0].predicted_latency_ms, frontier.best.predicted_latency_ms
    seen: set[frozenset[str]] = set()
    slos: list[dict[str, Any]] = [
        {},
        {"deadline_ms": (fastest + best) / 2, "best_effort": True},
        {"deadline_ms": fastest, "best_effort": True},
    ]
    masks = {m: torch.tensor([i % 3 != k for i in range(8)]) for k, m in enumerate(profile.modalities)}
    for start, slo in zip((0, 8, 16, 24), [*slos, {"present": masks}]):
        inputs = built.preprocess(module.raw(built.test, range(start, start + 8)))
        result = built.model.infer(inputs, **slo)
        assert len(result.modalities) == 8
        for config in set(result.modalities):
            rows = [i for i, c in enumerate(result.modalities) if c == config]
            by_hand = mosel.run_configuration(built.model, inputs, config)
            assert torch.allclose(result.output[rows], by_hand[rows], atol=1e-4), (slo, config)
            seen.add(config)
    assert len(seen) >= 2, seen  # the present masks alone give three configurations


def _towers(module: ModuleType, model: nn.Module) -> dict[str, nn.Module]:
    if module is hf_image_text:
        return {"image": model.vision_model, "text": model.text_model}
    return {"audio": model.audio_tower, "text": model.text_tower}


SENTINEL = 7.0  # a placeholder value no real row holds in every position


def test_rows_missing_a_modality_are_never_computed_for_it(example: Example) -> None:
    module, built = example
    for missing in built.profile.modalities:
        inputs = built.preprocess(module.raw(built.test, range(8)))
        absent = torch.tensor([i % 2 == 1 for i in range(8)])
        first = next(iter(inputs[missing].keys()))  # input_ids, pixel_values or input_values
        leaf = inputs[missing][first]
        where = absent.view(-1, *[1] * (leaf.dim() - 1))
        inputs[missing][first] = torch.where(where, SENTINEL, leaf).to(leaf.dtype)
        rows_seen: list[Tensor] = []

        def spy(
            tower: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            name: str = first,
            seen: Any = rows_seen,
        ) -> None:
            seen.append(kwargs[name] if name in kwargs else args[0])

        handle = _towers(module, built.model)[missing].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            result = built.model.infer(inputs, present={missing: ~absent})
        finally:
            handle.remove()
        for i, config in enumerate(result.modalities):
            assert (missing in config) is not bool(absent[i]), (missing, i, config)
        assert sum(len(batch) for batch in rows_seen) >= 4, missing  # the rows that have it were computed
        for batch in rows_seen:  # no row the tower saw was a placeholder
            assert not (batch.flatten(1) == SENTINEL).all(1).any(), missing


def test_expected_accuracy_is_within_a_tolerance_of_the_accuracy_measured(example: Example) -> None:
    module, built = example
    profile, test = built.profile, built.test
    frontier = profile.plan.frontier(frozenset(profile.modalities), 8)
    deadline_ms = (frontier.strategies[0].predicted_latency_ms + frontier.best.predicted_latency_ms) / 2
    expected, correct, rows = 0.0, 0, 0
    for start in range(0, len(test) - len(test) % 8, 8):
        inputs = built.preprocess(module.raw(test, range(start, start + 8)))
        result = built.model.infer(inputs, deadline_ms=deadline_ms, best_effort=True)
        expected += result.expected_accuracy * 8
        correct += int((result.output.argmax(-1) == test.labels[start : start + 8]).sum())
        rows += 8
    # validation and test rows are distinct (and, for audio, distinct voices): ~3 standard errors
    assert abs(expected / rows - correct / rows) <= 0.12, (expected / rows, correct / rows)


def _has_hook() -> bool:
    import mosel.http

    return "preprocess" in inspect.signature(mosel.http.create_app).parameters


needs_hook = pytest.mark.skipif(
    not _has_hook(), reason="mosel.http has no pre-processing hook yet (create_app(model, preprocess=...))"
)


def _b64(wave: Any) -> dict[str, Any]:
    """A waveform as a binary leaf: base64 of its little-endian float32 samples."""
    samples = np.asarray(wave, dtype="<f4")
    return {"$b64": base64.b64encode(samples.tobytes()).decode(), "dtype": "float32", "shape": [len(samples)]}


def _body(module: ModuleType, raw: dict[str, Any]) -> dict[str, Any]:
    """The JSON a client sends: caption strings, pixels or waveforms as lists of numbers."""
    return {m: [x if isinstance(x, str) else x.tolist() for x in v] for m, v in raw.items()}


@needs_hook
def test_http_with_raw_inputs_answers_what_infer_gives_on_the_same_preprocessed_inputs(
    example: Example,
) -> None:
    from fastapi.testclient import TestClient

    module, built = example
    raw = module.raw(built.test, range(4))
    wanted = built.model.infer(built.preprocess(raw))  # no SLO: every modality, as the request below
    with TestClient(module.create_app(built)) as client:
        response = client.post("/predict", json={"inputs": _body(module, raw)})
        if module is hf_audio_text:  # waveforms as binary leaves: the hook gets the same arrays
            binary = {"audio": [_b64(w) for w in raw["audio"]], "text": raw["text"]}
            compact = client.post("/predict", json={"inputs": binary})
            assert compact.status_code == 200, compact.text
            assert compact.json()["outputs"] == response.json()["outputs"]
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["prediction"] == wanted.output.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(answer["outputs"]), wanted.output, atol=1e-4)
    assert answer["modalities"] == [sorted(c) for c in wanted.modalities]


@needs_hook
def test_a_bad_raw_field_answers_400_naming_it(example: Example) -> None:
    from fastapi.testclient import TestClient

    module, built = example
    raw = _body(module, module.raw(built.test, range(2)))
    bad = "image" if module is hf_image_text else "audio"
    with TestClient(module.create_app(built)) as client:
        for field, value in ((bad, ["not numbers", "at all"]), ("text", 5)):
            response = client.post("/predict", json={"inputs": {**raw, field: value}})
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "InputError"
            assert field in response.json()["detail"], response.json()


def test_the_tour_prints_what_the_example_shows(example: Example, capsys: pytest.CaptureFixture[str]) -> None:
    module, built = example
    if not _has_hook():
        pytest.skip("the tour's HTTP part needs mosel.http's pre-processing hook")
    module.tour(built)
    out = capsys.readouterr().out
    assert "every row equals run_configuration" in out
    assert "POST /predict -> 200" in out
    assert "-> 400" in out
