"""Input schemas: what each modality's input looked like when the model was profiled.

``mosel.profile`` records, for every modality, each leaf of its input (a bare tensor, or the
parts of a dict/tuple/list such as ``{"input_ids": ..., "attention_mask": ...}``): its dtype,
its shape without the batch dimension (``None`` where the validation batches differed), and
the modality's batch dimension. The profile stores the schema (:attr:`mosel.Profile.input_schema`)
so that a service can turn JSON back into the tensors the model expects (:func:`decode`): token
ids stay integers, floats take the recorded float dtype, and a wrong rank or size is refused
before any work, naming the modality and the leaf.

Since schema format 2 the profile also records what the model's code needs beyond dtypes and
ranks, and :meth:`ModalitySchema.check` (which :func:`decode` runs) refuses a body that breaks it:

* **Sizes that always agree.** Groups of (leaf, dimension) whose sizes varied between the
  validation batches but were equal to each other in every batch (``input_ids`` and
  ``attention_mask`` share their sequence length; a square ``(T, T)`` bias shares both). Sizes that
  were the same in every batch are fixed by the shape already.
* **Integer value ranges, only where a wrong value cannot be valid.** A value range is enforced
  for two kinds of integer leaf, and no other:

  - *Embedding indices.* While profiling, each branch runs once more, eagerly, on the first
    validation batch, and every call of ``torch.nn.functional.embedding`` / ``embedding_bag``
    (what ``nn.Embedding`` and ``nn.EmbeddingBag`` run, subclasses and direct calls included)
    is watched (:meth:`SchemaRecorder.watch`, a torch function mode; a call of its own, since
    the mode turns off fast paths such as nested tensors, which must not change the accuracy
    measured). A leaf that was itself the indices (the same tensor, or a view of all of it)
    takes exactly ``[0, rows)`` of the smallest such table: any other value raises
    ``IndexError`` in the model (a device-side assert on a GPU). This is the model's own
    range, not the validation set's: a valid token id the validation set never held is still
    accepted. Ids the code transforms first (``ids.clamp(...)``, ``ids + offset``, a cast)
    reach the embedding as another tensor and get no range.
  - *Masks.* An integer leaf (not fed to an embedding) whose values in the whole validation set
    were 0 and 1, both seen, and which has the shape of another leaf of the modality (the same
    rank; every size equal or in the same agreeing group; not only sizes of 1) takes 0 or 1.
    That is what an integer attention mask is; its code computes with it (``(1 - mask) *
    min``) and a 2 silently turns "ignore this token" into garbage, not an error. A 0/1
    count feature of the shape ``(B,)`` or ``(B, 1)`` is not a mask and stays unchecked.

  Every other integer leaf records the observed minimum and maximum (:attr:`LeafSchema.observed`)
  and enforces nothing: the validation set shows what occurred, not what the model takes, and
  refusing a valid rare value would be worse than the error it might prevent. A ``bool`` leaf
  takes booleans or 0/1 whatever the profile says.
* **Finite numbers.** Float leaves refuse NaN and infinities by default, checked after the cast to
  the leaf's dtype: a JSON ``1e39`` is finite in float64 but infinite in float32, ``1e400``
  reads as infinity. ``finite=False`` lets them through, for models that take them on purpose.

A schema saved before format 2 has none of these facts: it decodes as before.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np
import optree
import torch
from torch import Tensor

from mosel.errors import InputError
from mosel.jsonvalues import json_dict, json_field, json_int, json_list, json_str, show
from mosel.trees import NAMESPACE, Tree

__all__ = [
    "BINARY_DTYPES", "SCHEMA_VERSION", "LeafSchema", "ModalitySchema", "ValueRange", "binary_array",
    "decode", "is_binary", "leaf_name",
]  # fmt: skip

SCHEMA_VERSION: Final = 2
"""The format :meth:`ModalitySchema.to_json` writes; 1 (no ``"version"``) had no agreeing sizes or ranges."""

Path: TypeAlias = tuple[str | int, ...]
"""Keys from a modality's input to one leaf: ``()`` for a bare tensor, ``("input_ids",)``, ``(0,)``."""

Dim: TypeAlias = tuple[int, int]
"""A leaf's index in :attr:`ModalitySchema.leaves` and a dimension of its shape without the batch dim."""

EMBEDDING: Final = "embedding"
MASK: Final = "mask"
_SOURCES: Final = (EMBEDDING, MASK)


def leaf_name(modality: str, path: Path) -> str:
    """``text["input_ids"]``: a modality and a path, as messages (and JSON bodies) write them."""
    return modality + "".join(f"[{key!r}]" for key in path)


@dataclass(frozen=True, slots=True)
class ValueRange:
    """The integers a leaf takes, ``low`` to ``high`` inclusive, and how the profile knows.

    Attributes:
        low: the smallest value taken.
        high: the largest value taken.
        source: ``"embedding"`` (the leaf indexes an embedding of ``high + 1`` rows) or
            ``"mask"`` (a 0/1 mask; see the module docstring).
    """

    low: int
    high: int
    source: str

    def describe(self) -> str:
        """What the model takes, for messages."""
        if self.source == EMBEDDING:
            return (
                f"integers in [{self.low}, {self.high}]: it indexes an embedding of {self.high + 1} rows "
                f"(map tokens outside the vocabulary to the tokenizer's unknown id)"
            )
        return f"{self.low} or {self.high}: it is a mask (every profiled value was 0 or 1)"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"low": self.low, "high": self.high, "from": self.source}

    @classmethod
    def from_json(cls, data: Any, what: str, dtype: torch.dtype) -> ValueRange:
        """Inverse of :meth:`to_json` for a leaf of ``dtype``; ValueError naming ``what``."""
        data = json_dict(data, what)
        info = torch.iinfo(dtype)
        low = json_int(json_field(data, "low", what), f"{what}.low", low=info.min, high=info.max)
        high = json_int(json_field(data, "high", what), f"{what}.high", low=low, high=info.max)
        source = json_str(json_field(data, "from", what), f"{what}.from")
        if source not in _SOURCES:
            raise ValueError(f"{what}.from must be one of {list(_SOURCES)}, got {show(source)}")
        if source == MASK and (low, high) != (0, 1):
            raise ValueError(f"{what} is a mask, which takes [0, 1], not [{low}, {high}]")
        if source == EMBEDDING and low != 0:
            raise ValueError(f"{what} indexes an embedding, whose rows start at 0, not {low}")
        return cls(low, high, source)


@dataclass(frozen=True, slots=True)
class LeafSchema:
    """One tensor of a modality's input.

    Attributes:
        path: keys from the modality's input to this tensor (``()`` for a bare tensor).
        dtype: the torch dtype's name, e.g. ``"int64"``, ``"float32"``, ``"bool"``.
        shape: the sizes without the batch dimension, in order; ``None`` for a size that
            differed between validation batches (a sequence length, say).
        observed: for an integer leaf, the smallest and largest value in the validation data
            (``None`` for other dtypes, an empty leaf, or a schema of format 1). Informative
            only: it is not enforced.
        values: the values the model takes, enforced by :meth:`ModalitySchema.check`; ``None``
            where the profile cannot know them (see the module docstring).
    """

    path: Path
    dtype: str
    shape: tuple[int | None, ...]
    observed: tuple[int, int] | None = None
    values: ValueRange | None = None

    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        dtype = _DTYPES.get(self.dtype)
        if dtype is None:
            dtype = _DTYPES[self.dtype] = _dtype(self.dtype)
        return dtype

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "path": list(self.path),
            "dtype": self.dtype,
            "shape": list(self.shape),
            "observed": None if self.observed is None else list(self.observed),
            "values": None if self.values is None else self.values.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any, what: str, version: int | None = None) -> LeafSchema:
        """Inverse of :meth:`to_json`; ValueError naming ``what`` on malformed data.

        ``version`` is the format of the schema the leaf is part of: 1 has neither ``observed``
        nor ``values``; 2 has both (``null`` where there is none). None: either, as found.
        """
        data = json_dict(data, what)
        path: list[str | int] = []
        for key in json_list(json_field(data, "path", what), f"{what}.path"):
            path.append(key if isinstance(key, str) else json_int(key, f"{what}.path[]", low=0))
        dtype = json_str(json_field(data, "dtype", what), f"{what}.dtype")
        torch_dtype = _dtype(dtype, ValueError, f"{what}.dtype: ")
        shape = tuple(
            None if size is None else json_int(size, f"{what}.shape[]", low=0)
            for size in json_list(json_field(data, "shape", what), f"{what}.shape")
        )
        if version is None:
            version = 2 if "observed" in data or "values" in data else 1
        if version < 2:
            extra = [k for k in ("observed", "values") if k in data]
            if extra:
                raise ValueError(f'{what} has {extra}, which need "version": {SCHEMA_VERSION} in its schema')
            return cls(tuple(path), dtype, shape)
        observed_raw = json_field(data, "observed", what)
        values_raw = json_field(data, "values", what)
        if (observed_raw is not None or values_raw is not None) and not _integral(torch_dtype):
            raise ValueError(f"{what} is a {dtype} leaf; only integer leaves have observed values or a range")
        observed = None
        if observed_raw is not None:
            info = torch.iinfo(torch_dtype)
            low, high = json_list(observed_raw, f"{what}.observed", length=2)
            low = json_int(low, f"{what}.observed[0]", low=info.min, high=info.max)
            observed = (low, json_int(high, f"{what}.observed[1]", low=low, high=info.max))
        values = (
            None if values_raw is None else ValueRange.from_json(values_raw, f"{what}.values", torch_dtype)
        )
        return cls(tuple(path), dtype, shape, observed, values)


@dataclass(frozen=True, slots=True)
class ModalitySchema:
    """The input of one modality, as profiled.

    Attributes:
        batch_dim: the dimension of every leaf that holds the requests (see
            ``@mosel.modality(..., batch_dim=)``).
        leaves: one entry per tensor of the input, in flattening order.
        agree: groups of (leaf index, dimension of its shape without the batch dimension) whose
            sizes varied between the validation batches but were equal within every batch:
            ``((0, 0), (1, 0))`` when the first dimension of leaves 0 and 1 is one sequence
            length. Only dimensions recorded as ``None`` appear; each at most once.
    """

    batch_dim: int
    leaves: tuple[LeafSchema, ...]
    agree: tuple[tuple[Dim, ...], ...] = ()
    # Per (modality, tree structure) seen in a call: its leaves' names (the structure matched).
    _names: dict[tuple[str, Any], tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (schema format :data:`SCHEMA_VERSION`)."""
        return {
            "version": SCHEMA_VERSION,
            "batch_dim": self.batch_dim,
            "leaves": [leaf.to_json() for leaf in self.leaves],
            "agree": [[list(dim) for dim in group] for group in self.agree],
        }

    @classmethod
    def from_json(cls, data: Any, what: str = "input schema") -> ModalitySchema:
        """Inverse of :meth:`to_json`; ValueError naming ``what`` on malformed data.

        A schema without ``"version"`` (format 1, saved before agreeing sizes and value ranges
        were recorded) loads with neither.
        """
        data = json_dict(data, what)
        version = json_int(data["version"], f"{what}.version", low=1) if "version" in data else 1
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{what} has schema format {version}, this mosel reads up to {SCHEMA_VERSION}; "
                f"re-profile the model with this version"
            )
        leaves_raw = json_list(json_field(data, "leaves", what), f"{what}.leaves")
        if not leaves_raw:
            raise ValueError(f"{what}.leaves is empty")
        leaves = tuple(
            LeafSchema.from_json(leaf, f"{what}.leaves[{i}]", version) for i, leaf in enumerate(leaves_raw)
        )
        batch_dim = json_int(json_field(data, "batch_dim", what), f"{what}.batch_dim", low=0)
        if version < 2:
            if "agree" in data:
                raise ValueError(f'{what}.agree needs "version": {SCHEMA_VERSION}')
            return cls(batch_dim, leaves)
        groups: list[tuple[Dim, ...]] = []
        seen: set[Dim] = set()
        for g, group in enumerate(json_list(json_field(data, "agree", what), f"{what}.agree")):
            where = f"{what}.agree[{g}]"
            members = json_list(group, where)
            if len(members) < 2:
                raise ValueError(f"{where} must name at least two dimensions, got {show(members)}")
            dims: list[Dim] = []
            for item in members:
                i, d = json_list(item, f"{where}[]", length=2)
                i = json_int(i, f"{where}[] leaf", low=0, high=len(leaves) - 1)
                d = json_int(d, f"{where}[] dimension", low=0, high=max(0, len(leaves[i].shape) - 1))
                if d >= len(leaves[i].shape) or leaves[i].shape[d] is not None:
                    raise ValueError(
                        f"{where} names dimension {d} of leaf {i}, whose size is fixed "
                        f"({leaves[i].shape[d]}), not None"
                    )
                if (i, d) in seen:
                    raise ValueError(f"{where} names dimension {d} of leaf {i} a second time")
                seen.add((i, d))
                dims.append((i, d))
            groups.append(tuple(dims))
        return cls(batch_dim, leaves, tuple(groups))

    def expected_shape(self, leaf: LeafSchema) -> str:
        """The leaf's shape with the batch dimension written ``B`` and unknown sizes ``*``."""
        sizes: list[str] = ["*" if s is None else str(s) for s in leaf.shape]
        sizes.insert(min(self.batch_dim, len(sizes)), "B")
        return f"({', '.join(sizes)})"

    def check(self, modality: str, tree: Tree, *, finite: bool = True) -> None:
        """Check a modality's input tensors against this schema; the tensor form of :func:`decode`.

        Checks the structure (the same parts), each leaf's rank and recorded sizes, the sizes
        that must agree, the value ranges of integer leaves and, with ``finite``, that float
        leaves hold no NaN or infinity. Dtypes are not checked (``decode`` casts to them).

        Raises:
            InputError: naming the modality and the leaf, the bad value or sizes, and what the
                model takes.
        """
        tensors: list[Tensor] = []
        for leaf, where, tensor in self._leaves_of(modality, tree):
            self._check_shape(where, leaf, tensor)
            tensors.append(tensor)
        for group in self.agree:
            self._check_agree(modality, group, tensors)
        for leaf, tensor in zip(self.leaves, tensors):
            where = leaf_name(modality, leaf.path)
            if leaf.values is not None and _integral(tensor.dtype):
                _check_range(where, tensor, leaf.values)
            if finite and tensor.is_floating_point():
                _check_finite(where, tensor, None)

    def conform(
        self,
        modality: str,
        tree: Tree,
        *,
        float_dtype: torch.dtype | None = None,
        flat: tuple[list[Any], optree.PyTreeSpec] | None = None,
    ) -> Tree:
        """A caller's in-process input checked cheaply against this schema, its dtypes made to fit.

        What every path checks before any work (:mod:`mosel.requests`): the structure, each leaf's
        rank and recorded sizes, the sizes that must agree, and the dtype. A floating leaf of
        another float dtype is cast (float64 waveforms as soundfile and numpy give them, for a
        float32 model), an integer leaf of a narrower or wider integer dtype too (int32 token
        ids); any other mismatch (integer PCM for a float leaf, floats for token ids, a bool
        mask given as floats) is refused, naming the leaf. Values are not scanned (the HTTP
        front door does, :meth:`check`): in-process inputs are the caller's own tensors.
        ``float_dtype``: the model's float dtype when it moved from the profile's (float leaves
        take it). ``flat``: the tree's :func:`mosel.trees.flatten`, when the caller has it.

        Raises:
            InputError: naming the modality and the leaf, what it holds and what the model takes.
        """
        if isinstance(tree, Tensor) and len(self.leaves) == 1 and not self.leaves[0].path:
            leaf = self.leaves[0]
            if (
                float_dtype is None
                and self.batch_dim == 0
                and tree.dtype is leaf.torch_dtype()
                and tree.shape[1:] == leaf.shape  # a fixed shape: one comparison
            ):
                return tree
            tree = self._fit(modality, leaf, tree, float_dtype)
            self._check_shape(modality, leaf, tree)
            return tree
        given_leaves = self._leaves_of(modality, tree, flat)
        fitted: list[Tensor] = []
        for leaf, where, given in given_leaves:
            tensor = (
                given if given.dtype is leaf.torch_dtype() else self._fit(where, leaf, given, float_dtype)
            )
            self._check_shape(where, leaf, tensor)
            fitted.append(tensor)
        for group in self.agree:
            self._check_agree(modality, group, fitted)
        if all(new is old for new, (_, _, old) in zip(fitted, given_leaves)):
            return tree
        if flat is None:
            flat = optree.tree_flatten(tree, none_is_leaf=False, namespace=NAMESPACE)
        return optree.tree_unflatten(flat[1], fitted)

    def _leaves_of(
        self, modality: str, tree: Tree, flat: tuple[list[Any], optree.PyTreeSpec] | None = None
    ) -> list[tuple[LeafSchema, str, Tensor]]:
        """Each leaf's schema, name and tensor in ``tree``, once its parts are the schema's."""
        if flat is not None:
            names = self._names.get((modality, flat[1]))
            if names is not None:  # a structure seen before: its parts are the schema's
                found = []
                for leaf, where, tensor in zip(self.leaves, names, flat[0]):
                    if not isinstance(tensor, Tensor):
                        raise InputError(f"{where} must be a tensor, got {type(tensor).__name__}")
                    found.append((leaf, where, tensor))
                return found
            pairs = list(zip(flat[1].paths(), flat[0]))
        else:
            pairs = _flatten(tree)
        want = [leaf.path for leaf in self.leaves]
        if [path for path, _ in pairs] != want:
            raise InputError(
                f"{modality} has the parts {[leaf_name(modality, p) for p, _ in pairs]}, the model takes "
                f"{[leaf_name(modality, p) for p in want]}"
            )
        found = []
        for leaf, (path, tensor) in zip(self.leaves, pairs):
            where = leaf_name(modality, path)
            if not isinstance(tensor, Tensor):
                raise InputError(f"{where} must be a tensor, got {type(tensor).__name__}")
            found.append((leaf, where, tensor))
        if flat is not None and len(self._names) < STRUCTURES_KEPT:
            self._names[(modality, flat[1])] = tuple(where for _, where, _ in found)
        return found

    @staticmethod
    def _fit(where: str, leaf: LeafSchema, tensor: Tensor, float_dtype: torch.dtype | None) -> Tensor:
        """``tensor`` in the leaf's dtype where the cast keeps its values' meaning, else refused.

        (The same tensor when it already is.)
        """
        want = leaf.torch_dtype()
        if float_dtype is not None and want.is_floating_point:
            want = float_dtype
        if tensor.dtype is want:
            return tensor
        if (tensor.is_floating_point() and want.is_floating_point) or (
            _integral(tensor.dtype) and _integral(want)
        ):
            return tensor.to(want)
        raise InputError(
            f"{where} is {_dtype_name(tensor.dtype)}, the model takes {leaf.dtype}; convert it first "
            f"(e.g. integer PCM audio to float in [-1, 1], token ids to an integer dtype, a mask to bool)"
        )

    def _check_shape(self, where: str, leaf: LeafSchema, tensor: Tensor) -> None:
        shape = tensor.shape
        if len(shape) == len(leaf.shape) + 1:
            batch_dim = self.batch_dim
            for d, want in enumerate(leaf.shape):
                got = shape[d if d < batch_dim else d + 1]
                if got == 0 if want is None else want != got:
                    break
            else:
                return
        self._refuse_shape(where, leaf, tensor)

    def _refuse_shape(self, where: str, leaf: LeafSchema, tensor: Tensor) -> None:
        """Raise the :class:`InputError` that says what is wrong with ``tensor``'s shape."""
        if tensor.dim() != len(leaf.shape) + 1:
            raise InputError(
                f"{where} has shape {tuple(tensor.shape)}, the model takes {len(leaf.shape) + 1} dimensions "
                f"(profiled as {self.expected_shape(leaf)}, B = requests)"
            )
        sizes = [s for i, s in enumerate(tensor.shape) if i != self.batch_dim]
        if any(want is not None and want != got for want, got in zip(leaf.shape, sizes)):
            raise InputError(
                f"{where} has shape {tuple(tensor.shape)}, the model takes {self.expected_shape(leaf)} "
                f"(B = requests)"
            )
        empty = next(
            (d for d, (want, got) in enumerate(zip(leaf.shape, sizes)) if want is None and got == 0), None
        )
        if empty is not None:
            raise InputError(
                f"{where} has shape {tuple(tensor.shape)}: nothing along dimension {self._tensor_dim(empty)} "
                f"(e.g. an empty sequence); the model takes at least one there (profiled as "
                f"{self.expected_shape(leaf)}, B = requests)"
            )

    def _check_agree(self, modality: str, group: tuple[Dim, ...], tensors: Sequence[Tensor]) -> None:
        def size(dim: Dim) -> int:
            return int(tensors[dim[0]].shape[self._tensor_dim(dim[1])])

        first = group[0]
        other = next((dim for dim in group[1:] if size(dim) != size(first)), None)
        if other is None:
            return

        def part(dim: Dim) -> str:
            where = leaf_name(modality, self.leaves[dim[0]].path)
            shape = tuple(tensors[dim[0]].shape)
            return f"{where} has {size(dim)} at dimension {self._tensor_dim(dim[1])} (shape {shape})"

        names = ", ".join(
            f"dimension {self._tensor_dim(d)} of {leaf_name(modality, self.leaves[i].path)}" for i, d in group
        )
        raise InputError(
            f"{part(first)} but {part(other)}; the model takes these sizes equal ({names}): they were "
            f"equal in every profiled batch, e.g. one mask entry per token"
        )

    def _tensor_dim(self, d: int) -> int:
        """The tensor dimension of dimension ``d`` of a leaf's shape without the batch dimension."""
        return d if d < self.batch_dim else d + 1


STRUCTURES_KEPT: Final = 64
"""Input tree structures whose leaf names a schema keeps (a served model sees the same few)."""
_DTYPES: dict[str, torch.dtype] = {}
"""dtype names already looked up (a schema is read on every in-process call)."""
_INTEGERS: Final = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def _integral(dtype: torch.dtype) -> bool:
    """An integer dtype whose values mosel records and checks (not bool, not the rarer unsigned ones)."""
    return dtype in _INTEGERS


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


def _first(bad: Tensor) -> tuple[int, ...]:
    """The index of the first True of ``bad``."""
    return tuple(int(i) for i in bad.nonzero()[0])


def _check_range(where: str, tensor: Tensor, values: ValueRange) -> None:
    bad = (tensor < values.low) | (tensor > values.high)
    if bool(bad.any()):
        index = _first(bad)
        raise InputError(
            f"{where} holds {int(tensor[index])} at {index}; the model takes {values.describe()}"
        )


def _check_finite(where: str, tensor: Tensor, original: Tensor | None) -> None:
    """Refuse NaN and infinities; ``original`` is the value before the cast to ``tensor``'s dtype."""
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return
    index = _first(bad)
    dtype = str(tensor.dtype).removeprefix("torch.")
    value = float(tensor[index] if original is None else original[index])
    beyond = f", beyond {dtype}'s range" if math.isfinite(value) else ""
    raise InputError(
        f"{where} holds {value:g} at {index}{beyond}; the model takes finite {dtype} numbers (at most "
        f"{torch.finfo(tensor.dtype).max:.4g} in magnitude; a JSON number beyond float64's range such as "
        f"1e400 reads as infinity). NaN and infinities are refused unless the service opts out (finite=False)"
    )


# ----------------------------------------------------------------------------------------------
# decoding JSON


def _tensor(value: Any, where: str, leaf: LeafSchema | None, batch_dim: int, finite: bool) -> Tensor:  # noqa: C901, PLR0912 (one refusal per way a JSON value can misfit its leaf)
    """A JSON (nested) list as a tensor: the leaf's dtype when known, else the values'.

    Shapes are left to :meth:`ModalitySchema.check`.
    """
    if isinstance(value, dict) and is_binary(value):  # {"$b64": ...} or {"$npy": ...}: the same rules
        value = torch.from_numpy(binary_array(value, where))
        if _integral(value.dtype):
            value = value.to(torch.int64)  # as a JSON list of integers parses: ranges judged on int64
    if not isinstance(value, list | Tensor):  # a Tensor: the list parsed already, as _parse does, in steps
        raise InputError(
            f"{where} must be a (nested) list, one tensor with the requests along its batch dimension "
            f"{batch_dim}, got {type(value).__name__}"
        )
    dtype = None if leaf is None else leaf.torch_dtype()
    parse_as = torch.float64 if dtype is not None and dtype.is_floating_point else None
    tensor = value if isinstance(value, Tensor) else parse_list(value, where, parse_as, dtype)
    if dtype is not None and tensor.numel() == 0:  # no values, e.g. [[]]: no dtype to judge; shapes decide
        return torch.empty(tensor.shape, dtype=dtype)
    if dtype is None:  # no schema: the values decide (integers stay int64, e.g. token ids)
        if not tensor.is_floating_point():
            return tensor if tensor.dtype in (torch.bool, torch.int64) else tensor.to(torch.int64)
        dtype = torch.float32
        if isinstance(value, list):
            tensor = parse_list(value, where, torch.float64, dtype)  # overflow is judged against float32
    if dtype.is_floating_point:
        cast = tensor.to(dtype)
        if finite:
            _check_finite(where, cast, tensor)
        return cast
    booleans = tensor.dtype == torch.bool and dtype != torch.bool
    if tensor.is_floating_point() or (booleans and not (leaf and leaf.values and leaf.values.source == MASK)):
        raise _misfit(where, tensor, dtype)  # booleans fit an integer 0/1 mask only
    if dtype == torch.bool:
        if tensor.dtype != torch.bool and bool(((tensor != 0) & (tensor != 1)).any()):
            raise InputError(f"{where} must hold booleans (or 0/1), the model takes a bool mask")
        return tensor.to(dtype)
    try:
        info = torch.iinfo(dtype)
    except TypeError:  # complex, quantized: cast as given
        return tensor.to(dtype)
    bad = (tensor < info.min) | (tensor > info.max)
    if bool(bad.any()):
        index = _first(bad)
        raise InputError(
            f"{where} holds {int(tensor[index])} at {index}, beyond {_dtype_name(dtype)} "
            f"([{info.min}, {info.max}]), which the model takes"
        )
    return tensor.to(dtype)


def _misfit(where: str, tensor: Tensor, dtype: torch.dtype) -> InputError:
    """Why floats (or booleans) do not fit an integer or bool leaf of ``dtype``."""
    name = _dtype_name(dtype)
    if not tensor.is_floating_point():  # booleans for an integer leaf
        return InputError(
            f"{where} holds booleans (true/false); the model takes {name} numbers (e.g. token ids): "
            f"send integers"
        )
    if dtype == torch.bool:
        return InputError(
            f"{where} holds numbers written as floats (0.0, 1.0); the model takes a bool mask: send "
            f"true/false (or the integers 0/1)"
        )
    odd = (tensor != tensor.round()) | ~torch.isfinite(tensor)
    if bool(odd.any()):
        index = _first(odd)
        return InputError(
            f"{where} holds {float(tensor[index])} at {index}; fractional numbers, NaN and infinities "
            f"do not fit {name}, which the model takes (e.g. token ids)"
        )
    return InputError(
        f"{where} holds numbers written as floats (2.0, 1e3); the model takes {name} "
        f"(e.g. token ids): send integers, not fractional numbers"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_list(value: Any, where: str, parse_as: torch.dtype | None, dtype: torch.dtype | None) -> Tensor:
    """``torch.tensor(value, dtype=parse_as)``, its failures as an :class:`InputError` naming ``where``."""
    try:
        return torch.tensor(value, dtype=parse_as)
    except (ValueError, OverflowError, RuntimeError) as exc:
        if "overflow" in str(exc).lower() or isinstance(exc, OverflowError):
            limit = "float64" if parse_as is not None else "int64"
            takes = "" if dtype is None else f"; the model takes {_dtype_name(dtype)}"
            raise InputError(f"{where} holds an integer beyond {limit}'s range{takes}") from None
        raise InputError(not_rectangular(where, exc)) from None
    except TypeError as exc:
        raise InputError(not_rectangular(where, exc)) from None


def not_rectangular(where: str, exc: BaseException) -> str:
    """Why a (nested) JSON list is not one tensor: ragged requests must be padded."""
    return (
        f"{where} must be a rectangular list of numbers or booleans ({exc}): every request must have "
        f"the same shape; pad the requests to one length (with the mask the model takes, e.g. "
        f"attention_mask) or send them in separate calls"
    )


BINARY_DTYPES: Final = frozenset(
    {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
)
"""The dtypes a binary tensor leaf (``{"$b64": ..., "dtype": ...}`` or ``{"$npy": ...}``) may hold."""


def is_binary(value: Mapping[str, Any]) -> bool:
    """Whether a JSON object is a binary tensor leaf: it has a ``"$b64"`` or ``"$npy"`` key."""
    return "$b64" in value or "$npy" in value


def _bytes(text: Any, where: str, key: str) -> bytes:
    if not isinstance(text, str):
        raise InputError(f"{where}[{key!r}] must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{where}[{key!r}] is not valid base64 ({exc})") from None


def binary_array(value: Mapping[str, Any], where: str) -> np.ndarray:
    """A binary tensor leaf as a (native byte order, writable) numpy array.

    ``{"$b64": <base64 of the raw little-endian bytes>, "dtype": "float32", "shape": [2, 3]}``
    (``shape`` left out: one dimension), or ``{"$npy": <base64 of a .npy file>}`` (read with
    ``numpy.load(..., allow_pickle=False)``). The dtype is one of :data:`BINARY_DTYPES`.

    Raises:
        InputError: a malformed leaf: other keys, bad base64, an unknown dtype, a byte count
            that is not the shape's, an unreadable ``.npy`` file; naming ``where``.
    """
    if "$npy" in value:
        if set(value) != {"$npy"}:
            raise InputError(f"{where}: a .npy leaf has the one key '$npy', got {sorted(value)}")
        try:
            array = np.load(io.BytesIO(_bytes(value["$npy"], where, "$npy")), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{where}['$npy'] is not a .npy file of numbers ({exc})") from None
        if not isinstance(array, np.ndarray) or array.dtype.name not in BINARY_DTYPES:
            kind = getattr(getattr(array, "dtype", None), "name", type(array).__name__)
            raise InputError(f"{where}['$npy'] holds {kind}; send one of {sorted(BINARY_DTYPES)}")
        return array.astype(array.dtype.newbyteorder("="), copy=True)
    extra = set(value) - {"$b64", "dtype", "shape"}
    if extra or "dtype" not in value:
        raise InputError(
            f"{where}: a binary leaf is {{'$b64': <base64 of little-endian bytes>, 'dtype': 'float32', "
            f"'shape': [...]}}, got the keys {sorted(value)}"
        )
    name = value["dtype"]
    if not isinstance(name, str) or name not in BINARY_DTYPES:
        raise InputError(f"{where}['dtype'] is {name!r}; send one of {sorted(BINARY_DTYPES)}")
    data = _bytes(value["$b64"], where, "$b64")
    dtype = np.dtype(name).newbyteorder("<")
    shape = value.get("shape")
    if shape is None:
        shape = [len(data) // dtype.itemsize]
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise InputError(f"{where}['shape'] must be a list of sizes (non-negative integers), got {shape!r}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise InputError(
            f"{where} holds {len(data)} bytes; shape {shape} of {name} takes {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def decode(modality: str, value: Any, schema: ModalitySchema | None = None, *, finite: bool = True) -> Tree:
    """A modality's input from its JSON form, checked against its profiled ``schema``.

    A JSON (nested) list is one tensor, an object a dict of parts; with a schema whose
    parts are a tuple or list, a JSON list of the parts. With a schema each tensor takes the
    recorded dtype (integers stay integers; fractional values for an integer leaf, and integers
    beyond its dtype, are refused) and must pass :meth:`ModalitySchema.check`: the recorded rank
    and sizes, the sizes that agree, the value ranges. Without one (a profile saved before
    schemas were recorded) the values decide: booleans bool, integers int64, any float float32.

    Args:
        modality: the modality's name, for messages.
        value: the parsed JSON.
        schema: the modality's schema, or None.
        finite: refuse NaN and infinities in float leaves, judged after the cast to the leaf's
            dtype (``1e39`` is infinite in float32). False lets them through.

    Raises:
        InputError: the value does not fit; the message names the modality and the leaf.
    """
    if schema is None:
        return _loose(value, modality, finite)
    by_path = {leaf.path: leaf for leaf in schema.leaves}
    tree = _strict(value, (), modality, by_path, schema.batch_dim, finite)
    schema.check(modality, tree, finite=False)  # finiteness was judged against the values as sent
    return tree


def _loose(value: Any, where: str, finite: bool) -> Tree:
    if isinstance(value, dict) and not is_binary(value):
        return {k: _loose(v, f"{where}[{k!r}]", finite) for k, v in value.items()}
    return _tensor(value, where, None, 0, finite)


def _strict(
    value: Any, path: Path, modality: str, leaves: Mapping[Path, LeafSchema], batch_dim: int, finite: bool
) -> Tree:
    where = leaf_name(modality, path)
    leaf = leaves.get(path)
    if leaf is not None:
        return _tensor(value, where, leaf, batch_dim, finite)
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
        return {k: _strict(value[k], (*path, k), modality, leaves, batch_dim, finite) for k in keys}
    if not isinstance(value, list) or len(value) != len(keys):
        raise InputError(f"{where} must be a list of {len(keys)} parts, got {_describe(value)}")
    return tuple(_strict(v, (*path, i), modality, leaves, batch_dim, finite) for i, v in enumerate(value))


def _describe(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
