"""A real masked text encoder served with ``pad=``: buckets from shuffled rows, merged jobs, exact rows.

An ``nn.TransformerEncoder`` over token ids with an attention mask, and a linear image branch.
The validation data is what a user has: rows of mixed lengths, shuffled, each batch padded to its
own longest row (every batch lands in the top bucket).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import warnings
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import pytest
import torch
from torch import Tensor, nn

import mosel
from mosel.testing import synthetic_profile

pytestmark = pytest.mark.integration

BUCKETS = (8, 16, 32, 64, 128)
WAIT = 60.0  # a hang guard only: nothing here is timed


@mosel.multimodal
class MaskedText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.image = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)
        self.gate: threading.Event | None = None  # when set, the image branch waits for it

    @mosel.modality(
        "text",
        size=lambda x: x["input_ids"].shape[1],
        buckets=BUCKETS,
        pad=mosel.Padding(dim=1, mask="attention_mask"),
    )
    def encode_text(self, x: Mapping[str, Tensor]) -> Tensor:
        mask = x["attention_mask"]
        h = self.encoder(self.embed(x["input_ids"]), src_key_padding_mask=mask == 0)
        weights = mask[..., None].to(h.dtype)
        return (h * weights).sum(1) / weights.sum(1)

    @mosel.modality("image")
    def encode_image(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        return self.image(x)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.stack(list(features.values())).sum(0))


def rows(lengths: list[int], seed: int) -> dict[str, object]:
    """Rows of token ids of the given lengths, padded to the longest, and their images."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 50, (n,), generator=g)
        mask[i, :n] = 1
    return {
        "text": {"input_ids": ids, "attention_mask": mask},
        "image": torch.randn(len(lengths), 6, generator=g),
    }


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[MaskedText, mosel.Profile, list[warnings.WarningMessage]]]:
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(48)]
    data = [(rows(lengths[i : i + 8], seed=i), torch.arange(8) % 3) for i in range(0, 48, 8)]
    model = MaskedText().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profile = mosel.profile(
            model, data, max_batch_size=4, warmup=0, repeats=1, cost_checks=1, progress=False,
            threads=torch.get_num_threads(),
        )  # fmt: skip
    yield model, profile, [w for w in caught if issubclass(w.category, mosel.MoselWarning)]
    mosel.close(model)


def test_buckets_are_measured_from_shuffled_batches(
    served: tuple[MaskedText, mosel.Profile, list[warnings.WarningMessage]],
) -> None:
    _, profile, caught = served
    text = profile.sized["text"]
    assert set(text.tables) == {8, 16, 32, 64} and text.padded  # rows of 3-60 tokens: 8 to 64
    assert dict(text.widths) == {8: (8,), 16: (16,), 32: (32,), 64: (64,)}
    assert set(profile.sized_plans) == {(8,), (16,), (32,), (64,)} - {profile.reference_bucket}
    unreached = [str(w.message) for w in caught if "held no validation row" in str(w.message)]
    assert len(unreached) == 1 and "modality 'text': declared buckets [128]" in unreached[0]
    assert not [w for w in caught if "changes the output" in str(w.message)]  # the mask is honoured


def test_jobs_of_one_bucket_merge_and_each_row_is_what_the_model_gives_it_alone(
    served: tuple[MaskedText, mosel.Profile, list[warnings.WarningMessage]],
) -> None:
    """Jobs of 17 to 31 tokens queue behind a held batch: padded to 32 they share one shape and
    merge (before, every width was a batch of its own). Each row's output is the configuration
    run by hand on that row alone, unpadded.

    Served with the measured profile's accuracies but tables where batching clearly pays (the
    measured ones, one noisy repeat each, decide the merges by chance).
    """
    model, measured, _ = served
    tables = {edge: [100.0 * edge + 10.0 * b for b in range(1, 5)] for edge in measured.sized["text"].tables}
    steady = synthetic_profile(
        model,
        branch_us={"image": [50.0 + 5.0 * b for b in range(1, 5)]},
        sized_us={
            "text": dict(sorted(tables.items(), key=lambda item: item[0] != measured.sized["text"].reference))
        },
        accuracy={measured.key(c): a for c, a in measured.accuracy.items()},
    )
    text = dataclasses.replace(steady.sized["text"], padded=True)
    mosel.attach(model, dataclasses.replace(steady, sized=MappingProxyType({"text": text})))
    before = mosel.stats(model).counters.get("batches_merged", 0)
    model.gate = threading.Event()
    try:
        held = model.submit(rows([5], seed=100))
        jobs = {n: rows([n, max(3, n - 6)], seed=200 + n) for n in (17, 20, 25, 31)}
        futures = {n: model.submit(x) for n, x in jobs.items()}
    finally:
        model.gate.set()
    results = {n: f.result(WAIT) for n, f in futures.items()}
    held.result(WAIT)
    model.gate = None
    assert mosel.stats(model).counters["batches_merged"] > before
    with torch.inference_mode():
        for n, result in results.items():
            x = jobs[n]
            text = x["text"]
            assert isinstance(text, dict)
            for row, config in enumerate(result.modalities):
                real = int(text["attention_mask"][row].sum())
                alone = {
                    "text": {k: v[row : row + 1, :real] for k, v in text.items()},
                    "image": x["image"][row : row + 1],  # type: ignore[index]
                }
                features = {m: getattr(model, f"encode_{m}")(alone[m]) for m in config}
                torch.testing.assert_close(result.output[row : row + 1], model.fuse(features))
