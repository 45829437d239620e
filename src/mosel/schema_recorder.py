"""Learning a model's input schema from the batches it is profiled on: :class:`SchemaRecorder`.

Per modality: each leaf's dtype and sizes, the sizes that agree in every batch, integer leaves'
observed ranges, and the vocabulary of leaves an embedding looks up (watched while the branch
runs). The result is a :class:`mosel.schema.ModalitySchema` per modality.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mosel.schema import (
    EMBEDDING,
    MASK,
    Dim,
    LeafSchema,
    ModalitySchema,
    ValueRange,
    _flatten,
    _integral,
)
from mosel.spec import ModelSpec
from mosel.trees import Tree

__all__ = ["SchemaRecorder"]


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


def _refine(classes: list[list[Dim]] | None, seen: ModalitySchema) -> list[list[Dim]]:
    """The (leaf, dim) classes of equal size in every batch so far, split by this batch's sizes."""
    if classes is None:
        classes = [[(i, d) for i, leaf in enumerate(seen.leaves) for d in range(len(leaf.shape))]]
    out: list[list[Dim]] = []
    for members in classes:
        by_size: dict[int | None, list[Dim]] = {}
        for i, d in members:
            by_size.setdefault(seen.leaves[i].shape[d], []).append((i, d))
        out += by_size.values()
    return out


_EMBEDDING_FUNCTIONS: Final[dict[Callable[..., Any], tuple[int, int]]] = {
    F.embedding: (0, 1),  # positions of (indices, weight) in the call
    F.embedding_bag: (0, 1),
    torch.embedding: (1, 0),
}


class _EmbeddingWatch(TorchFunctionMode):
    """Sees every embedding lookup; ``rows[i]``: the fewest rows of a table leaf ``i`` indexed whole."""

    def __init__(self, leaves: Sequence[Tensor]) -> None:
        super().__init__()
        self.leaves = [(i, t) for i, t in enumerate(leaves) if _integral(t.dtype) and t.numel() > 0]
        self.rows: dict[int, int] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        where = _EMBEDDING_FUNCTIONS.get(func)
        if where is not None:
            indices = _argument(args, kwargs, where[0], "indices" if func is torch.embedding else "input")
            weight = _argument(args, kwargs, where[1], "weight")
            if isinstance(indices, Tensor) and isinstance(weight, Tensor) and weight.dim() >= 1:
                for i, leaf in self.leaves:
                    if _whole(indices, leaf):
                        self.rows[i] = min(self.rows.get(i, weight.shape[0]), int(weight.shape[0]))
        return func(*args, **kwargs)


def _argument(args: Sequence[Any], kwargs: Mapping[str, Any], position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(name)


def _whole(indices: Tensor, leaf: Tensor) -> bool:
    """Whether ``indices`` is ``leaf`` or a view of all of its elements (a reshape, a flatten)."""
    if indices is leaf:
        return True
    if indices.dtype != leaf.dtype or indices.device != leaf.device or indices.numel() != leaf.numel():
        return False
    try:
        if indices.data_ptr() != leaf.data_ptr():
            return False
    except RuntimeError:  # a tensor without storage (fake, meta): not the leaf
        return False
    same = indices.shape == leaf.shape and indices.stride() == leaf.stride()
    return same or (indices.is_contiguous() and leaf.is_contiguous())


class SchemaRecorder:
    """Builds the input schema of a model from the batches it is shown (``mosel.profile`` does).

    A modality whose batches disagree on their structure, dtypes or ranks gets no schema (a
    service then takes dtypes from the JSON values, as for an older profile). :meth:`observe`
    takes each batch's shapes and integer values; :meth:`watch` wraps a call of a branch on such
    a batch to see which integer leaves index an embedding.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._schemas: dict[str, ModalitySchema | None] = {}
        self._classes: dict[str, list[list[Dim]]] = {}
        self._observed: dict[str, list[tuple[int, int] | None]] = {}
        self._watches: dict[str, int] = {}
        # modality -> leaf -> (watched calls that indexed an embedding with it whole, fewest rows)
        self._indexed: dict[str, dict[int, tuple[int, int]]] = {}

    def observe(self, inputs: Mapping[str, Tree]) -> None:
        """Take one batch of inputs (modality -> tree) into account."""
        for m in self.spec.modalities:
            value = inputs.get(m)
            if value is None:
                continue
            seen = _observe(value, self.spec.batch_dim(m))
            if m not in self._schemas:
                merged = seen
            else:
                old = self._schemas[m]
                merged = None if old is None or seen is None else _merge(old, seen)
            self._schemas[m] = merged
            if merged is None or seen is None:
                continue
            self._classes[m] = _refine(self._classes.get(m), seen)
            observed = self._observed.setdefault(m, [None] * len(seen.leaves))
            for i, (_, leaf) in enumerate(_flatten(value)):
                if _integral(leaf.dtype) and leaf.numel() > 0:
                    low, high = (int(v) for v in torch.aminmax(leaf))
                    before = observed[i]
                    if before is not None:
                        low, high = min(before[0], low), max(before[1], high)
                    observed[i] = (low, high)

    @contextlib.contextmanager
    def watch(self, modality: str, value: Tree) -> Iterator[None]:
        """Within the block, watch the embedding lookups of ``modality``'s branch on ``value``.

        ``value`` is a batch given to :meth:`observe`; the block calls the branch on it (eagerly:
        inside ``torch.compile``d code the watch would not run; and only for the watch, since the
        torch function mode it installs turns fast paths off). A leaf takes an embedding's range
        only if it was indexed whole in every watched call.
        """
        if self._schemas.get(modality) is None:
            yield
            return
        watch = _EmbeddingWatch([leaf for _, leaf in _flatten(value)])
        with watch:
            yield
        self._watches[modality] = self._watches.get(modality, 0) + 1
        indexed = self._indexed.setdefault(modality, {})
        for i, rows in watch.rows.items():
            count, fewest = indexed.get(i, (0, rows))
            indexed[i] = (count + 1, min(fewest, rows))

    def schema(self) -> dict[str, ModalitySchema]:
        """Modality -> schema, for the modalities whose batches agreed."""
        out = {}
        for m, schema in self._schemas.items():
            if schema is not None:
                out[m] = self._finish(m, schema)
        return out

    def _finish(self, m: str, schema: ModalitySchema) -> ModalitySchema:
        leaves = schema.leaves
        agree = tuple(
            tuple(group)
            for group in self._classes[m]
            if len(group) > 1 and leaves[group[0][0]].shape[group[0][1]] is None
        )
        group_of = {dim: g for g, group in enumerate(agree) for dim in group}

        def same_shape(i: int, j: int) -> bool:
            a, b = leaves[i].shape, leaves[j].shape
            return len(a) == len(b) and all(
                (x is not None and x == y)
                or ((i, d) in group_of and group_of[(i, d)] == group_of.get((j, d)))
                for d, (x, y) in enumerate(zip(a, b))
            )

        watches = self._watches.get(m, 0)
        indexed = self._indexed.get(m, {})
        out = []
        for i, leaf in enumerate(leaves):
            observed = self._observed[m][i]
            values = None
            count, rows = indexed.get(i, (0, 0))
            if watches and count == watches and rows >= 1:
                info = torch.iinfo(leaf.torch_dtype())
                values = ValueRange(0, min(rows - 1, info.max), EMBEDDING)
            elif (
                observed == (0, 1)
                and any(s is None or s > 1 for s in leaf.shape)
                and any(same_shape(i, j) for j in range(len(leaves)) if j != i)
            ):
                values = ValueRange(0, 1, MASK)
            out.append(dataclasses.replace(leaf, observed=observed, values=values))
        return ModalitySchema(schema.batch_dim, tuple(out), agree)
