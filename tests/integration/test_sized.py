"""Shape-aware costs on a real model: a text tower whose latency grows with the sequence length."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from torch import Tensor, nn

import mosel

pytestmark = pytest.mark.integration

LENGTHS = (8, 32, 128)  # the validation data's padded lengths, one batch each


@mosel.multimodal
class AttentionText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.attend = nn.MultiheadAttention(16, 2, batch_first=True)
        self.image = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    @mosel.modality("text", size=lambda x: x["input_ids"].shape[1], buckets=LENGTHS)
    def encode_text(self, x: Mapping[str, Tensor]) -> Tensor:
        h = self.embed(x["input_ids"])
        pad = x["attention_mask"] == 0
        h, _ = self.attend(h, h, h, key_padding_mask=pad, need_weights=False)
        return (h * x["attention_mask"][..., None]).sum(1)

    @mosel.modality("image")
    def encode_image(self, x: Tensor) -> Tensor:
        return self.image(x)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.stack(list(features.values())).sum(0))


def batch(n: int, length: int, seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.int64)
    mask[:, length // 2 + 1 :] = (torch.rand(n, length - length // 2 - 1, generator=g) > 0.5).long()
    return {
        "text": {"input_ids": torch.randint(1, 50, (n, length), generator=g), "attention_mask": mask},
        "image": torch.randn(n, 6, generator=g),
    }


@pytest.fixture(scope="module")
def served() -> tuple[AttentionText, mosel.Profile]:
    model = AttentionText().eval()
    data = []
    for i, length in enumerate(LENGTHS):
        x = batch(12, length, seed=i)
        data.append((x, torch.arange(12) % 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)  # a toy on a shared CPU: checks are noise
        threads = torch.get_num_threads()  # kept (it is attached again at this count)
        profile = mosel.profile(model, data, max_batch_size=4, repeats=2, cost_checks=2, threads=threads)
    return model, profile


def test_latency_is_profiled_per_bucket_the_data_holds(served: tuple[AttentionText, mosel.Profile]) -> None:
    _, profile = served
    text = profile.sized["text"]
    assert text.reference == 8 and set(text.tables) == set(LENGTHS)
    assert profile.branch_latency["text"] == text.tables[8]
    assert set(profile.sized_plans) == {(32,), (128,)}
    assert {c.buckets for c in profile.cost_checks} == {(), (32,), (128,)}
    assert "image" not in profile.sized


def test_each_job_is_priced_at_its_own_bucket(served: tuple[AttentionText, mosel.Profile]) -> None:
    model, profile = served
    lengths = [8, 20, 32, 100, 128, 300, 5]
    jobs = {length: batch(3, length, seed=100 + length) for length in lengths}
    with (
        pytest.warns(mosel.MoselWarning, match="size 300 \\(bucket 512\\), beyond the largest bucket"),
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        futures = {
            length: pool.submit(model.infer, x, deadline_ms=10_000.0, min_accuracy=0.0)
            for length, x in jobs.items()
        }
        results = {length: f.result(timeout=60) for length, f in futures.items()}
    for length, result in results.items():
        bucket = profile.bucket({"text": length})
        _, cost = profile.priced_at(bucket)
        for strategy in result.strategies:  # the bucket's own plan, or one repriced beyond them
            assert strategy.latency_us == cost.latency_us(strategy.groups)
        x = jobs[length]
        with torch.inference_mode():
            for row, config in enumerate(result.modalities):
                one = {
                    "text": {k: v[row : row + 1] for k, v in x["text"].items()},  # type: ignore[attr-defined]
                    "image": x["image"][row : row + 1],  # type: ignore[index]
                }
                features = {m: getattr(model, f"encode_{m}")(one[m]) for m in config}
                torch.testing.assert_close(result.output[row : row + 1], model.fuse(features))
    assert profile.bucket({"text": 300}) == (512,)  # beyond the last edge: priced, scaled


def test_a_failing_size_function_is_a_clear_input_error(served: tuple[AttentionText, mosel.Profile]) -> None:
    model, profile = served
    x = batch(2, 8, seed=1)
    x["text"] = {"input_ids": torch.zeros(2, dtype=torch.int64), "attention_mask": torch.ones(2)}  # 1-d
    with pytest.raises(mosel.InputError, match="the model takes"):  # the schema refuses it first
        model.infer(x)
    mosel.attach(model, dataclasses.replace(profile, input_schema=MappingProxyType({})))  # no schema
    try:
        with pytest.raises(mosel.InputError, match="size function of modality 'text'"):
            model.infer(x)
        assert model.infer(batch(2, 8, seed=2)).output.shape == (2, 3)  # nothing lost, still serving
    finally:
        mosel.attach(model, profile)


def test_a_sized_profile_saves_and_serves_after_loading(
    served: tuple[AttentionText, mosel.Profile], tmp_path: Path
) -> None:
    _, profile = served
    path = tmp_path / "sized.json"
    profile.save(path)
    loaded = mosel.Profile.load(path)
    assert loaded.sized == profile.sized and loaded.sized_plans.keys() == profile.sized_plans.keys()
    other = AttentionText().eval()
    mosel.attach(other, loaded)

    @mosel.multimodal
    class Unsized(AttentionText):  # the same model, its text no longer declared with size=
        @mosel.modality("text")
        def encode_text(self, x: Mapping[str, Tensor]) -> Tensor:
            return super().encode_text(x)

        @mosel.modality("image")  # re-marked too, to keep the declaration order
        def encode_image(self, x: Tensor) -> Tensor:
            return super().encode_image(x)

    unsized = Unsized().eval()
    with pytest.warns(mosel.MoselWarning, match="priced per input size"):
        mosel.attach(unsized, dataclasses.replace(loaded, fingerprint=dataclasses.replace(
            loaded.fingerprint, model_class=mosel.spec_of(Unsized).model_class)))  # fmt: skip
    try:
        result = other.infer(batch(2, 128, seed=3), deadline_ms=10_000.0)
        assert result.output.shape == (2, 3)
    finally:
        mosel.close(other)
