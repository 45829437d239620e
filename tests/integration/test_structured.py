"""Structured inputs (dicts of tensors) and sequence-first modalities, on every serving path."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import mosel
from mosel.testing import synthetic_profile

T = 4  # sequence length, equal to a job size below on purpose: a batch-first slice would be silently wrong


@mosel.multimodal
class TextImage(nn.Module):
    """Text arrives sequence-first with a padding mask, (T, B) ids and (T, B) mask; image batch-first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 3)
        self.image = nn.Linear(2, 3)

    @mosel.modality("text", batch_dim=1)
    def encode_text(self, text: Mapping[str, Tensor]) -> Tensor:
        emb = self.embed(text["input_ids"]) * text["attention_mask"][..., None]  # (T, B, 3)
        return emb  # features stay sequence-first: (T, B, 3)

    @mosel.modality("image")
    def encode_image(self, image: Tensor) -> Tensor:
        return self.image(image)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        parts = []
        if "text" in features:
            parts.append(features["text"].sum(0))  # (B, 3)
        if "image" in features:
            parts.append(features["image"])
        return torch.stack(parts).sum(0)


def inputs(b: int, seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (T, b), generator=g)
    mask = (torch.rand(T, b, generator=g) > 0.3).to(torch.float32)
    return {"text": {"input_ids": ids, "attention_mask": mask}, "image": torch.randn(b, 2, generator=g)}


def by_hand(model: TextImage, x: dict[str, object], modalities: tuple[frozenset[str], ...]) -> Tensor:
    rows = []
    text = x["text"]
    assert isinstance(text, dict)
    image = x["image"]
    assert isinstance(image, Tensor)
    for i, config in enumerate(modalities):
        feats: dict[str, Tensor] = {}
        if "text" in config:
            feats["text"] = model.encode_text({k: v[:, i : i + 1] for k, v in text.items()})
        if "image" in config:
            feats["image"] = model.encode_image(image[i : i + 1])
        rows.append(model.fuse(feats))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def model() -> TextImage:
    m = TextImage().eval()
    profile = synthetic_profile(
        m,
        branch_us={"text": [100.0 * b for b in range(1, 9)], "image": [30.0 * b for b in range(1, 9)]},
        accuracy={"text": 0.7, "image": 0.6, "text+image": 0.9},
    )
    mosel.attach(m, profile)
    return m


def test_sequence_first_dict_inputs_are_split_along_their_batch_dimension(model: TextImage) -> None:
    x = inputs(T)  # T == B: slicing the wrong dimension would go unnoticed by shapes
    with torch.no_grad():
        result = model.infer(x)
        torch.testing.assert_close(result.output, by_hand(model, x, result.modalities))
        mixed = model.infer(x, deadline_ms=0.45, min_accuracy=0.75, best_effort=True)
        assert len(set(mixed.modalities)) > 1
        torch.testing.assert_close(mixed.output, by_hand(model, x, mixed.modalities))
        big = inputs(19, seed=3)  # three chunks
        chunked = model.infer(big)
        torch.testing.assert_close(chunked.output, by_hand(model, big, chunked.modalities))


def test_merged_jobs_keep_their_rows(model: TextImage) -> None:
    jobs = [inputs(2 + i % 3, seed=10 + i) for i in range(8)]
    with torch.no_grad():
        futures = [model.submit(x) for x in jobs]
        for x, future in zip(jobs, futures):
            result = future.result(30)
            torch.testing.assert_close(result.output, by_hand(model, x, result.modalities))


def test_rows_that_disagree_along_the_batch_dimension_are_refused(model: TextImage) -> None:
    x = inputs(3)
    bad = {"text": {"input_ids": torch.zeros(T, 3, dtype=torch.long), "attention_mask": torch.ones(T, 2)}}
    with pytest.raises(mosel.InputError, match="disagree on the batch dimension 1"):
        model.infer(bad)
    with pytest.raises(mosel.InputError, match="disagree on the number of requests"):
        model.infer({"text": x["text"], "image": torch.randn(5, 2)})


def test_a_sequence_first_model_profiles_from_structured_validation_data() -> None:
    m = TextImage().eval()
    batches = [(inputs(6, seed=s), torch.randint(0, 3, (6,))) for s in range(3)]
    profile = mosel.profile(m, batches, max_batch_size=4, warmup=0, repeats=2, cost_checks=0, progress=False)
    assert profile.sample_count == 18
    with torch.no_grad():
        result = m.infer(inputs(T))
        torch.testing.assert_close(result.output, by_hand(m, inputs(T), result.modalities))


def test_batch_dim_must_be_a_dimension_index() -> None:
    with pytest.raises(mosel.SpecError, match="batch_dim"):
        mosel.modality("text", batch_dim=-1)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=5), deadline=st.sampled_from([None, 0.3, 0.6, 2.0])
)
def test_every_output_row_is_its_configuration_run_by_hand(
    model: TextImage, sizes: list[int], deadline: float | None
) -> None:
    jobs = [inputs(n, seed=100 + i) for i, n in enumerate(sizes)]
    with torch.no_grad():
        futures = [model.submit(x, deadline_ms=deadline, min_accuracy=0.6, best_effort=True) for x in jobs]
        for x, future in zip(jobs, futures):
            result = future.result(30)
            torch.testing.assert_close(result.output, by_hand(model, x, result.modalities))


def masks(b: int, seed: int, mode: int) -> dict[str, Tensor]:
    """A presence mask per modality (mode 0: none given, 1: image off for some rows, 2: mixed)."""
    g = torch.Generator().manual_seed(seed)
    if mode == 0:
        return {}
    image = torch.rand(b, generator=g) > 0.5
    if mode == 1:
        return {"image": image}
    text = ~image | (torch.rand(b, generator=g) > 0.5)  # every row keeps at least one modality
    return {"image": image, "text": text}


def test_rows_without_a_modality_never_compute_it(model: TextImage) -> None:
    x = inputs(6, seed=7)
    image = x["image"]
    assert isinstance(image, Tensor)
    image[[1, 4]] = float("nan")  # placeholders for a camera that was off: must never be read
    present = {"image": torch.tensor([True, False, True, True, False, True])}
    result = model.infer(x, present=present)  # type: ignore[operator]
    assert not torch.isnan(result.output).any()
    assert [sorted(c) for c in result.modalities][1] == ["text"]
    assert all("image" in c for i, c in enumerate(result.modalities) if i not in (1, 4))
    torch.testing.assert_close(result.output, by_hand(model, x, result.modalities))


def test_presence_masks_are_validated(model: TextImage) -> None:
    x = inputs(3)
    for present, message in (
        ({"image": torch.tensor([True, False])}, "shape"),
        ({"image": torch.tensor([1, 0, 1])}, "bool tensor"),
        ({"audio": torch.tensor([True, True, True])}, "not among"),
        (
            {"image": torch.zeros(3, dtype=torch.bool), "text": torch.tensor([True, False, True])},
            "no modality",
        ),
    ):
        with pytest.raises(mosel.InputError, match=message):
            model.infer(x, present=present)  # type: ignore[operator]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    deadline=st.sampled_from([None, 0.3, 0.6, 2.0]),
    modes=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    floor=st.sampled_from([None, 0.6]),
)
def test_every_row_with_a_presence_mask_is_its_configuration_run_by_hand(
    model: TextImage, sizes: list[int], deadline: float | None, modes: list[int], floor: float | None
) -> None:
    """Random jobs (structured, sequence-first text; some beyond max_batch_size, so chunked) with
    random presence masks, served concurrently: every row equals its configuration by hand, and
    no row computes a modality it lacks."""
    jobs = [(inputs(n, seed=200 + i), masks(n, 300 + i, modes[i])) for i, n in enumerate(sizes)]
    with torch.no_grad():
        futures = [
            model.submit(x, deadline_ms=deadline, min_accuracy=floor, best_effort=True, present=p)  # type: ignore[operator]
            for x, p in jobs
        ]
        for (x, present), future in zip(jobs, futures):
            result = future.result(30)
            for m, mask in present.items():
                for i, config in enumerate(result.modalities):
                    assert bool(mask[i]) or m not in config, (m, i, config)
            torch.testing.assert_close(result.output, by_hand(model, x, result.modalities))
