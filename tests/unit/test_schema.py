"""Input schemas: recorded from batches, saved with the profile, and used to decode JSON."""

from __future__ import annotations

import pytest
import torch

import mosel
from mosel.schema import LeafSchema, ModalitySchema, SchemaRecorder, decode
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
