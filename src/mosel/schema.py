"""Input schemas: what each modality's input looked like when the model was profiled.

``mosel.profile`` records, for every modality, each leaf of its input (a bare tensor, or the
parts of a dict/tuple/list such as ``{"input_ids": ..., "attention_mask": ...}``): its dtype,
its shape without the batch dimension (``None`` where the validation batches differed), and
the modality's batch dimension. The profile stores the schema (:attr:`mosel.Profile.input_schema`)
so that a service can turn JSON back into the tensors the model expects (:func:`decode`): token
ids stay integers, floats take the recorded float dtype, and a wrong rank or size is refused
before any work, naming the modality and the leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import optree
import torch
from torch import Tensor

from mosel.errors import InputError
from mosel.plan import json_dict, json_field, json_int, json_list, json_str
from mosel.spec import ModelSpec
from mosel.trees import NAMESPACE, Tree

__all__ = ["LeafSchema", "ModalitySchema", "SchemaRecorder", "decode", "leaf_name"]

Path: TypeAlias = tuple[str | int, ...]
"""Keys from a modality's input to one leaf: ``()`` for a bare tensor, ``("input_ids",)``, ``(0,)``."""


def leaf_name(modality: str, path: Path) -> str:
    """``text["input_ids"]``: a modality and a path, as messages (and JSON bodies) write them."""
    return modality + "".join(f"[{key!r}]" for key in path)


@dataclass(frozen=True, slots=True)
class LeafSchema:
    """One tensor of a modality's input.

    Attributes:
        path: keys from the modality's input to this tensor (``()`` for a bare tensor).
        dtype: the torch dtype's name, e.g. ``"int64"``, ``"float32"``, ``"bool"``.
        shape: the sizes without the batch dimension, in order; ``None`` for a size that
            differed between validation batches (a sequence length, say).
    """

    path: Path
    dtype: str
    shape: tuple[int | None, ...]

    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return _dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"path": list(self.path), "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any, what: str) -> LeafSchema:
        """Inverse of :meth:`to_json`; ValueError naming ``what`` on malformed data."""
        data = json_dict(data, what)
        path: list[str | int] = []
        for key in json_list(json_field(data, "path", what), f"{what}.path"):
            path.append(key if isinstance(key, str) else json_int(key, f"{what}.path[]", low=0))
        dtype = json_str(json_field(data, "dtype", what), f"{what}.dtype")
        _dtype(dtype, ValueError, f"{what}.dtype: ")
        shape = tuple(
            None if size is None else json_int(size, f"{what}.shape[]", low=0)
            for size in json_list(json_field(data, "shape", what), f"{what}.shape")
        )
        return cls(tuple(path), dtype, shape)


@dataclass(frozen=True, slots=True)
class ModalitySchema:
    """The input of one modality, as profiled.

    Attributes:
        batch_dim: the dimension of every leaf that holds the requests (see
            ``@mosel.modality(..., batch_dim=)``).
        leaves: one entry per tensor of the input, in flattening order.
    """

    batch_dim: int
    leaves: tuple[LeafSchema, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"batch_dim": self.batch_dim, "leaves": [leaf.to_json() for leaf in self.leaves]}

    @classmethod
    def from_json(cls, data: Any, what: str = "input schema") -> ModalitySchema:
        """Inverse of :meth:`to_json`; ValueError naming ``what`` on malformed data."""
        data = json_dict(data, what)
        leaves = json_list(json_field(data, "leaves", what), f"{what}.leaves")
        if not leaves:
            raise ValueError(f"{what}.leaves is empty")
        return cls(
            json_int(json_field(data, "batch_dim", what), f"{what}.batch_dim", low=0),
            tuple(LeafSchema.from_json(leaf, f"{what}.leaves[{i}]") for i, leaf in enumerate(leaves)),
        )

    def expected_shape(self, leaf: LeafSchema) -> str:
        """The leaf's shape with the batch dimension written ``B`` and unknown sizes ``*``."""
        sizes: list[str] = ["*" if s is None else str(s) for s in leaf.shape]
        sizes.insert(min(self.batch_dim, len(sizes)), "B")
        return f"({', '.join(sizes)})"


def _dtype(name: str, error: type[Exception] = InputError, where: str = "") -> torch.dtype:
    value = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(value, torch.dtype):
        raise error(f"{where}{name!r} is not a torch dtype")
    return value


def _flatten(tree: Tree) -> list[tuple[Path, Any]]:
    if isinstance(tree, Tensor):
        return [((), tree)]
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=False, namespace=NAMESPACE)
    return list(zip(paths, leaves))


def _observe(tree: Tree, batch_dim: int) -> ModalitySchema | None:
    """The schema of one batch, or None when it has a leaf that is not a batched tensor."""
    leaves = []
    for path, leaf in _flatten(tree):
        if (
            not isinstance(leaf, Tensor)
            or leaf.dim() <= batch_dim
            or not all(isinstance(k, (str, int)) for k in path)
        ):
            return None
        shape = tuple(int(s) for i, s in enumerate(leaf.shape) if i != batch_dim)
        leaves.append(LeafSchema(tuple(path), str(leaf.dtype).removeprefix("torch."), shape))
    return ModalitySchema(batch_dim, tuple(leaves)) if leaves else None


def _merge(old: ModalitySchema, new: ModalitySchema) -> ModalitySchema | None:
    """One schema for both batches (sizes that differ become None), or None if they do not agree."""
    if [(leaf.path, leaf.dtype, len(leaf.shape)) for leaf in old.leaves] != [
        (leaf.path, leaf.dtype, len(leaf.shape)) for leaf in new.leaves
    ]:
        return None
    return ModalitySchema(
        old.batch_dim,
        tuple(
            LeafSchema(a.path, a.dtype, tuple(x if x == y else None for x, y in zip(a.shape, b.shape)))
            for a, b in zip(old.leaves, new.leaves)
        ),
    )


class SchemaRecorder:
    """Builds the input schema of a model from the batches it is shown (``mosel.profile`` does).

    A modality whose batches disagree on their structure, dtypes or ranks gets no schema (a
    service then takes dtypes from the JSON values, as for an older profile).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._schemas: dict[str, ModalitySchema | None] = {}

    def observe(self, inputs: Mapping[str, Tree]) -> None:
        """Take one batch of inputs (modality -> tree) into account."""
        for m in self.spec.modalities:
            value = inputs.get(m)
            if value is None:
                continue
            seen = _observe(value, self.spec.batch_dim(m))
            if m not in self._schemas:
                self._schemas[m] = seen
            else:
                old = self._schemas[m]
                self._schemas[m] = None if old is None or seen is None else _merge(old, seen)

    def schema(self) -> dict[str, ModalitySchema]:
        """Modality -> schema, for the modalities whose batches agreed."""
        return {m: s for m, s in self._schemas.items() if s is not None}


def _tensor(value: Any, where: str, leaf: LeafSchema | None, batch_dim: int) -> Tensor:
    """A JSON (nested) list as a tensor: the leaf's dtype and shape when known, else the values'."""
    if not isinstance(value, list):
        raise InputError(
            f"{where} must be a (nested) list, one tensor with the requests along its batch dimension "
            f"{batch_dim}, got {type(value).__name__}"
        )
    try:
        tensor = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InputError(f"{where} must be a rectangular list of numbers or booleans ({exc})") from None
    if leaf is None:  # no schema: the values decide (integers stay int64, e.g. token ids)
        return tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    dtype = leaf.torch_dtype()
    if tensor.dim() != len(leaf.shape) + 1:
        raise InputError(
            f"{where} has shape {tuple(tensor.shape)}, the model takes {len(leaf.shape) + 1} dimensions "
            f"(profiled as {_shape(leaf, batch_dim)}, B = requests)"
        )
    sizes = [s for i, s in enumerate(tensor.shape) if i != batch_dim]
    if any(want is not None and want != got for want, got in zip(leaf.shape, sizes)):
        raise InputError(
            f"{where} has shape {tuple(tensor.shape)}, the model takes {_shape(leaf, batch_dim)} "
            f"(B = requests)"
        )
    if tensor.is_floating_point() and not dtype.is_floating_point:
        raise InputError(f"{where} holds fractional numbers; the model takes {leaf.dtype} (e.g. token ids)")
    if dtype == torch.bool and tensor.dtype != torch.bool and bool(((tensor != 0) & (tensor != 1)).any()):
        raise InputError(f"{where} must hold booleans (or 0/1), the model takes a bool mask")
    return tensor.to(dtype)


def _shape(leaf: LeafSchema, batch_dim: int) -> str:
    return ModalitySchema(batch_dim, (leaf,)).expected_shape(leaf)


def decode(modality: str, value: Any, schema: ModalitySchema | None = None, *, finite: bool = True) -> Tree:
    """A modality's input from its JSON form, checked against its profiled ``schema``.

    A JSON (nested) list is one tensor, an object a dict of parts; with a schema whose
    parts are a tuple or list, a JSON list of the parts. With a schema each tensor takes the
    recorded dtype (integers stay integers; fractional values for an integer leaf are refused)
    and must have the recorded rank and sizes. Without one (a profile saved before schemas were
    recorded) the values decide: booleans bool, integers int64, any float float32.
    With ``finite`` (the default), a floating leaf holding NaN or an infinity (also a value
    beyond its dtype's range, e.g. ``1e39`` for float32) is refused.

    Raises:
        InputError: the value does not fit; the message names the modality and the leaf.
    """
    if schema is None:
        tree = _loose(value, modality)
    else:
        by_path = {leaf.path: leaf for leaf in schema.leaves}
        tree = _strict(value, (), modality, by_path, schema.batch_dim)
    if finite:
        for path, leaf in _flatten(tree):
            if isinstance(leaf, Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
                raise InputError(
                    f"{leaf_name(modality, path)} holds a non-finite value (NaN, an infinity, or a number "
                    f"beyond {str(leaf.dtype).removeprefix('torch.')}'s range); send finite numbers"
                )
    return tree


def _loose(value: Any, where: str) -> Tree:
    if isinstance(value, dict):
        return {k: _loose(v, f"{where}[{k!r}]") for k, v in value.items()}
    return _tensor(value, where, None, 0)


def _strict(value: Any, path: Path, modality: str, leaves: Mapping[Path, LeafSchema], batch_dim: int) -> Tree:
    where = leaf_name(modality, path)
    leaf = leaves.get(path)
    if leaf is not None:
        return _tensor(value, where, leaf, batch_dim)
    depth = len(path)
    keys = list(dict.fromkeys(p[depth] for p in leaves if len(p) > depth and p[:depth] == path))
    if all(isinstance(k, str) for k in keys):
        if not isinstance(value, dict):
            raise InputError(f"{where} must be an object with the parts {keys}, got {type(value).__name__}")
        unknown = [k for k in value if k not in keys]
        missing = [k for k in keys if k not in value]
        if unknown or missing:
            raise InputError(
                f"{where} must have exactly the parts {keys}"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
            )
        return {k: _strict(value[k], (*path, k), modality, leaves, batch_dim) for k in keys}
    if not isinstance(value, list) or len(value) != len(keys):
        raise InputError(f"{where} must be a list of {len(keys)} parts, got {_describe(value)}")
    return tuple(_strict(v, (*path, i), modality, leaves, batch_dim) for i, v in enumerate(value))


def _describe(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
