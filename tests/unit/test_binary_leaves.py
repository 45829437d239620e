"""Binary tensor leaves in JSON bodies (issue 23, point 12): ``{"$b64": ...}`` and ``{"$npy": ...}``.

Decoded with the same casts and checks as JSON lists; malformed leaves are refused naming the leaf.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import torch

from mosel.errors import InputError
from mosel.schema import LeafSchema, ModalitySchema, ValueRange, decode

AUDIO = ModalitySchema(0, (LeafSchema((), "float32", (None,)),))
TEXT = ModalitySchema(
    0,
    (
        LeafSchema(("attention_mask",), "bool", (None,)),
        LeafSchema(("input_ids",), "int64", (None,), values=ValueRange(0, 99, "embedding")),
    ),
    (((0, 0), (1, 0)),),
)


def b64(values: Any, dtype: str, *, shape: bool = True, order: str = "<") -> dict[str, Any]:
    array = np.asarray(values, dtype=np.dtype(dtype).newbyteorder(order))
    leaf: dict[str, Any] = {"$b64": base64.b64encode(array.tobytes()).decode(), "dtype": dtype}
    if shape:
        leaf["shape"] = list(array.shape)
    return leaf


def npy(values: Any, dtype: str) -> dict[str, Any]:
    out = io.BytesIO()
    np.save(out, np.asarray(values, dtype=dtype))
    return {"$npy": base64.b64encode(out.getvalue()).decode()}


WAVES = [[0.25, -1.5, 3.0e-3], [1.0, 2.0, -7.0]]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int16", "int64"])
@pytest.mark.parametrize("form", ["b64", "npy"])
def test_a_binary_leaf_decodes_as_the_same_values_sent_as_json_lists(form: str, dtype: str) -> None:
    values = np.asarray(WAVES, dtype=dtype).tolist()  # what that dtype holds
    leaf = b64(values, dtype) if form == "b64" else npy(values, dtype)
    got, want = decode("audio", leaf, AUDIO), decode("audio", values, AUDIO)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


def test_binary_token_ids_and_masks_take_the_json_rules() -> None:
    ids, mask = [[5, 7, 0]], [[True, True, False]]
    want = decode("text", {"input_ids": ids, "attention_mask": mask}, TEXT)
    got = decode("text", {"input_ids": b64(ids, "int32"), "attention_mask": npy(mask, "bool")}, TEXT)
    assert got["input_ids"].dtype == torch.int64 and got["attention_mask"].dtype == torch.bool
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(
        InputError, match=r"text\['input_ids'\] holds 100 at \(0, 0\); the model takes integers"
    ):
        decode("text", {"input_ids": b64([[100, 1, 0]], "int64"), "attention_mask": mask}, TEXT)
    with pytest.raises(InputError, match=r"text\['input_ids'\] holds numbers written as floats"):
        decode("text", {"input_ids": b64([[1.0, 2.0, 0.0]], "float32"), "attention_mask": mask}, TEXT)
    with pytest.raises(InputError, match=r"text\['attention_mask'\] has 2 at dimension 1"):
        decode("text", {"input_ids": b64(ids, "int64"), "attention_mask": b64([[True, True]], "bool")}, TEXT)


@pytest.mark.parametrize(
    ("leaf", "message"),
    [
        (
            {"$b64": "AAAA", "dtype": "float32", "shape": [2]},
            r"audio holds 3 bytes; shape \[2\] of float32 takes 8",
        ),
        ({"$b64": "not base64!", "dtype": "float32"}, r"audio\['\$b64'\] is not valid base64"),
        ({"$b64": "AAAAAA==", "dtype": "complex64"}, r"audio\['dtype'\] is 'complex64'; send one of"),
        ({"$b64": "AAAAAA==", "shape": [1]}, "a binary leaf is"),
        ({"$b64": "AAAAAA==", "dtype": "float32", "shape": [1], "order": "C"}, "a binary leaf is"),
        (
            {"$b64": "AAAAAA==", "dtype": "float32", "shape": [-1]},
            r"audio\['shape'\] must be a list of sizes",
        ),
        ({"$b64": 12, "dtype": "float32"}, r"audio\['\$b64'\] must be a base64 string"),
        ({"$npy": base64.b64encode(b"not a npy file").decode()}, r"audio\['\$npy'\] is not a .npy file"),
        (npy(["a", "b"], "U1"), r"audio\['\$npy'\] holds str32"),
        ({"$npy": "", "dtype": "float32"}, "a .npy leaf has the one key"),
        (b64([[float("nan"), 1.0]], "float32"), r"audio holds nan at \(0, 0\)"),
        (b64([[1e39, 1.0]], "float64"), r"audio holds 1e\+39 at \(0, 0\), beyond float32's range"),
        (b64([1.0, 2.0], "float32", shape=False), r"audio has shape \(2,\), the model takes 2 dimensions"),
    ],
)
def test_a_malformed_binary_leaf_is_refused_naming_it(leaf: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode("audio", leaf, AUDIO)


def test_an_object_array_is_never_unpickled() -> None:
    out = io.BytesIO()
    np.save(out, np.asarray([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"is not a .npy file .*allow_pickle"):
        decode("audio", {"$npy": base64.b64encode(out.getvalue()).decode()}, AUDIO)


def test_big_endian_bytes_in_an_npy_file_and_no_schema() -> None:
    got = decode("audio", npy(WAVES, ">f8"), AUDIO)
    assert torch.equal(got, torch.tensor(WAVES, dtype=torch.float32))
    loose = decode("audio", b64([[1, 2]], "int16"))  # no schema: integers are int64, as from JSON
    assert loose.dtype == torch.int64 and decode("audio", b64(WAVES, "float64")).dtype == torch.float32


def test_a_ragged_batch_is_told_to_pad() -> None:
    with pytest.raises(InputError, match=r"rectangular.*pad the requests to one length"):
        decode("audio", [[1.0, 2.0], [3.0]], AUDIO)
