"""The input schema of a real profiled model refuses what the model cannot take, and nothing else.

A Hugging Face-style text tower (token ids, an int64 attention mask, token type ids, each
looked up or masked as BERT does) and an image tower. The profile learns that ids, mask and
types share their length, the vocabulary from the embedding tables (not from the ids the
validation set happened to hold), that the int64 mask is 0/1, and decoding refuses each body
that broke the model before (a 500 IndexError or RuntimeError, or a 200 made of NaN) while
accepting every validation row.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mosel
from mosel.profiler import Metric, top1
from mosel.schema import ModalitySchema, ValueRange, decode
from mosel.spec import spec_of

VOCAB = 40
SEEN = 30  # validation ids lie in [1, SEEN): ids SEEN..VOCAB-1 are valid but never profiled
CLASSES = 3


@mosel.multimodal
class BertLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.types = nn.Embedding(2, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)  # in eval: the nested-tensor fast path
        self.text_head = nn.Linear(8, CLASSES)
        self.image_head = nn.Linear(4, CLASSES)

    @mosel.modality("text")
    def encode_text(self, text: Mapping[str, Tensor]) -> Tensor:
        hidden = self.words(text["input_ids"]) + self.types(text["token_type_ids"])
        mask = text["attention_mask"]
        hidden = self.encoder(hidden, src_key_padding_mask=mask == 0)
        scores = hidden.sum(-1) + (1 - mask) * torch.finfo(hidden.dtype).min  # BERT's extended mask
        weights = scores.softmax(-1).unsqueeze(-1)
        return self.text_head((weights * hidden).sum(1) + hidden.mean(1))  # the mean pools padding too

    @mosel.modality("image")
    def encode_image(self, image: Tensor) -> Tensor:
        return self.image_head(image)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(features.values())).sum(0)


def split(b: int, t: int, seed: int) -> tuple[dict[str, Any], Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, SEEN, (b, t), generator=g) * mask
    types = (torch.arange(t)[None, :] >= t // 2).long() * mask
    inputs = {
        "text": {"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
        "image": torch.randn(b, 4, generator=g),
    }
    return inputs, torch.randint(0, CLASSES, (b,), generator=g)


DATA = [split(5, t, seed) for seed, t in enumerate((4, 7, 5, 7))]


MEASURED: list[Tensor] = []
"""The outputs the profile's accuracy was measured on."""


def measuring_top1(output: Tensor, target: Tensor) -> Tensor:
    MEASURED.append(output.clone())
    return top1(output, target)


def profiled(model: nn.Module, metric: Metric = top1) -> mosel.Profile:
    profile = mosel.profile(
        model, DATA, metric=metric, max_batch_size=4, warmup=0, repeats=1, cost_checks=0, progress=False
    )
    mosel.close(model)
    return profile


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    MEASURED.clear()
    return profiled(BertLike().eval(), measuring_top1)


@pytest.fixture
def model(profile: mosel.Profile) -> Iterator[BertLike]:
    m = BertLike().eval()
    mosel.attach(m, profile)
    yield m
    mosel.close(m, cancel=True)


def rows(inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each request of a batch as its own JSON body."""
    text, image = inputs["text"], inputs["image"]
    return [
        {"text": {k: v[i : i + 1].tolist() for k, v in text.items()}, "image": image[i : i + 1].tolist()}
        for i in range(len(image))
    ]


def test_the_profile_learns_agreeing_lengths_the_vocabulary_and_the_mask(profile: mosel.Profile) -> None:
    text = profile.input_schema["text"]
    leaves = {leaf.path[0]: leaf for leaf in text.leaves}
    index = {leaf.path[0]: i for i, leaf in enumerate(text.leaves)}
    assert [set(group) for group in text.agree] == [{(index[k], 0) for k in leaves}]
    assert leaves["input_ids"].values == ValueRange(0, VOCAB - 1, "embedding")  # the table, not the data
    assert leaves["input_ids"].observed is not None and leaves["input_ids"].observed[1] < SEEN
    assert leaves["token_type_ids"].values == ValueRange(0, 1, "embedding")
    assert leaves["attention_mask"].values == ValueRange(0, 1, "mask")
    assert mosel.Profile.from_json(profile.to_json()).input_schema == profile.input_schema
    # watching the embedding lookups (a torch function mode, which turns the encoder's fast path
    # off) changed nothing the profile measured: the metric saw what plain calls give
    model = BertLike().eval()
    spec = spec_of(model)
    expected = []
    with torch.inference_mode():
        for inputs, _ in DATA:
            features = {m: getattr(model, spec.branches[m])(inputs[m]) for m in spec.modalities}
            expected += [model.fuse({m: features[m] for m in config}) for config in spec.configurations]
    assert len(MEASURED) == len(expected)
    assert all(torch.equal(seen, plain) for seen, plain in zip(MEASURED, expected))


def test_no_validation_row_and_no_valid_id_the_data_lacked_is_refused(
    model: BertLike, profile: mosel.Profile
) -> None:
    schema = profile.input_schema["text"]
    assert any(leaf.values is not None for leaf in schema.leaves)  # there are ranges to refuse with
    for inputs, _ in DATA:
        for i, body in enumerate(rows(inputs)):
            text = decode("text", body["text"], schema)
            for key, value in inputs["text"].items():
                assert torch.equal(text[key], value[i : i + 1])
            image = decode("image", body["image"], profile.input_schema["image"])
            assert torch.equal(image, inputs["image"][i : i + 1])
    body = rows(DATA[0][0])[0]["text"]
    body["input_ids"][0][0] = VOCAB - 1  # in the table, never in the validation data
    body["attention_mask"][0][0] = 1
    model.infer({"text": decode("text", body, schema)})  # type: ignore[operator]


def broken(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(rows(DATA[1][0])[1])
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


BAD = [
    # lengths that disagree reached the model: a 500 RuntimeError
    (broken(("text", "attention_mask"), [[1, 1, 1]]), r"text\['attention_mask'\] has 3 at dimension 1"),
    (broken(("text", "token_type_ids"), [[0] * 8]), r"text\['token_type_ids'\] has 8 at dimension 1"),
    # ids outside the tables: a 500 IndexError (a device-side assert on a GPU)
    (broken(("text", "input_ids", 0, 2), VOCAB), rf"text\['input_ids'\] holds {VOCAB} at \(0, 2\)"),
    (broken(("text", "input_ids", 0, 0), -1), r"text\['input_ids'\] holds -1 at \(0, 0\)"),
    (broken(("text", "input_ids", 0, 0), 10**200), r"text\['input_ids'\] holds an integer beyond int64"),
    (broken(("text", "token_type_ids", 0, 1), 2), r"text\['token_type_ids'\] holds 2 at \(0, 1\)"),
    # a mask of 2 or -1 flips BERT's additive mask: a 200 computed from garbage attention before
    (broken(("text", "attention_mask", 0, 0), 2), r"text\['attention_mask'\] holds 2 at \(0, 0\).* a mask"),
    (broken(("text", "attention_mask", 0, 0), -1), r"text\['attention_mask'\] holds -1"),
    # non-finite floats: a 200 whose every output is NaN, its prediction class 0
    (broken(("image", 0, 1), float("nan")), r"image holds nan at \(0, 1\)"),
    (broken(("image", 0, 1), float("inf")), r"image holds inf at \(0, 1\)"),
    (broken(("image", 0, 3), 1e39), r"image holds 1e\+39 at \(0, 3\), beyond float32's range"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_each_body_the_model_cannot_take_is_refused_naming_the_leaf(
    profile: mosel.Profile, body: dict[str, Any], message: str
) -> None:
    with pytest.raises(mosel.InputError, match=message):
        for modality, value in body.items():
            decode(modality, value, profile.input_schema[modality])


def test_finite_false_lets_non_finite_floats_through(profile: mosel.Profile) -> None:
    image = decode(
        "image", [[float("nan"), 1e39, float("-inf"), 0.0]], profile.input_schema["image"], finite=False
    )
    assert image.dtype == torch.float32 and not bool(torch.isfinite(image[0, :3]).any())


def test_over_http_each_refusal_is_a_400(model: BertLike) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import mosel.http

    def post(text: str) -> Any:
        return client.post("/predict", content=text.encode(), headers={"content-type": "application/json"})

    with TestClient(mosel.http.create_app(model)) as client:
        for body, message in BAD:  # json.dumps writes NaN and Infinity, as Python's json reads them
            response = post(json.dumps({"inputs": body}))
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "InputError"
            assert re.search(message, response.json()["detail"]), response.json()["detail"]
        text = json.dumps({"inputs": broken(("image", 0, 0), 12345.5)}).replace("12345.5", "1e400")
        response = post(text)  # a JSON number beyond float64: Python reads it as infinity
        assert response.status_code == 400 and "image holds inf at (0, 0)" in response.json()["detail"]
        for inputs, _ in DATA[:2]:
            for body in rows(inputs):
                assert post(json.dumps({"inputs": body})).status_code == 200


def test_a_compiled_branch_learns_the_same_ranges(profile: mosel.Profile) -> None:
    model = mosel.compile_branches(BertLike().eval(), backend="eager")
    compiled: ModalitySchema = profiled(model).input_schema["text"]
    assert compiled == profile.input_schema["text"]
    assert {leaf.path[0]: leaf.values for leaf in compiled.leaves}["input_ids"] == ValueRange(
        0, VOCAB - 1, "embedding"
    )
