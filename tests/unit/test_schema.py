"""Input schemas: recorded from batches, saved with the profile, and used to decode JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mosel
from mosel import trees
from mosel.schema import LeafSchema, ModalitySchema, ValueRange, decode
from mosel.schema_recorder import SchemaRecorder
from mosel.spec import spec_of

from .helpers import Tiny, tiny_inputs, tiny_profile


def test_the_recorder_opens_sizes_that_vary_and_drops_modalities_that_disagree() -> None:
    recorder = SchemaRecorder(spec_of(Tiny))
    recorder.observe(tiny_inputs(2))
    recorder.observe({**tiny_inputs(3), "video": torch.zeros(3, 5, 3), "text": torch.zeros(3, 1).long()})
    recorder.observe({"audio": torch.zeros(4, 1), "text": None})
    schema = recorder.schema()
    assert schema["audio"] == ModalitySchema(0, (LeafSchema((), "float32", (1,)),))
    assert schema["video"] == ModalitySchema(0, (LeafSchema((), "float32", (None, 3)),))
    assert "text" not in schema  # float32 once, int64 then: no schema, values decide


def test_structured_leaves_and_a_sequence_first_batch_dim() -> None:
    recorder = SchemaRecorder(spec_of(Tiny))
    recorder.observe({"audio": (torch.zeros(2, 3), {"mask": torch.ones(2, 3, dtype=torch.bool)})})
    schema = recorder.schema()["audio"]
    assert [leaf.path for leaf in schema.leaves] == [(0,), (1, "mask")]
    tree = decode("audio", [[[1, 2, 3]], {"mask": [[1, 0, 1]]}], schema)
    assert isinstance(tree, tuple) and tree[0].dtype == torch.float32 and tree[1]["mask"].dtype == torch.bool
    with pytest.raises(mosel.InputError, match=r"audio must be a list of 2 parts"):
        decode("audio", [[1, 2, 3]], schema)
    seq_first = ModalitySchema(1, (LeafSchema((), "int64", (4,)),))
    assert decode("text", [[1, 2]] * 4, seq_first).shape == (4, 2)
    with pytest.raises(mosel.InputError, match=r"text has shape \(3, 2\), the model takes \(4, B\)"):
        decode("text", [[1, 2]] * 3, seq_first)


def test_dtypes_follow_the_schema_or_else_the_values() -> None:
    half = ModalitySchema(0, (LeafSchema((), "float16", (2,)),))
    assert decode("audio", [[1, 2]], half).dtype == torch.float16
    assert decode("audio", [[1, 2]]).dtype == torch.int64  # no schema: integers stay integers
    assert decode("audio", [[1, 2.5]]).dtype == torch.float32
    assert decode("audio", {"ids": [[1]], "mask": [[True]]})["mask"].dtype == torch.bool


def test_the_schema_round_trips_and_malformed_ones_are_profile_errors() -> None:
    model = Tiny()
    profile = tiny_profile(model)
    schema = {"audio": ModalitySchema(0, (LeafSchema((), "float32", (1,)),))}
    data = profile.to_json() | {"input_schema": {m: s.to_json() for m, s in schema.items()}}
    assert mosel.Profile.from_json(data).input_schema == schema
    for bad in (
        {"smell": schema["audio"].to_json()},
        {"audio": {"batch_dim": 0, "leaves": [{"path": [], "dtype": "float99", "shape": [1]}]}},
        {"audio": {"batch_dim": 0, "leaves": []}},
        {"audio": {"batch_dim": 0, "leaves": [{"path": [], "dtype": "float32", "shape": [-1]}]}},
    ):
        with pytest.raises(mosel.ProfileError, match="input_schema"):
            mosel.Profile.from_json(profile.to_json() | {"input_schema": bad})


# ----------------------------------------------------------------------------------------------
# sizes that agree, value ranges, finite numbers (schema format 2)


def text_batch(b: int, t: int, s: int, seed: int = 0) -> dict[str, Tensor]:
    """ids and mask share a length t; a (t, t) bias shares it twice; ``other`` has its own length s."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 20, (b, t), generator=g),
        "attention_mask": (torch.rand(b, t, generator=g) > 0.3).long(),
        "bias": torch.zeros(b, t, t),
        "other": torch.zeros(b, s),
    }


def recorded(batches: list[dict[str, Tensor]]) -> ModalitySchema:
    recorder = SchemaRecorder(spec_of(Tiny))
    for x in batches:
        recorder.observe({"text": x})
    return recorder.schema()["text"]


def test_the_recorder_finds_the_sizes_that_agree_in_every_batch_and_only_those() -> None:
    # t = 3, 5, 4; s = 4, 5, 2: s equals t in one batch only, so it is not tied to t
    schema = recorded([text_batch(2, 3, 4), text_batch(3, 5, 5), text_batch(2, 4, 2)])
    index = {leaf.path[0]: i for i, leaf in enumerate(schema.leaves)}
    (group,) = schema.agree
    assert set(group) == {
        (index["input_ids"], 0),
        (index["attention_mask"], 0),
        (index["bias"], 0),
        (index["bias"], 1),
    }
    # the same lengths in every batch: fixed sizes, nothing to tie (the shape already says it)
    fixed = recorded([text_batch(2, 3, 3), text_batch(4, 3, 3)])
    assert fixed.agree == () and fixed.leaves[index["input_ids"]].shape == (3,)
    # t and s that were equal in every batch (and varied) are tied: the data never showed them apart
    tied = recorded([text_batch(2, 3, 3), text_batch(2, 6, 6)])
    assert {(index["other"], 0), (index["input_ids"], 0)} <= set(tied.agree[0])


@mosel.multimodal
class SizedText(nn.Module):
    """A text branch whose length is declared (``size=``): with ``pad=`` and without."""

    @mosel.modality(
        "text",
        size=lambda x: x["input_ids"].shape[1],
        buckets=(8, 32),
        pad=mosel.Padding(dim=1, mask="attention_mask"),
    )
    def encode_text(self, text: Mapping[str, Tensor]) -> Tensor:
        return text["input_ids"].float().mean(1, keepdim=True)

    @mosel.modality("tokens", size=lambda x: x["ids"].shape[1])
    def encode_tokens(self, tokens: Mapping[str, Tensor]) -> Tensor:
        return tokens["ids"].float().mean(1, keepdim=True)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(features.values())).sum(0)


def test_a_declared_size_stays_open_however_the_validation_batches_are_padded() -> None:
    # Shuffled batches padded to their longest row are often all as long (here 25): the length
    # of a modality declared with size= still varies, and a job of another length is taken.
    recorder = SchemaRecorder(spec_of(SizedText))
    for b in (4, 6):
        text = text_batch(b, 25, 5)
        recorder.observe(
            {"text": text, "tokens": {"ids": text["input_ids"], "width": torch.zeros(b, 25, 25)}}
        )
    schema = recorder.schema()
    text = {leaf.path[0]: leaf.shape for leaf in schema["text"].leaves}
    # pad=: the padded axis (dim 1) of every leaf as long as the size; other axes stay fixed
    assert text == {"input_ids": (None,), "attention_mask": (None,), "bias": (None, 25), "other": (5,)}
    assert schema["tokens"].leaves[1].shape == (None, None)  # no pad=: any axis as long as the size
    shorter = {**text_batch(2, 24, 5), "bias": torch.zeros(2, 24, 25)}
    schema["text"].check("text", shorter)  # no InputError
    with pytest.raises(mosel.InputError, match="agree|equal"):  # the ids and the mask still agree
        schema["text"].check("text", {**shorter, "attention_mask": shorter["attention_mask"][:, :20]})
    undeclared = recorded([text_batch(4, 25, 5), text_batch(6, 25, 5)])  # no size=: fixed, as before
    assert undeclared.leaves[0].shape == (25,)


def test_sizes_that_do_not_agree_are_refused_naming_both_leaves() -> None:
    schema = recorded([text_batch(2, 3, 4), text_batch(3, 5, 5)])
    body = {k: v.tolist() for k, v in text_batch(2, 4, 7).items()}
    decode("text", body, schema)  # a length never profiled is fine while the parts agree
    body["attention_mask"] = [row[:3] for row in body["attention_mask"]]
    with pytest.raises(
        mosel.InputError,
        match=r"text\['attention_mask'\] has 3 at dimension 1 \(shape \(2, 3\)\) but text\['bias'\] has 4 at "
        r"dimension 1 .*the model takes these sizes equal",
    ):
        decode("text", body, schema)
    body = {k: v.tolist() for k, v in text_batch(2, 4, 7).items()}
    body["bias"] = torch.zeros(2, 4, 5).tolist()  # the square bias, no longer square
    with pytest.raises(mosel.InputError, match=r"text\['bias'\] has 5 at dimension 2"):
        decode("text", body, schema)
    # a sequence-first leaf: the message counts the tensor's own dimensions
    seq_first = ModalitySchema(
        1, (LeafSchema(("a",), "int64", (None,)), LeafSchema(("b",), "int64", (None,))), (((0, 0), (1, 0)),)
    )
    with pytest.raises(
        mosel.InputError, match=r"text\['a'\] has 2 at dimension 0 .* text\['b'\] has 3 at dimension 0"
    ):
        decode("text", {"a": [[1], [2]], "b": [[1], [2], [3]]}, seq_first)


class Lookups(nn.Module):
    """Every way a branch indexes an embedding, and ways that are not the leaf itself."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 2)
        self.small = nn.Embedding(30, 2)
        self.bag = nn.EmbeddingBag(40, 2)
        self.table = nn.Parameter(torch.zeros(60, 2))
        self.clamped = nn.Embedding(10, 2)

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        out = self.embed(x["ids"]).sum(1) + self.small(x["ids"]).sum(1)  # two tables: the smaller bounds it
        b = x["bag"]
        out = out + self.bag(
            b.reshape(-1), torch.arange(0, b.numel(), b.shape[1])
        )  # a flat view of all of it
        out = out + F.embedding(x["functional"], self.table).sum(1)  # no module
        out = out + self.clamped(x["clamped"].clamp(0, 9)).sum(1)  # another tensor: any value works
        out = out + self.embed(x["sliced"][:, 1:]).sum(1)  # a part of the leaf: its first column is free
        return out


def lookup_batch(b: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda high: torch.randint(0, high, (b, 3), generator=g)  # noqa: E731
    return {"ids": ids(20), "bag": ids(20), "functional": ids(20), "clamped": ids(20) + 3, "sliced": ids(20)}


def test_embedding_ranges_come_from_the_tables_the_branch_indexes_not_from_the_data() -> None:
    module = Lookups()
    recorder = SchemaRecorder(spec_of(Tiny))
    for seed in range(3):
        x = lookup_batch(4, seed)
        recorder.observe({"text": x})
        with torch.inference_mode(), recorder.watch("text", x):
            module(x)
    schema = recorder.schema()["text"]
    leaves = {leaf.path[0]: leaf for leaf in schema.leaves}
    assert leaves["ids"].values == ValueRange(0, 29, "embedding")
    assert leaves["bag"].values == ValueRange(0, 39, "embedding")
    assert leaves["functional"].values == ValueRange(0, 59, "embedding")
    assert leaves["clamped"].values is None and leaves["sliced"].values is None
    assert leaves["clamped"].observed is not None and leaves["clamped"].observed[0] >= 3
    body = {k: v.tolist() for k, v in lookup_batch(1, 9).items()}
    body["ids"] = [[0, 29, 5]]  # 29 never occurred in validation (ids < 20): a valid rare id
    body["clamped"] = [[-7, 1000, 0]]  # the code clamps it: anything goes
    decode("text", body, schema)
    for leaf, value, message in (
        (
            "ids",
            30,
            r"holds 30 at \(0, 1\); the model takes integers in \[0, 29\]: it indexes an embedding of 30",
        ),
        ("ids", -1, r"holds -1 at \(0, 1\)"),
        ("bag", 40, r"text\['bag'\] holds 40"),
        ("functional", 60, r"text\['functional'\] holds 60"),
    ):
        bad = dict(body, **{leaf: [[1, value, 2]]})
        with pytest.raises(mosel.InputError, match=message):
            decode("text", bad, schema)


def test_a_leaf_indexed_in_only_some_watched_calls_gets_no_range() -> None:
    embed = nn.Embedding(10, 2)
    recorder = SchemaRecorder(spec_of(Tiny))
    for seed, use in ((0, True), (1, False)):
        x = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(seed))
        recorder.observe({"text": x})
        with recorder.watch("text", x):
            if use:
                embed(x)
    (leaf,) = recorder.schema()["text"].leaves
    assert leaf.values is None and leaf.observed is not None


def test_a_0_1_leaf_shaped_like_another_is_a_mask_other_observed_ranges_are_not_enforced() -> None:
    g = torch.Generator().manual_seed(0)

    def batch(t: int) -> dict[str, Tensor]:
        return {
            "ids": torch.randint(3, 18, (4, t), generator=g),  # never fed to an embedding here
            "mask": torch.tensor([[1] * t, [1] * (t - 1) + [0]] * 2),
            "count": torch.tensor([[0], [1], [1], [0]]),  # 0/1 in validation, shaped (B, 1): a count
            "ones": torch.ones(4, t, dtype=torch.long),  # all 1: nothing shows it is a mask
            "bool": torch.ones(4, t, dtype=torch.bool),
        }

    schema = recorded([batch(3), batch(5)])
    leaves = {leaf.path[0]: leaf for leaf in schema.leaves}
    assert leaves["mask"].values == ValueRange(0, 1, "mask") and leaves["mask"].observed == (0, 1)
    assert leaves["count"].values is None and leaves["count"].observed == (0, 1)
    assert leaves["ones"].values is None and leaves["ones"].observed == (1, 1)
    assert leaves["ids"].values is None and leaves["ids"].observed is not None
    assert 3 <= leaves["ids"].observed[0] <= leaves["ids"].observed[1] <= 17
    assert leaves["bool"].observed is None and leaves["bool"].values is None
    body = {k: v.tolist() for k, v in batch(4).items()}
    body["ids"] = [[-5, 0, 1000, 17]] * 4  # outside what was observed, not refused: nothing says it is wrong
    body["count"] = [[2], [7], [0], [1]]
    body["ones"] = [[0, 2, 1, 1]] * 4
    decode("text", body, schema)
    with pytest.raises(
        mosel.InputError, match=r"text\['mask'\] holds 2 at \(1, 3\); the model takes 0 or 1: it is a mask"
    ):
        decode("text", dict(body, mask=[[1, 1, 1, 1], [1, 1, 1, 2]] * 2), schema)
    with pytest.raises(mosel.InputError, match=r"text\['bool'\] must hold booleans"):
        decode("text", dict(body, bool=[[1, 1, 1, 2]] * 4), schema)


@pytest.mark.parametrize(
    ("dtype", "values", "message"),
    [
        ("float32", [[1.0, float("nan")]], r"audio holds nan at \(0, 1\); the model takes finite float32"),
        ("float32", [[float("inf"), 1.0]], r"audio holds inf at \(0, 0\)"),
        ("float32", [[1.0, float("-inf")]], r"audio holds -inf at \(0, 1\)"),
        ("float32", json.loads("[[1e400, 1]]"), r"audio holds inf at \(0, 0\)"),  # JSON's 1e400 reads as inf
        ("float32", [[1.0, 1e39]], r"audio holds 1e\+39 at \(0, 1\), beyond float32's range"),
        ("float32", [[1.0, -(10**200)]], r"audio holds -1e\+200 at \(0, 1\), beyond float32's range"),
        ("float16", [[70000, 1]], r"audio holds 70000 at \(0, 0\), beyond float16's range"),
        ("float64", [[1.0, float("nan")]], r"audio holds nan at \(0, 1\); the model takes finite float64"),
    ],
)
def test_non_finite_floats_are_refused_after_the_cast_unless_finite_is_false(
    dtype: str, values: list[list[float]], message: str
) -> None:
    schema = ModalitySchema(0, (LeafSchema((), dtype, (2,)),))
    with pytest.raises(mosel.InputError, match=message):
        decode("audio", values, schema)
    if dtype == "float32":  # without a schema floats are float32: the same refusal
        with pytest.raises(mosel.InputError, match=message):
            decode("audio", values)
    let_through = decode("audio", values, schema, finite=False)
    assert let_through.dtype == getattr(torch, dtype) and not bool(torch.isfinite(let_through).all())
    with pytest.raises(mosel.InputError, match="finite"):
        schema.check("audio", let_through)
    schema.check("audio", let_through, finite=False)


def test_float64_keeps_what_float32_cannot_hold() -> None:
    wide = ModalitySchema(0, (LeafSchema((), "float64", (2,)),))
    assert decode("audio", [[1e39, 0.1]], wide).tolist() == [
        [1e39, 0.1]
    ]  # parsed as float64, not via float32


@pytest.mark.parametrize(
    ("dtype", "values", "message"),
    [
        ("int64", [[1, 10**200]], r"text holds an integer beyond int64's range; the model takes int64"),
        ("int64", [[1, 2**63]], r"beyond int64's range"),
        ("int32", [[1, 2**40]], r"text holds 1099511627776 at \(0, 1\), beyond int32"),
        ("uint8", [[1, -1]], r"text holds -1 at \(0, 1\), beyond uint8"),
        ("float32", [[1, 10**400]], r"text holds an integer beyond float64's range"),
        ("bool", [[1, 10**200]], r"beyond int64's range"),
        ("int64", [[1, float("nan")]], r"text holds nan at \(0, 1\); fractional numbers, NaN and infinities"),
        ("int64", [[1, 2.0]], r"numbers written as floats"),
    ],
)
def test_numbers_that_do_not_fit_the_leafs_dtype_are_clean_input_errors(
    dtype: str, values: list[list[Any]], message: str
) -> None:
    schema = ModalitySchema(0, (LeafSchema((), dtype, (2,)),))
    for finite in (True, False):
        with pytest.raises(mosel.InputError, match=message):
            decode("text", values, schema, finite=finite)


def test_check_takes_tensors_the_in_process_form_of_decode() -> None:
    schema = recorded([text_batch(2, 3, 4), text_batch(3, 5, 5)])
    x = text_batch(2, 4, 7)
    schema.check("text", x)
    with pytest.raises(mosel.InputError, match=r"text\['attention_mask'\] has 3 at dimension 1"):
        schema.check("text", dict(x, attention_mask=x["attention_mask"][:, :3]))
    with pytest.raises(mosel.InputError, match=r"the model takes 0 or 1"):
        schema.check("text", dict(x, attention_mask=x["attention_mask"] * 3 + 1))
    with pytest.raises(mosel.InputError, match=r"text\['bias'\] holds nan"):
        schema.check("text", dict(x, bias=torch.full((2, 4, 4), float("nan"))))
    schema.check("text", dict(x, bias=torch.full((2, 4, 4), float("nan"))), finite=False)
    with pytest.raises(mosel.InputError, match=r"text has the parts .* the model takes"):
        schema.check("text", {k: v for k, v in x.items() if k != "bias"})
    with pytest.raises(
        mosel.InputError, match=r"text\['other'\] has shape \(2,\), the model takes 2 dimensions"
    ):
        schema.check("text", dict(x, other=torch.zeros(2)))


def test_conform_on_a_callers_flattened_tree_refuses_as_the_unflattened_path_does() -> None:
    """A structure's leaf names are kept after its first call; other structures are checked in full."""
    schema = recorded([text_batch(2, 3, 4), text_batch(3, 5, 5)])
    x = text_batch(2, 4, 7)
    for _ in range(2):  # the second call reads the names kept for this structure
        assert schema.conform("text", x, flat=trees.flatten(x)) is x
    wrong = [
        ({k: v for k, v in x.items() if k != "bias"}, r"text has the parts .* the model takes"),
        (dict(x, bias=torch.zeros(2, 4)), r"text\['bias'\] has shape \(2, 4\), the model takes 3 dimensions"),
        (
            dict(x, attention_mask=x["attention_mask"][:, :3]),
            r"text\['attention_mask'\] has 3 at dimension 1",
        ),
        (dict(x, input_ids=x["input_ids"].float()), r"text\['input_ids'\] is float32, the model takes int64"),
    ]
    for _ in range(2):
        for tree, message in wrong:
            with pytest.raises(mosel.InputError, match=message):
                schema.conform("text", tree)
            with pytest.raises(mosel.InputError, match=message):
                schema.conform("text", tree, flat=trees.flatten(tree))


def test_the_new_facts_round_trip_and_older_schemas_load_without_them() -> None:
    schema = recorded([text_batch(2, 3, 4), text_batch(3, 5, 5)])
    assert schema.agree and any(leaf.values for leaf in schema.leaves)
    assert ModalitySchema.from_json(json.loads(json.dumps(schema.to_json()))) == schema
    profile = tiny_profile(Tiny())
    saved = profile.to_json() | {"input_schema": {"text": schema.to_json()}}
    assert mosel.Profile.from_json(json.loads(json.dumps(saved))).input_schema == {"text": schema}
    # format 1, as written before these facts were recorded: loads with none, decodes as before
    older = {
        "batch_dim": 0,
        "leaves": [
            {k: v for k, v in leaf.to_json().items() if k in ("path", "dtype", "shape")}
            for leaf in schema.leaves
        ],
    }
    loaded = mosel.Profile.from_json(profile.to_json() | {"input_schema": {"text": older}}).input_schema[
        "text"
    ]
    assert loaded.agree == () and all(leaf.values is None and leaf.observed is None for leaf in loaded.leaves)
    body = {k: v.tolist() for k, v in text_batch(2, 4, 7).items()}
    body["attention_mask"] = [[5, 1, 1]] * 2  # neither agreeing nor 0/1: not checked by an older schema
    assert decode("text", body, loaded)["attention_mask"].tolist() == [[5, 1, 1]] * 2
    assert LeafSchema.from_json(older["leaves"][0], "leaf") == dataclasses.replace(
        schema.leaves[0], observed=None, values=None
    )


def mutate(schema: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(schema)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


DELETE = object()


def test_tampered_facts_are_profile_errors() -> None:
    schema = recorded([text_batch(2, 3, 4), text_batch(3, 5, 5)])
    data = schema.to_json()
    index = {leaf.path[0]: i for i, leaf in enumerate(schema.leaves)}
    ids, mask, bias, other = (index[k] for k in ("input_ids", "attention_mask", "bias", "other"))
    profile = tiny_profile(Tiny())
    for path, value, message in (
        (("version",), 3, "schema format 3"),
        (("version",), "2", "version must be an integer"),
        (("agree",), DELETE, 'no "agree" field'),
        (("agree",), [[[ids, 0]]], "at least two"),
        (("agree",), [[[ids, 0], [9, 0]]], r"leaf must lie in \[0, 3\]"),
        (("agree",), [[[ids, 0], [bias, 5]]], "dimension must lie"),
        (("agree",), [[[ids, 0], [ids, 0]]], "a second time"),
        (("agree",), [[[ids, 0], [mask, 0]], [[ids, 0], [bias, 0]]], "a second time"),
        (("leaves", ids, "observed"), DELETE, 'no "observed" field'),
        (("leaves", ids, "values"), DELETE, 'no "values" field'),
        (("leaves", ids, "observed"), [5, 2], r"observed\[1\] must lie"),
        (("leaves", bias, "values"), {"low": 0, "high": 1, "from": "mask"}, "only integer leaves"),
        (("leaves", bias, "observed"), [0, 1], "only integer leaves"),
        (("leaves", mask, "values"), {"low": 0, "high": 2, "from": "mask"}, "a mask, which takes"),
        (("leaves", mask, "values"), {"low": 1, "high": 0, "from": "embedding"}, r"values.high must lie"),
        (("leaves", mask, "values"), {"low": 3, "high": 9, "from": "embedding"}, "start at 0"),
        (("leaves", mask, "values"), {"low": 0, "high": 9, "from": "guess"}, "from must be one of"),
        (("leaves", mask, "values"), {"low": 0, "high": 2**63, "from": "embedding"}, "high must lie"),
        (("leaves", mask, "values"), [0, 1], "must be a JSON object"),
    ):
        bad = mutate(data, path, value)
        with pytest.raises(mosel.ProfileError, match=message):
            mosel.Profile.from_json(profile.to_json() | {"input_schema": {"text": bad}})
    older = {k: v for k, v in data.items() if k != "version"}  # format 1 with format-2 fields
    with pytest.raises(mosel.ProfileError, match=r'leaves\[0\] has .* need "version": 2'):
        mosel.Profile.from_json(profile.to_json() | {"input_schema": {"text": older}})
    older["leaves"] = [{k: leaf[k] for k in ("path", "dtype", "shape")} for leaf in older["leaves"]]
    with pytest.raises(mosel.ProfileError, match=r'agree needs "version": 2'):
        mosel.Profile.from_json(profile.to_json() | {"input_schema": {"text": older}})
    fixed = mutate(data, ("agree",), [[[other, 0], [ids, 0]]])
    fixed = mutate(fixed, ("leaves", other, "shape"), [4])
    with pytest.raises(mosel.ProfileError, match="fixed"):
        mosel.Profile.from_json(profile.to_json() | {"input_schema": {"text": fixed}})


IDS = ModalitySchema(
    0,
    (  # in flattening order: the keys sorted
        LeafSchema(("attention_mask",), "int64", (None,), (0, 1), ValueRange(0, 1, "mask")),
        LeafSchema(("count",), "int32", (2,), (0, 7)),
        LeafSchema(("flags",), "bool", (None,)),
        LeafSchema(("input_ids",), "int64", (None,), (0, 9), ValueRange(0, 39, "embedding")),
    ),
    (((0, 0), (2, 0), (3, 0)),),
)


EMPTY: dict[str, Any] = {"input_ids": [[]], "attention_mask": [[]], "flags": [[]]}


def text(**parts: Any) -> dict[str, Any]:
    return {
        "input_ids": [[1, 2]],
        "attention_mask": [[1, 1]],
        "flags": [[True, False]],
        "count": [[3, 4]],
    } | parts


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"input_ids": [[True, False]]}, r"text\['input_ids'\] holds booleans .*takes int64 numbers"),
        ({"count": [[True, True]]}, r"text\['count'\] holds booleans"),
        ({"flags": [[0.0, 1.0]]}, r"text\[.flags.\] holds numbers written as floats \(0.0, 1.0\)"),
        ({"flags": [[1.0, 1.0]]}, r"bool mask: send true/false"),
        (EMPTY, r"text\['attention_mask'\] has shape \(1, 0\): nothing along dimension 1"),
        (EMPTY | {k: [[], []] for k in EMPTY} | {"count": [[1, 2], [3, 4]]}, r"nothing along dimension 1"),
    ],
)  # fmt: skip
def test_json_values_of_the_wrong_kind_are_refused_saying_what_the_leaf_takes(
    parts: dict[str, Any], message: str
) -> None:
    with pytest.raises(mosel.InputError, match=message) as info:
        decode("text", text(**parts), IDS)
    assert "token ids)" not in str(info.value) or "int" in str(info.value)


def test_booleans_fit_a_bool_leaf_and_an_integer_mask() -> None:
    tree = decode("text", text(attention_mask=[[True, False]], flags=[[1, 0]]), IDS)
    assert isinstance(tree, dict)
    assert tree["attention_mask"].dtype == torch.int64 and tree["attention_mask"].tolist() == [[1, 0]]
    assert tree["flags"].dtype == torch.bool
