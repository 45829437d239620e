"""Running the later stages of escalation chains on a batch's saved features, and confidence signals.

After a batch's first stage (every row at its first configuration, each branch once over the rows
that need it), the rows that run a chain have their confidence read from their output; those
below their threshold (as many as the batch's remaining time allows, the highest expected gain
per microsecond first: :func:`mosel.chains.select_rows`) go on. Each branch a transition adds
runs once over all the rows that need it (rows of several jobs and chains together), fusion runs
once per target configuration on the saved features and the new ones, and the new outputs replace
those rows' outputs. A row's output is what its final configuration gives it run alone
(``mosel.run_configuration``): the same branches and fusion, on the same row.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from mosel import trees
from mosel.chains import ESCALATION, Escalated, StageBudget, Transition, select_rows
from mosel.errors import OutputError
from mosel.escalation import SIGNALS, Chain
from mosel.spec import ModelSpec
from mosel.trees import Tree

__all__ = ["Chained", "checked", "class_logits", "confidence_of", "default_signals", "escalate"]

Configuration = frozenset[str]
IntArray = npt.NDArray[np.int64]


def class_logits(output: object) -> bool:
    """Does ``output`` look like single-label class logits: a floating (batch, classes >= 2) tensor?"""
    return (
        isinstance(output, Tensor)
        and output.dim() == 2
        and output.shape[1] >= 2
        and output.is_floating_point()
    )


def default_signals(output: Tensor, only: str | None = None) -> dict[str, Tensor]:
    """The default signals of class logits per row (float64, on the CPU); ``only``: just that one.

    The one computation for profiling and serving alike (a row's confidence must land in the bin
    it was calibrated in).
    """
    probabilities = torch.softmax(output.detach().float(), dim=-1)
    if only == "max_probability":
        return {only: probabilities.amax(dim=-1).cpu().double()}
    top = probabilities.topk(2, dim=-1).values.cpu().double()
    margin = top[:, 0] - top[:, 1]
    return {"margin": margin} if only == "margin" else {"max_probability": top[:, 0], "margin": margin}


def confidence_of(model: nn.Module, spec: ModelSpec, signal: str, output: Tree, rows: int) -> Tensor:
    """Each row's confidence in ``output`` under ``signal`` (float64, on the CPU).

    Raises:
        OutputError: the model's ``@mosel.confidence`` did not return one finite number per row,
            or the default signal met an output that is not class logits.
    """
    if signal in SIGNALS:
        if not class_logits(output):
            raise OutputError(
                f"the {signal} confidence needs class logits (a floating (batch, classes) tensor); the "
                f"fusion returned {type(output).__name__}: declare @mosel.confidence"
            )
        assert isinstance(output, Tensor)
        return default_signals(output, signal)[signal]
    name = spec.confidence
    if name is None:
        raise OutputError(
            f"the profile's confidence signal is {signal!r}, but the model declares no @mosel.confidence"
        )
    value = getattr(model, name)(output)
    if not isinstance(value, Tensor) or tuple(value.shape) != (rows,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise OutputError(f"@mosel.confidence {name!r} must return a tensor of shape ({rows},), got {shape}")
    value = value.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise OutputError(f"@mosel.confidence {name!r} returned a number that is not finite")
    return value


@dataclass(frozen=True, slots=True)
class Chained:
    """A batch's outputs after its later stages, per row: its final configuration, whether it escalated."""

    output: Tree
    modalities: tuple[Configuration, ...]
    escalated: tuple[bool, ...]
    record: Escalated


def checked(output: Tree, rows: int, what: str, dim: int = 0) -> Tree:
    """``output`` if it is a batched tree of exactly ``rows`` rows along ``dim``, or :class:`OutputError`."""
    if isinstance(output, Tensor) and output.dim() > dim and output.shape[dim] == rows:
        return output
    try:
        got = trees.check(output, dim)
    except trees.TreeError as exc:
        raise OutputError(
            f"{what} returned {type(output).__name__} that mosel cannot split into {rows} row(s): {exc}; "
            f"return a tensor (or a dict/tuple/list of tensors) with one row per request"
        ) from None
    if got != rows:
        raise OutputError(
            f"{what} returned {got} row(s) for {rows} request(s); it must return exactly one row per "
            f"request, in order (a reduction or a slice such as out[1:] drops rows)"
        )
    return output


Selection = slice | Tensor | None


def _confidences(model: nn.Module, spec: ModelSpec, signal: str, output: Tree, rows: int) -> list[float]:
    """:func:`confidence_of` as Python floats (the same values: float32 to float64 is exact)."""
    if signal == "max_probability" and class_logits(output):
        assert isinstance(output, Tensor)
        logits = (
            output if output.dtype == torch.float32 and not output.requires_grad else output.detach().float()
        )
        values: list[float] = torch.softmax(logits, dim=-1).amax(dim=-1).tolist()
        return values
    exact: list[float] = confidence_of(model, spec, signal, output, rows).tolist()
    return exact


class _Store:
    """Every branch's features computed so far in the batch: the first stage's, and later pieces.

    The first stage's features of a modality hold the rows of the plan's selection (None: every
    row); each later piece holds the rows (ascending) one later stage computed. Rows that are
    exactly those of what was computed (a target fused right after its branches ran for the
    same rows, or every row of the batch) take it as it is; other rows are gathered.
    """

    def __init__(
        self, spec: ModelSpec, features: Mapping[str, Tree], selections: Mapping[str, Selection], n: int
    ) -> None:
        self.spec, self.n, self.features, self.selections = spec, n, features, selections
        self.added: dict[str, list[tuple[list[int], Tree]]] = {}
        self.indices: dict[int, tuple[list[int], Tensor]] = {}

    def index(self, rows: list[int]) -> Tensor:
        """``rows`` as an index tensor, made once per list of rows."""
        known = self.indices.get(id(rows))
        if known is not None and known[0] is rows:
            return known[1]
        index = _index(rows)
        self.indices[id(rows)] = (rows, index)
        return index

    def add(self, m: str, rows: list[int], features: Tree) -> None:
        """The features of ``m`` for ``rows`` (batch rows, ascending), computed now."""
        self.added.setdefault(m, []).append((rows, features))

    def take(self, m: str, rows: list[int]) -> Tree:
        """The saved features of ``m`` for ``rows`` (ascending)."""
        dim = self.spec.batch_dim(m)
        added = self.added.get(m)
        if added is None:  # the first stage's only
            selection = self.selections[m]
            if selection is None:
                if len(rows) == self.n:
                    return self.features[m]  # the first stage ran this branch for every row
                return trees.take(self.features[m], self.index(rows), dim)
            if isinstance(selection, slice):
                return trees.take(self.features[m], _index([r - selection.start for r in rows]), dim)
        else:
            for mine, piece in added:
                if mine is rows or mine == rows:
                    return piece
        pieces: list[Tree] = []
        where: dict[int, int] = {}
        if m in self.features:
            first = positions(self.selections[m], self.n)
            where.update((r, p) for r, p in enumerate(first.tolist()) if p >= 0)
            pieces.append(self.features[m])
        for mine, piece in added or ():
            offset = len(where)  # every row so far has its own position
            where.update((r, offset + i) for i, r in enumerate(mine))
            pieces.append(piece)
        joined = trees.concat(pieces, dim)
        return trees.take(joined, _index([where[r] for r in rows]), dim)


def positions(selection: Selection, n: int) -> IntArray:
    """Per batch row, its row among a branch's features (-1: the branch did not run for it)."""
    if selection is None:
        return np.arange(n, dtype=np.int64)
    where = np.full(n, -1, dtype=np.int64)
    if isinstance(selection, slice):
        where[selection] = np.arange(selection.stop - selection.start)
    else:
        where[selection.cpu().numpy()] = np.arange(len(selection))
    return where


def escalate(
    model: nn.Module,
    spec: ModelSpec,
    inputs: Mapping[str, Tree],
    output: Tree,
    first: Sequence[Configuration],
    chains: Sequence[Chain | None],
    features: Mapping[str, Tree],
    selections: Mapping[str, Selection],
    signal: str,
    budget: StageBudget | None,
    clock: Callable[[], float] | None,
    parts_us: dict[str, float] | None = None,
) -> Chained:
    """Run the later stages of the batch's chains; rows in the batch's order throughout.

    The bookkeeping is in Python lists (a batch has few rows): a later stage's own work is a few
    tensor operations (the confidences, a gather only where rows are not a whole piece).

    Args:
        model: the model.
        spec: its spec.
        inputs: the batch's inputs (every row).
        output: the first stage's output (every row).
        first: each row's first configuration.
        chains: each row's chain (None: a static row).
        features: the first stage's features per modality.
        selections: per modality, the batch rows the first stage ran its branch for (None:
            every row; a slice; or a tensor of row indices).
        signal: the calibration's confidence signal.
        budget: how later stages are priced and when the batch must end (None: every row below
            its threshold escalates).
        clock: the scheduler's clock (for ``budget``).
        parts_us: with it, the later stages' branch and fusion times are added to it, and their
            own overhead as :data:`mosel.chains.ESCALATION`.
    """
    started = time.perf_counter()
    run = _Run(
        model, spec, inputs, output, first, chains, _Store(spec, features, selections, len(chains)), signal
    )
    for t in range(2):
        chosen = run.decide(t, budget, clock)
        if not chosen:
            break
        run.step(t, chosen, parts_us)
    final = run.final()
    if parts_us is not None:
        overhead = (time.perf_counter() - started) * 1e6 - run.model_us
        parts_us[ESCALATION] = parts_us.get(ESCALATION, 0.0) + max(overhead, 0.0)
    record = Escalated(tuple(run.stages), run.first_bins, tuple(run.decisions))
    return Chained(final, tuple(run.config), tuple(run.escalated), record)


class _Run:
    """The state of a batch between its stages: each row's configuration, confidence and output."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        inputs: Mapping[str, Tree],
        output: Tree,
        first: Sequence[Configuration],
        chains: Sequence[Chain | None],
        store: _Store,
        signal: str,
    ) -> None:
        self.model, self.spec, self.inputs, self.store, self.signal = model, spec, inputs, store, signal
        self.n = n = len(chains)
        self.output = output
        self.config = list(first)
        self.escalated = [False] * n
        self.stage_of = [0] * n
        self.pieces: list[tuple[list[int], Tree]] = []  # each later stage's outputs, with their rows
        self.model_us = 0.0
        self.stages: list[dict[Transition, int]] = []
        self.decisions: list[tuple[int, int, int, float]] = []
        head = chains[0] if n else None
        if head is not None and all(c is head for c in chains):
            self.groups = [(head, list(range(n)))]
            confidence = _confidences(model, spec, signal, output, n)
        else:
            by_chain: dict[int, tuple[Chain, list[int]]] = {}
            for r, chain in enumerate(chains):
                if chain is not None:
                    by_chain.setdefault(id(chain), (chain, []))[1].append(r)
            self.groups = list(by_chain.values())
            chained = sorted(r for _, rows in self.groups for r in rows)
            confidence = [math.nan] * n
            if chained:
                picked = output if len(chained) == n else trees.take(output, _index(chained))
                for r, c in zip(chained, _confidences(model, spec, signal, picked, len(chained))):
                    confidence[r] = c
        # each group's rows in play at the next transition, and their confidence bins there
        self.active: list[list[int]] = [rows for _, rows in self.groups]
        self.levels: list[list[int]] = [
            [bisect.bisect_right(chain.edges[0], confidence[r]) for r in rows] for chain, rows in self.groups
        ]
        first_bins: dict[Configuration, list[int]] = {}
        for (chain, _), levels in zip(self.groups, self.levels):
            counts = first_bins.setdefault(chain.first, [0] * (len(chain.edges[0]) + 1))
            for level in levels:
                counts[level] += 1
        self.first_bins = {c: tuple(b) for c, b in first_bins.items()}

    def decide(
        self, t: int, budget: StageBudget | None, clock: Callable[[], float] | None
    ) -> dict[Transition, list[int]]:
        """The rows that escalate at transition ``t``, per transition (ascending).

        Those below their threshold, as many as fit the time left.
        """
        transitions: list[Transition] = []
        below: list[list[int]] = []
        gains: list[float] = []
        considered, expected = 0, 0.0
        for (chain, _), mine, levels in zip(self.groups, self.active, self.levels):
            if len(chain.stages) <= t + 1 or not mine:
                continue
            considered += len(mine)
            before = chain.shares[t - 1] if t > 0 else 1.0
            expected += len(mine) * (chain.shares[t] / before if before > 0 else 0.0)
            cut = chain.cuts[t]
            low = [r for r, level in zip(mine, levels) if level < cut]
            if low:
                transitions.append((chain.stages[t], chain.stages[t + 1]))
                below.append(low)
                if budget is not None:
                    gain = chain.gains[t]
                    gains.extend(gain[level] for level in levels if level < cut)
        if not considered:
            return {}
        if not below:
            self.decisions.append((considered, 0, 0, expected))
            return {}
        candidates = sum(len(rows) for rows in below)
        if budget is not None and clock is not None:
            below = _within(transitions, below, gains, budget, clock)
        chosen: dict[Transition, list[int]] = {}
        for step, rows in zip(transitions, below):
            if rows:
                old = chosen.get(step)
                chosen[step] = rows if old is None else sorted(old + rows)
        self.decisions.append((considered, candidates, sum(len(rows) for rows in chosen.values()), expected))
        return chosen

    def step(self, t: int, chosen: Mapping[Transition, list[int]], parts_us: dict[str, float] | None) -> None:
        """Run transition ``t`` for the ``chosen`` rows and take their new outputs."""
        self.stages.append({step: len(rows) for step, rows in chosen.items()})
        spent, outputs = _stage(self.model, self.spec, self.inputs, self.store, chosen, self.n, parts_us)
        self.model_us += spent
        config, escalated, stage_of = self.config, self.escalated, self.stage_of
        for target, rows, out in outputs:
            self.pieces.append((rows, out))
            for r in rows:
                config[r] = target
                escalated[r] = True
                stage_of[r] = t + 1
        going: list[list[int]] = []
        levels: list[list[int]] = []
        for chain, rows in self.groups:
            if len(chain.stages) <= t + 2:
                mine: list[int] = []
            elif len(self.groups) == 1:  # one chain: one transition
                (mine,) = chosen.values()
            else:
                mine = [r for r in rows if stage_of[r] == t + 1]
            going.append(mine)
            edges = chain.edges[t + 1] if mine else ()
            levels.append([bisect.bisect_right(edges, c) for c in self._after(mine, outputs)])
        self.active, self.levels = going, levels

    def _after(
        self, rows: list[int], outputs: Sequence[tuple[Configuration, list[int], Tree]]
    ) -> list[float]:
        """The confidence of ``rows`` (ascending) in the outputs of the stage that just ran."""
        if not rows:
            return []
        for _, mine, out in outputs:
            if mine is rows or mine == rows:
                return _confidences(self.model, self.spec, self.signal, out, len(rows))
        confidence: dict[int, float] = {}
        wanted = set(rows)
        for _, mine, out in outputs:
            at = [i for i, r in enumerate(mine) if r in wanted]
            if at:
                picked = trees.take(out, _index(at))
                confidence.update(
                    zip(
                        (mine[i] for i in at),
                        _confidences(self.model, self.spec, self.signal, picked, len(at)),
                    )
                )
        return [confidence[r] for r in rows]

    def final(self) -> Tree:
        """Every row's output from its last stage, in the batch's order."""
        if not self.pieces:
            return self.output
        rows, last = self.pieces[-1]
        if len(rows) == self.n:  # the last stage's only target holds every row
            return last
        out = self.output
        if isinstance(out, Tensor) and all(
            isinstance(piece, Tensor) and piece.dtype == out.dtype and piece.shape[1:] == out.shape[1:]
            for _, piece in self.pieces
        ):
            for mine, piece in self.pieces:  # a later stage's rows overwrite an earlier one's
                assert isinstance(piece, Tensor)
                out = out.index_copy(0, self.store.index(mine).to(out.device), piece)
            return out
        source = list(range(self.n))
        offset = self.n
        for mine, _ in self.pieces:
            for i, r in enumerate(mine):
                source[r] = offset + i
            offset += len(mine)
        return trees.take(trees.concat([self.output, *(out for _, out in self.pieces)]), _index(source))


def _index(rows: list[int]) -> Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _within(
    transitions: Sequence[Transition],
    below: list[list[int]],
    gains: list[float],
    budget: StageBudget,
    clock: Callable[[], float],
) -> list[list[int]]:
    """The candidates (per entry of ``transitions``) that fit the stage's time (:func:`select_rows`)."""
    counts: dict[Transition, float] = {}  # several chains may share a transition: count it once
    for step, rows in zip(transitions, below):
        counts[step] = counts.get(step, 0.0) + len(rows)
    left_us = budget.budget_us(clock())
    if budget.price_us(counts) <= left_us:
        return below  # every candidate fits (select_rows' own first answer)
    unique = list(counts)
    index = [unique.index(step) for step, rows in zip(transitions, below) for _ in rows]
    mask = select_rows(
        unique, np.asarray(index, dtype=np.int64), np.asarray(gains, dtype=np.float64), left_us,
        budget.price_us,
    ).tolist()  # fmt: skip
    out, at = [], 0
    for rows in below:
        out.append([r for r, keep in zip(rows, mask[at : at + len(rows)]) if keep])
        at += len(rows)
    return out


def _stage(
    model: nn.Module,
    spec: ModelSpec,
    inputs: Mapping[str, Tree],
    store: _Store,
    chosen: Mapping[Transition, list[int]],
    n: int,
    parts_us: dict[str, float] | None,
) -> tuple[float, list[tuple[Configuration, list[int], Tree]]]:
    """One later stage: each new branch once over the rows that need it, then fusion per target.

    Returns the time spent in the model's code (µs) and, per target configuration, its rows
    (ascending) and their new outputs.
    """
    clock = time.perf_counter
    spent = 0.0
    for m in spec.modalities:
        parts = [rows for (lower, upper), rows in chosen.items() if m in upper and m not in lower]
        if not parts:
            continue
        rows = parts[0] if len(parts) == 1 else sorted(r for part in parts for r in part)
        dim = spec.batch_dim(m)
        x = inputs[m]
        if len(rows) < n or not isinstance(x, Tensor) or x.shape[dim] != n:
            x = trees.take(x, store.index(rows), dim)
        name = spec.branches[m]
        t0 = clock()
        features = checked(getattr(model, name)(x), len(rows), f"branch {name!r} ({m!r})", dim)
        took = (clock() - t0) * 1e6
        spent += took
        if parts_us is not None:
            parts_us[m] = parts_us.get(m, 0.0) + took
        store.add(m, rows, features)
    targets: dict[Configuration, list[int]] = {}
    for (_, upper), rows in chosen.items():
        old = targets.get(upper)
        targets[upper] = rows if old is None else sorted(old + rows)
    fuse = getattr(model, spec.fusion)
    outputs = []
    for target, rows in targets.items():
        features = {m: store.take(m, rows) for m in spec.modalities if m in target}
        t0 = clock()
        out = checked(fuse(features), len(rows), f"fusion {spec.fusion!r}")
        took = (clock() - t0) * 1e6
        spent += took
        if parts_us is not None:
            parts_us["fusion"] = parts_us.get("fusion", 0.0) + took
        outputs.append((target, rows, out))
    return spent, outputs
