"""Batched pytrees: a tensor, or nested dicts, tuples and lists of tensors, one row per request.

Inputs, branch features and fusion outputs may all be such trees (``{"input_ids": t, "attention_mask":
m}``, ``(hidden, pooled)``). Every leaf carries the requests along one batch dimension; mosel slices,
gathers and concatenates every leaf along it. Flattening is done by `optree
<https://github.com/metaopt/optree>`_, the maintained public pytree library (torch's own
``torch.utils._pytree`` is private); a bare tensor takes a fast path that never flattens.
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import optree
import torch
from torch import Tensor

__all__ = [
    "Tree",
    "TreeError",
    "adopt",
    "check",
    "concat",
    "copy",
    "flatten",
    "leaves",
    "rows",
    "signature",
    "take",
    "to_device",
]

Tree: TypeAlias = Any
"""A tensor, or a nested dict / tuple / list (or namedtuple) of tensors."""

NAMESPACE = "mosel"


class TreeError(ValueError):
    """A tree that is not batched as required; callers re-raise it as a typed mosel error."""


_CONTAINERS: set[type] = {dict, list, tuple}
"""Types whose instances are walked into: optree's own, and those :func:`adopt` registered."""


def adopt(tree: Tree) -> Tree:
    """Make every mapping in ``tree`` a node of mosel's trees, not a leaf; returns ``tree``.

    ``optree`` walks dicts, lists, tuples and namedtuples; any other ``Mapping`` (a Hugging Face
    ``BatchEncoding``, ``BatchFeature`` or ``ModelOutput``, a ``UserDict``) would be one opaque
    leaf. Each such type is registered once, in mosel's namespace, as a node whose children are
    its values in sorted key order (as a dict's: the same leaves as a dict of the same items) and
    that is rebuilt as the same type, in its own order: a tokenizer's output goes in as
    it comes, and a branch's ``ModelOutput`` reaches the fusion as a ``ModelOutput``.
    """
    if isinstance(tree, Tensor):
        return tree
    pending = [tree]
    while pending:
        node = pending.pop()
        kind = type(node)
        if kind not in _CONTAINERS:
            if not isinstance(node, Mapping) or isinstance(node, Tensor):
                continue
            _register_mapping(kind, node)
        if isinstance(node, Mapping):
            pending.extend(v for v in node.values() if not isinstance(v, Tensor))
        elif isinstance(node, (list, tuple)):
            pending.extend(v for v in node if not isinstance(v, Tensor))
    return tree


_SORTED: dict[tuple[Any, ...], tuple[Any, ...]] = {}
"""Key tuples already put in order (a served mapping has the same few keys call after call)."""


def _sorted_keys(keys: tuple[Any, ...]) -> tuple[Any, ...]:
    """The keys in sorted order, as optree orders a dict's (insertion order if they do not sort)."""
    order = _SORTED.get(keys)
    if order is None:
        try:
            order = tuple(sorted(keys))
        except TypeError:
            order = keys
        if len(_SORTED) < 4096:
            _SORTED[keys] = order
    return order


def _items(node: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """The dict a ``UserDict`` (a ``BatchEncoding``) keeps its items in, else the mapping itself."""
    data = node.data if isinstance(node, UserDict) else None
    return data if type(data) is dict else node


def _register_mapping(kind: type, example: Mapping[Any, Any]) -> None:
    # Children in sorted key order, as optree flattens a dict: a mapping and a dict of the same
    # items have the same leaves in the same order (a profile recorded from a tokenizer's
    # BatchEncoding takes the same fields as a dict, from JSON or by hand); rebuilt in its own order.
    def flatten(
        node: Mapping[Any, Any],
    ) -> tuple[list[Any], tuple[tuple[Any, ...], tuple[Any, ...]], tuple[Any, ...]]:
        items = _items(node)
        order = tuple(items)
        keys = _sorted_keys(order)
        return [items[k] for k in keys], (keys, order), keys

    def unflatten(metadata: tuple[tuple[Any, ...], tuple[Any, ...]], children: Any) -> Any:
        keys, order = metadata
        items = dict(zip(keys, children, strict=True))
        return rebuild({k: items[k] for k in order})

    rebuild: Callable[[dict[Any, Any]], Any] = _rebuilder(kind, example)
    optree.register_pytree_node(kind, flatten, unflatten, namespace=NAMESPACE)  # type: ignore[arg-type]
    _CONTAINERS.add(kind)


def _rebuilder(kind: type, example: Mapping[Any, Any]) -> Callable[[dict[Any, Any]], Any]:
    """How a mapping of ``kind`` is made from a dict of its items (tried once, on ``example``)."""
    items = dict(example)

    def positional(d: dict[Any, Any]) -> Any:
        return kind(d)

    def keywords(d: dict[Any, Any]) -> Any:
        return kind(**d)

    for make in (positional, keywords):
        try:
            if isinstance(make(items), kind):
                return make
        except Exception:
            continue
    return dict  # a mapping that cannot be rebuilt from its items comes back as a dict


def leaves(tree: Tree) -> list[Any]:
    """The leaves of ``tree`` (a bare tensor is its own single leaf; None is an empty subtree)."""
    if isinstance(tree, Tensor):
        return [tree]
    found = optree.tree_leaves(tree, none_is_leaf=False, namespace=NAMESPACE)
    if all(type(leaf) is Tensor for leaf in found):  # the mappings in it are adopted already
        return found
    return optree.tree_leaves(adopt(tree), none_is_leaf=False, namespace=NAMESPACE)


def flatten(tree: Tree) -> tuple[list[Any], optree.PyTreeSpec]:
    """The leaves of a tree that is not a bare tensor, and its structure (one walk, for reuse)."""
    found, spec = optree.tree_flatten(tree, none_is_leaf=False, namespace=NAMESPACE)
    if all(type(leaf) is Tensor for leaf in found):  # the mappings in it are adopted already
        return found, spec
    return optree.tree_flatten(adopt(tree), none_is_leaf=False, namespace=NAMESPACE)


def rows(items: Sequence[Any], tree: Tree, dim: int = 0) -> int:
    """:func:`check` on a tree's leaves ``items`` (from :func:`flatten`; ``tree`` names it in errors)."""
    if not items:
        raise TreeError(f"{type(tree).__name__} {_short(tree)} holds no tensor")
    count = -1
    for leaf in items:
        if not isinstance(leaf, Tensor):
            raise TreeError(
                f"a leaf of type {type(leaf).__name__} ({_short(leaf)}); every leaf must be a torch.Tensor"
            )
        if leaf.dim() <= dim:
            raise TreeError(f"a leaf of shape {tuple(leaf.shape)} has no batch dimension {dim}")
        if count >= 0 and leaf.shape[dim] != count:
            sizes = sorted({int(t.shape[dim]) for t in items if isinstance(t, Tensor) and t.dim() > dim})
            raise TreeError(f"leaves disagree on the batch dimension {dim}: sizes {sizes}")
        count = int(leaf.shape[dim])
    return count


def device(tree: Tree) -> torch.device:
    """The device of the tree's first leaf."""
    first: Tensor = leaves(tree)[0]
    return first.device


def check(tree: Tree, dim: int = 0) -> int:
    """The number of rows of ``tree`` along ``dim``; :class:`TreeError` unless it is a batched tree.

    Every leaf must be a tensor with at least ``dim + 1`` dimensions, and all leaves must agree on
    the size of dimension ``dim``.
    """
    if isinstance(tree, Tensor):
        if tree.dim() <= dim:
            raise TreeError(f"a tensor of shape {tuple(tree.shape)} has no batch dimension {dim}")
        return int(tree.shape[dim])
    return rows(leaves(tree), tree, dim)  # leaves() adopts its mappings: later flattens see through them


def take(tree: Tree, rows: slice | Tensor, dim: int = 0) -> Tree:
    """The selected rows of every leaf: a slice (a view) or a gather by a long index tensor."""
    if isinstance(tree, Tensor):
        return _take(tree, rows, dim)
    return optree.tree_map(lambda t: _take(t, rows, dim), tree, none_is_leaf=False, namespace=NAMESPACE)


def _take(t: Tensor, rows: slice | Tensor, dim: int) -> Tensor:
    if isinstance(rows, slice):
        return t[rows] if dim == 0 else t[(slice(None),) * dim + (rows,)]
    return t.index_select(dim, rows if rows.device == t.device else rows.to(t.device))


def concat(trees: Sequence[Tree], dim: int = 0) -> Tree:
    """Concatenate trees of one structure leaf by leaf; :class:`TreeError` when they do not fit."""
    if len(trees) == 1:
        return trees[0]
    first = trees[0]
    try:
        if isinstance(first, Tensor):
            if not all(isinstance(t, Tensor) for t in trees):
                raise TreeError("chunks are not all tensors")
            return torch.cat(list(trees), dim)
        flat = [optree.tree_flatten(t, none_is_leaf=False, namespace=NAMESPACE) for t in trees]
        spec = flat[0][1]
        if any(s != spec for _, s in flat):
            other = next(s for _, s in flat if s != spec)
            raise TreeError(f"chunks have different structures: {spec} and {other}")
        joined = [torch.cat([f[0][i] for f in flat], dim) for i in range(len(flat[0][0]))]
        return optree.tree_unflatten(spec, joined)
    except (RuntimeError, TypeError) as exc:  # shapes or dtypes that torch.cat refuses
        raise TreeError(f"chunks do not concatenate along dimension {dim}: {exc}") from exc


def copy(tree: Tree) -> Tree:
    """``tree`` with every leaf copied into storage of its own (a view would keep its base alive)."""
    if isinstance(tree, Tensor):
        return tree.clone()
    return optree.tree_map(lambda t: t.clone(), tree, none_is_leaf=False, namespace=NAMESPACE)


def signature(tree: Tree, dim: int = 0, flat: tuple[list[Any], optree.PyTreeSpec] | None = None) -> object:
    """What must match for two trees to be concatenated along ``dim`` without a cast or a pad.

    That is the structure, and each leaf's dtype, device and shape apart from ``dim``. ``flat``:
    the tree's :func:`flatten`, when the caller has it.
    """
    if isinstance(tree, Tensor):
        shape = tree.shape
        return (tree.dtype, tree.device, shape[1:] if dim == 0 else shape[:dim] + shape[dim + 1 :])
    if flat is None:
        flat = optree.tree_flatten(tree, none_is_leaf=False, namespace=NAMESPACE)
    items, spec = flat
    return (spec, tuple((t.dtype, t.device, t.shape[:dim] + t.shape[dim + 1 :]) for t in items))


def to_device(tree: Tree, device: torch.device) -> Tree:
    """``tree`` with every leaf on ``device`` (leaves already there are returned as they are)."""
    if isinstance(tree, Tensor):
        return tree if tree.device == device else tree.to(device, non_blocking=True)
    if all(t.device == device for t in leaves(tree)):
        return tree  # not rebuilt: a mapping type's constructor (a BatchEncoding's) is costly
    return optree.tree_map(
        lambda t: t if t.device == device else t.to(device, non_blocking=True),
        tree,
        none_is_leaf=False,
        namespace=NAMESPACE,
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
