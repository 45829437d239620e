"""Batched pytrees made of any mapping (issue 23): a tokenizer's output in, a model output out."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mosel
from mosel import trees
from mosel.testing import synthetic_profile


class Encoding(collections.UserDict):  # type: ignore[type-arg]
    """Like a Hugging Face BatchEncoding: a Mapping that is not a dict."""


class Output(collections.OrderedDict):  # type: ignore[type-arg]
    """Like a Hugging Face ModelOutput: a dict subclass with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Frozen(Mapping[str, Tensor]):
    """A mapping whose constructor takes keywords only."""

    def __init__(self, **items: Tensor) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Tensor:
        return self._items[key]

    def __iter__(self) -> Any:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@pytest.mark.parametrize("kind", [Encoding, Output, Frozen])
def test_any_mapping_is_a_node_sliced_joined_and_rebuilt_as_its_own_type(kind: type) -> None:
    tree = kind(ids=torch.arange(6).reshape(3, 2), mask=torch.ones(3, 2))
    assert trees.check(tree) == 3
    part = trees.take(tree, slice(1, 3))
    assert type(part) is type(tree) and part["ids"].tolist() == [[2, 3], [4, 5]]
    joined = trees.concat([part, trees.take(tree, slice(0, 1))])
    assert type(joined) is type(tree) and joined["ids"].shape == (3, 2)
    assert len(trees.leaves(tree)) == 2


@mosel.multimodal
class MappingModel(nn.Module):
    """Text arrives as a BatchEncoding-like mapping; its branch returns a ModelOutput-like one."""

    @mosel.modality("text")
    def encode_text(self, text: Mapping[str, Tensor]) -> Output:
        assert isinstance(text, Encoding), type(text)
        return Output(pooled=(text["ids"] * text["mask"]).sum(1, keepdim=True).float())

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        return video

    @mosel.fusion
    def fuse(self, features: Mapping[str, Any]) -> Tensor:
        parts = []
        if "text" in features:
            assert isinstance(features["text"], Output)
            parts.append(features["text"].pooled)
        if "video" in features:
            parts.append(features["video"][:, :1])
        return torch.cat(parts, 1).sum(1, keepdim=True)


def test_a_tokenizer_output_is_served_and_the_fusion_gets_its_branches_own_output_type() -> None:
    model = MappingModel().eval()
    mosel.attach(
        model,
        synthetic_profile(
            model,
            branch_us={"text": [100.0 * b for b in range(1, 9)], "video": [50.0 * b for b in range(1, 9)]},
            accuracy={"text": 0.8, "video": 0.6, "text+video": 0.9},
        ),
    )
    text = Encoding(ids=torch.arange(8).reshape(4, 2), mask=torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]]))
    with mosel.serving(model):
        result = model.infer({"text": text, "video": torch.ones(4, 3)})
    assert result.output.squeeze(1).tolist() == [2.0, 3.0, 6.0, 1.0]
