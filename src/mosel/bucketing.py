"""Validation rows by size bucket, for the profiler: every bucket the rows reach, and its widths.

For a modality declared with ``pad=`` (:class:`mosel.Padding`), the rows of every validation batch
are regrouped by their own size (its mask tells it) and cropped or padded to their bucket's edge:
shuffled batches padded per batch still reach every bucket their rows do, and each bucket is
timed at its edge, the shape serving pads its jobs to. Without it, a row is as long as its batch:
each batch lands in its width's bucket, and a bucket keeps a few distinct widths, so that the
profiler can time what a width the branch has never run costs (on a CPU, oneDNN builds kernels per
shape: a new width costs more than a repeated one) and check costs at a width it never timed.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import torch
from torch import Tensor, nn

from mosel import trees
from mosel.errors import SpecError
from mosel.profiles import bucket_edge
from mosel.spec import DEFAULT_BUCKETS, ModelSpec
from mosel.timing import NewWidths
from mosel.trees import Tree

__all__ = ["WIDTHS", "SizedRows", "new_widths", "padding_changes", "repeat_rows"]

WIDTHS: Final = 6
"""Distinct widths kept per bucket of an unpadded modality: the widest is timed in the rounds,
the others each run once at new shapes, but up to :data:`HELD_OUT` (the widest of them) kept for
the cost checks when there are two others or more."""
HELD_OUT: Final = 2
"""Widths of a bucket held out for the cost checks at most (a check runs once, at one of them)."""
PADDING_TOLERANCE: Final = 1e-3
"""Largest change padding may make to an output, relative to the output's largest magnitude."""


def repeat_rows(x: Tree, rows: int, dim: int) -> Tree:
    """``rows`` rows of ``x`` along ``dim``, repeating its rows as often as needed."""
    have = trees.check(x, dim)
    if have < rows:
        x = trees.concat([x] * -(-rows // have), dim)
    return trees.take(x, slice(0, rows), dim)


@dataclass
class _Bucket:
    """One size bucket of one modality: its rows padded to the edge, or its batches per width."""

    rows: list[Tree] = field(default_factory=list)
    count: int = 0
    widths: dict[int, Tree] = field(default_factory=dict)


class SizedRows:
    """Every sized modality's validation rows, grouped by size bucket (each modality on its own).

    Args:
        spec: the model's spec.
        max_batch_size: rows kept per bucket (a padded modality), the rows of a timing input.
    """

    def __init__(self, spec: ModelSpec, max_batch_size: int) -> None:
        self.spec = spec
        self.most = max_batch_size
        self.buckets: dict[str, dict[int, _Bucket]] = {m: {} for m in spec.sizings}
        self.reference: dict[str, int] = {}
        """Modality -> the bucket of the first batch's longest row."""
        self.longest: dict[str, int] = {}

    def observe(self, batch: Mapping[str, Tree]) -> None:
        """Sort one validation batch's rows into their buckets."""
        for m, sizing in self.spec.sizings.items():
            x = batch[m]
            width = sizing.read(m, x)
            dim = self.spec.batch_dim(m)
            padding = sizing.padding
            lengths = None if padding is None else padding.lengths(m, x, width, dim)
            if padding is None or lengths is None:
                sizes = [width] * trees.check(x, dim)
            else:
                sizes = lengths.clamp(max=width).tolist()
            self.reference.setdefault(m, bucket_edge(sizing.buckets, max(sizes)))
            self.longest[m] = max(self.longest.get(m, 0), *sizes)
            if padding is None:
                bucket = self.buckets[m].setdefault(bucket_edge(sizing.buckets, width), _Bucket())
                kept = bucket.widths.get(width)
                rows = min(len(sizes), self.most)
                if (kept is None and len(bucket.widths) < WIDTHS) or (
                    kept is not None and trees.check(kept, dim) < rows
                ):  # at most max_batch_size rows, in storage of their own (not the whole batch's)
                    bucket.widths[width] = trees.copy(trees.take(x, slice(0, rows), dim))
                continue
            by_edge: dict[int, list[int]] = {}
            for i, size in enumerate(sizes):
                by_edge.setdefault(bucket_edge(sizing.buckets, size), []).append(i)
            for edge, members in by_edge.items():
                bucket = self.buckets[m].setdefault(edge, _Bucket())
                take = members[: self.most - bucket.count]
                if take:
                    index = torch.tensor(take, device=trees.device(x))
                    bucket.rows.append(padding.fit(trees.take(x, index, dim), width, edge))
                    bucket.count += len(take)

    def reached(self, modality: str) -> list[int]:
        """The buckets some validation row of ``modality`` reached, the reference first."""
        reference = self.reference[modality]
        return [reference, *sorted(e for e in self.buckets[modality] if e != reference)]

    def padded(self, modality: str) -> bool:
        """Whether ``modality`` is timed at its buckets' edges (declared with ``pad=``)."""
        return self.spec.sizings[modality].padding is not None

    def _widths(self, modality: str, edge: int) -> list[int]:
        """The bucket's widths, widest first (an unpadded modality)."""
        return sorted(self.buckets[modality][edge].widths, reverse=True)

    def timing_input(self, modality: str, edge: int) -> Tree:
        """``max_batch_size`` rows at the bucket's timed width: its edge, or its widest batch."""
        bucket, dim = self.buckets[modality][edge], self.spec.batch_dim(modality)
        if self.padded(modality):
            return repeat_rows(trees.concat(bucket.rows, dim), self.most, dim)
        return repeat_rows(bucket.widths[self._widths(modality, edge)[0]], self.most, dim)

    def _split(self, modality: str, edge: int) -> tuple[list[int], list[int]]:
        """The bucket's widths other than the timed one: those run once each, those held out."""
        if self.padded(modality):
            return [], []
        others = self._widths(modality, edge)[1:]  # widest first: the checks nearest the timed width
        held = 0 if len(others) < 2 else min(HELD_OUT, len(others) - 1)
        return others[held:], others[:held]

    def fresh(self, modality: str, edge: int) -> list[Tree]:
        """Inputs at the bucket's widths that neither the rounds nor the checks run at."""
        dim = self.spec.batch_dim(modality)
        widths = self.buckets[modality][edge].widths
        return [repeat_rows(widths[w], self.most, dim) for w in self._split(modality, edge)[0]]

    def held_out(self, modality: str, edge: int) -> list[Tree]:
        """Inputs at widths of the bucket kept for the cost checks (none run them before)."""
        dim = self.spec.batch_dim(modality)
        widths = self.buckets[modality][edge].widths
        return [repeat_rows(widths[w], self.most, dim) for w in self._split(modality, edge)[1]]

    def widths(self, modality: str) -> dict[int, tuple[int, ...]]:
        """Bucket edge -> the widths its timings run at (the tables' first)."""
        if self.padded(modality):
            return {edge: (edge,) for edge in self.buckets[modality]}
        return {edge: tuple(self._widths(modality, edge)) for edge in self.buckets[modality]}

    def unreached(self, modality: str) -> list[int]:
        """Declared buckets no validation row reached (for default buckets: those between reached ones)."""
        declared, reached = self.spec.sizings[modality].buckets, self.buckets[modality]
        if declared == DEFAULT_BUCKETS:
            declared = tuple(e for e in declared if min(reached) < e < max(reached))
        return [e for e in declared if e not in reached]

    def unreached_warning(self, model_class: str) -> str | None:
        """What to tell the user about declared buckets no validation row reached, if any."""
        lines = []
        for m in self.buckets:
            missing = self.unreached(m)
            if not missing:
                continue
            largest = max(self.buckets[m])
            hint = (
                ""
                if self.padded(m)
                else "; its rows are as long as their batch: declare pad=mosel.Padding(...) so that "
                "rows are regrouped by their own size, or batch rows of similar sizes together"
            )
            lines.append(
                f"modality {m!r}: declared buckets {missing} held no validation row (reached: "
                f"{sorted(self.buckets[m])}, longest row {self.longest[m]}){hint}"
                + (
                    f"; jobs beyond {largest} are priced by linear extrapolation until the online "
                    f"correction learns their bucket"
                    if any(e > largest for e in missing)
                    else ""
                )
            )
        if not lines:
            return None
        return (
            f"profiling {model_class}: {'; '.join(lines)}. A job in an unmeasured bucket is priced at "
            f"the measured bucket above it; add validation rows of those sizes to measure them"
        )


def padding_changes(model: nn.Module, spec: ModelSpec, batch: Mapping[str, Tree]) -> list[str]:
    """For each padded modality whose padding changes the model's output on ``batch``, why.

    Pads the modality's input by an eighth (at least one position) and compares the output of
    every modality together with the unpadded one's.

    Raises:
        SpecError: the size function does not read the padded axis (it must return its extent).
    """
    if not any(sizing.padding is not None for sizing in spec.sizings.values()):
        return []
    fuse = getattr(model, spec.fusion)
    features = {m: getattr(model, spec.branches[m])(batch[m]) for m in spec.modalities}
    base = trees.leaves(fuse(features))
    changes = []
    for m, sizing in spec.sizings.items():
        padding = sizing.padding
        if padding is None:
            continue
        width = sizing.read(m, batch[m])
        longer = width + max(1, width // 8)
        padded = padding.fit(batch[m], width, longer)
        if sizing.read(m, padded) != longer:
            raise SpecError(
                f"modality {m!r}: its input padded from {width} to {longer} along dim={padding.dim} "
                f"has size {sizing.read(m, padded)}; with pad=, size= must return that axis's extent "
                f"(e.g. lambda x: x['input_ids'].shape[1] for dim=1)"
            )
        out = trees.leaves(fuse(features | {m: getattr(model, spec.branches[m])(padded)}))
        why = _difference(base, out)
        if why is not None:
            changes.append(
                f"padding modality {m!r} from {width} to {longer} changes the output ({why}): its branch "
                f"does not ignore padded positions (mask={padding.mask!r}), so served rows differ "
                f"from the same rows run alone; fix the model's masking or the Padding, or drop pad="
            )
    return changes


def _difference(base: list[Tensor], out: list[Tensor]) -> str | None:
    if len(base) != len(out) or any(a.shape != b.shape for a, b in zip(base, out, strict=True)):
        shapes = [tuple(t.shape) for t in base], [tuple(t.shape) for t in out]
        return f"output shapes {shapes[0]} became {shapes[1]}"
    for a, b in zip(base, out, strict=True):
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return "its values differ"
            continue
        scale = float(a.detach().abs().max()) if a.numel() else 0.0
        gap = float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0
        low = a.dtype in (torch.float16, torch.bfloat16)
        if gap > (10 if low else 1) * PADDING_TOLERANCE * max(scale, 1.0):
            return f"by up to {gap:.3g}, against values up to {scale:.3g}"
    return None


def new_widths(
    model: nn.Module,
    spec: ModelSpec,
    rows: SizedRows,
    sizes: list[int],
    once: Callable[[Callable[[], object]], float],
) -> dict[str, NewWidths]:
    """Per unpadded sized modality: what a job at a width never run costs over a repeated width.

    Each of its buckets' :meth:`SizedRows.fresh` inputs runs once at a width the branch never
    ran, as a serving job does (the batch sizes taken in turn from the smallest, middle and
    largest timed: a width's first call builds kernels that its calls at other batch sizes
    partly reuse), then twice more in shuffled rounds over them all, as the profiler's rounds
    do (the faster kept: a shape timed right after itself is flattered). The ratios' median at
    each of those batch sizes, interpolated linearly between them, is :attr:`NewWidths.ratio`.
    Modalities without such inputs (one width per bucket) are left out.
    """
    picks = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    calls: list[tuple[str, int, Callable[[], object]]] = []
    for m in rows.buckets:
        if rows.padded(m):
            continue
        branch, dim = getattr(model, spec.branches[m]), spec.batch_dim(m)
        fresh = [x for edge in rows.buckets[m] for x in rows.fresh(m, edge)]
        for i, x in enumerate(fresh):
            b = picks[i % len(picks)]
            calls.append((m, b, functools.partial(branch, trees.take(x, slice(0, b), dim))))
    first = [once(call) for _, _, call in calls]
    again = [math.inf] * len(calls)
    order, shuffle = list(range(len(calls))), random.Random(0).shuffle
    for _ in range(2):
        shuffle(order)
        for i in order:
            again[i] = min(again[i], once(calls[i][2]))
    ratios: dict[str, dict[int, list[float]]] = {}
    for (m, b, _), new, seen in zip(calls, first, again, strict=True):
        if seen > 0:
            ratios.setdefault(m, {}).setdefault(b, []).append(max(1.0, new / seen))
    return {
        m: NewWidths(
            _interpolated({b: statistics.median(r) for b, r in by_size.items()}, rows.most),
            sum(map(len, by_size.values())),
        )
        for m, by_size in ratios.items()
    }


def _interpolated(points: Mapping[int, float], most: int) -> tuple[float, ...]:
    """Values at ``1..most`` from ``points`` (batch size -> value): linear between, flat beyond."""
    sizes = sorted(points)
    out = []
    for b in range(1, most + 1):
        lo = max((s for s in sizes if s <= b), default=sizes[0])
        hi = min((s for s in sizes if s >= b), default=sizes[-1])
        out.append(points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (b - lo) / (hi - lo))
    return tuple(out)
