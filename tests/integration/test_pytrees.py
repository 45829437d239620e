"""Random pytree structures on every serving path: inputs, features and outputs of any nesting.

Hypothesis draws, per example, the structure of each modality's input (nested dicts, tuples and
lists of tensors with random trailing shapes and dtypes), each modality's batch dimension, job
sizes (some beyond ``max_batch_size``: chunked), presence masks and SLOs; the jobs are served
concurrently (merged batches, mixed strategies). Every output row must equal its configuration
run by hand on that row alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mosel
from mosel.testing import synthetic_profile

pytestmark = pytest.mark.integration

MAX = 6


def _features(x: Any, dim: int) -> Any:
    """Every leaf reduced to one number per row, weighted by its position; batched along ``dim``."""
    leaves = optree.tree_leaves(x, namespace="mosel")
    rows = [leaf.movedim(dim, 0).reshape(leaf.shape[dim], -1).float().sum(1) for leaf in leaves]
    f = torch.stack([(j + 1) * r for j, r in enumerate(rows)], 1).sum(1, keepdim=True)  # (B, 1)
    f = torch.cat([f, torch.sin(f)], 1)  # (B, 2)
    both = (f, {"sq": f * f})  # a tuple-and-dict feature tree
    return optree.tree_map(lambda t: t.movedim(0, dim), both, namespace="mosel")


def make_model(dims: tuple[int, int]) -> nn.Module:
    @mosel.multimodal
    class AnyTrees(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, -0.5]))

        @mosel.modality("a", batch_dim=dims[0])
        def encode_a(self, x: Any) -> Any:
            return _features(x, dims[0])

        @mosel.modality("b", batch_dim=dims[1])
        def encode_b(self, x: Any) -> Any:
            return _features(x, dims[1])

        @mosel.fusion
        def fuse(self, features: Mapping[str, Any]) -> Any:
            total = 0
            for m, (f, extra) in features.items():
                dim = dims[0] if m == "a" else dims[1]
                total = total + (f.movedim(dim, 0) + extra["sq"].movedim(dim, 0)) * self.w
            return {"y": total, "pair": [total.sum(1), (total[:, :1] * 2,)]}

    return AnyTrees().eval()


Shape = tuple[int, ...]


def trees() -> st.SearchStrategy[Any]:
    """Tree skeletons: leaves are (trailing shape, dtype) descriptions."""
    leaf = st.tuples(st.lists(st.integers(1, 3), max_size=2).map(tuple), st.sampled_from(["f", "i", "b"]))
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.dictionaries(st.sampled_from(["ids", "mask", "x", "y"]), inner, min_size=1, max_size=3),
            st.lists(inner, min_size=1, max_size=3).map(tuple),
            st.lists(inner, min_size=1, max_size=3),
        ),
        max_leaves=4,
    )


def build(skeleton: Any, n: int, dim: int, g: torch.Generator) -> Any:
    if isinstance(skeleton, dict):
        return {k: build(v, n, dim, g) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [build(v, n, dim, g) for v in skeleton]
    if isinstance(skeleton, tuple) and len(skeleton) == 2 and isinstance(skeleton[1], str):
        trailing, kind = skeleton
        shape = [n, *trailing]
        if dim == 1:
            shape = [*trailing[:1], n, *trailing[1:]] if trailing else [1, n]
        if kind == "f":
            return torch.randn(shape, generator=g)
        if kind == "i":
            return torch.randint(0, 9, shape, generator=g)
        return torch.rand(shape, generator=g) > 0.5
    return tuple(build(v, n, dim, g) for v in skeleton)


def row(x: Any, i: int, dim: int) -> Any:
    return optree.tree_map(lambda t: t.narrow(dim, i, 1), x, namespace="mosel")


def by_hand(
    model: nn.Module, dims: tuple[int, int], job: dict[str, Any], modalities: tuple[frozenset[str], ...]
) -> Any:
    outs = []
    with torch.no_grad():
        for i, config in enumerate(modalities):
            feats = {}
            for m, d in zip(("a", "b"), dims):
                if m in config:
                    feats[m] = getattr(model, f"encode_{m}")(row(job[m], i, d))
            outs.append(model.fuse(feats))  # type: ignore[operator]
    return optree.tree_map(lambda *rows: torch.cat(rows), *outs, namespace="mosel")


MODELS: dict[tuple[int, int], nn.Module] = {}


def served(dims: tuple[int, int]) -> nn.Module:
    if dims not in MODELS:
        model = make_model(dims)
        mosel.attach(
            model,
            synthetic_profile(
                model,
                branch_us={
                    "a": [40.0 * b for b in range(1, MAX + 1)],
                    "b": [90.0 * b for b in range(1, MAX + 1)],
                },
                accuracy={"a": 0.6, "b": 0.7, "a+b": 0.9},
            ),
        )
        MODELS[dims] = model
    return MODELS[dims]


@pytest.fixture(scope="module", autouse=True)
def _close_models() -> Any:
    yield
    for model in MODELS.values():
        mosel.close(model)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    skeletons=st.tuples(trees(), trees()),
    dims=st.sampled_from(list(itertools.product((0, 1), (0, 1)))),
    sizes=st.lists(st.integers(1, 2 * MAX + 1), min_size=1, max_size=4),
    deadline=st.sampled_from([None, 0.15, 0.4, 5.0]),
    masked=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_random_pytrees_batch_dims_masks_and_strategies_match_rows_by_hand(
    skeletons: tuple[Any, Any],
    dims: tuple[int, int],
    sizes: list[int],
    deadline: float | None,
    masked: list[bool],
    seed: int,
) -> None:
    model = served(dims)
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i, n in enumerate(sizes):
        job = {m: build(s, n, d, g) for m, s, d in zip(("a", "b"), skeletons, dims)}
        present = None
        if masked[i]:
            has_b = torch.rand(n, generator=g) > 0.5
            present = {"b": has_b, "a": ~has_b | (torch.rand(n, generator=g) > 0.5)}
        jobs.append((job, present))
    with torch.no_grad():
        futures = [
            model.submit(job, deadline_ms=deadline, min_accuracy=0.6, best_effort=True, present=present)  # type: ignore[operator]
            for job, present in jobs
        ]
        for (job, present), future in zip(jobs, futures):
            result = future.result(timeout=60)
            if present is not None:
                for m, mask in present.items():
                    assert all(m not in c for c, has in zip(result.modalities, mask.tolist()) if not has)
            expected = by_hand(model, dims, job, result.modalities)
            assert optree.tree_structure(result.output, namespace="mosel") == optree.tree_structure(
                expected, namespace="mosel"
            )
            for got, want in zip(
                optree.tree_leaves(result.output, namespace="mosel"),
                optree.tree_leaves(expected, namespace="mosel"),
            ):
                torch.testing.assert_close(got, want)
