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


def test_a_mapping_flattens_like_a_dict_of_the_same_items_and_keeps_its_own_order() -> None:
    # A tokenizer's BatchEncoding holds input_ids, token_type_ids, attention_mask in that order;
    # optree flattens a dict in sorted key order. The same leaves in the same order either way.
    items = {
        "input_ids": torch.ones(2, 3),
        "token_type_ids": torch.zeros(2, 3),
        "attention_mask": torch.ones(2, 3),
    }
    encoding = Encoding(items)
    paths = [p for p, _ in schema_paths(encoding)]
    assert (
        paths
        == [p for p, _ in schema_paths(dict(items))]
        == [("attention_mask",), ("input_ids",), ("token_type_ids",)]
    )
    part = trees.take(encoding, slice(0, 1))
    assert type(part) is Encoding and list(part) == ["input_ids", "token_type_ids", "attention_mask"]


def schema_paths(tree: Any) -> list[tuple[tuple[Any, ...], Tensor]]:
    from mosel.schema import _flatten

    return _flatten(trees.adopt(tree))


def test_a_profile_recorded_from_a_mapping_takes_a_dict_of_the_same_fields() -> None:
    from mosel.schema_recorder import SchemaRecorder

    recorder = SchemaRecorder(mosel.spec_of(MappingModel))
    recorder.observe({"text": trees.adopt(Encoding(mask=torch.ones(2, 3), ids=torch.ones(2, 3).long()))})
    schema = recorder.schema()["text"]
    schema.check("text", {"ids": torch.ones(1, 3).long(), "mask": torch.ones(1, 3)})  # what JSON decodes to
    schema.conform("text", {"mask": torch.ones(1, 3), "ids": torch.ones(1, 3).long()})


def test_a_tree_already_on_the_device_is_not_rebuilt_and_new_mapping_types_are_still_seen() -> None:
    built: list[int] = []

    class Costly(collections.UserDict):  # type: ignore[type-arg]
        """A mapping whose constructor costs (a BatchEncoding's runs its conversions)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(1)
            super().__init__(*args, **kwargs)

    encoding = Costly(ids=torch.ones(2, 3))
    assert trees.check(encoding) == 2
    built.clear()
    assert trees.to_device(encoding, torch.device("cpu")) is encoding and built == []
    assert trees.leaves(encoding)[0] is encoding["ids"]

    class Later(collections.UserDict):  # type: ignore[type-arg]
        pass

    nested = {"outer": Later(mask=torch.zeros(2, 3))}  # a type never seen: adopted when first met
    assert trees.check(nested) == 2 and len(trees.leaves(nested)) == 1
