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

__all__ = ["Chained", "class_logits", "confidence_of", "default_signals", "escalate"]

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


def _checked(output: Tree, rows: int, what: str, dim: int = 0) -> Tree:
    try:
        got = trees.check(output, dim)
    except trees.TreeError as exc:
        raise OutputError(
            f"{what} returned {type(output).__name__} that mosel cannot split into rows: {exc}"
        ) from None
    if got != rows:
        raise OutputError(
            f"{what} returned {got} row(s) for {rows} request(s); it must return one row per request"
        )
    return output


class _Store:
    """Every branch's features computed so far in the batch, and where each row's are."""

    def __init__(self, spec: ModelSpec, features: Mapping[str, Tree], where: Mapping[str, IntArray]) -> None:
        self.spec = spec
        self.features = dict(features)
        self.where = dict(where)
        self.size = {m: int(w.max()) + 1 if len(w) else 0 for m, w in where.items()}

    def add(self, m: str, rows: IntArray, features: Tree, n: int) -> None:
        """The features of ``m`` for ``rows`` (batch row indices), computed now."""
        dim = self.spec.batch_dim(m)
        old = self.features.get(m)
        start = self.size.get(m, 0)
        self.features[m] = features if old is None else trees.concat([old, features], dim)
        where = self.where.get(m)
        if where is None:
            where = self.where[m] = np.full(n, -1, dtype=np.int64)
        where[rows] = np.arange(start, start + len(rows))
        self.size[m] = start + len(rows)

    def take(self, m: str, rows: IntArray) -> Tree:
        """The saved features of ``m`` for ``rows``."""
        return trees.take(self.features[m], torch.from_numpy(self.where[m][rows]), self.spec.batch_dim(m))


def positions(selection: slice | Tensor | None, n: int) -> IntArray:
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
    where: Mapping[str, IntArray],
    signal: str,
    budget: StageBudget | None,
    clock: Callable[[], float] | None,
    parts_us: dict[str, float] | None = None,
) -> Chained:
    """Run the later stages of the batch's chains; rows in the batch's order throughout.

    Args:
        model: the model.
        spec: its spec.
        inputs: the batch's inputs (every row).
        output: the first stage's output (every row).
        first: each row's first configuration.
        chains: each row's chain (None: a static row).
        features: the first stage's features per modality.
        where: per modality, the feature row of each batch row (-1: not computed).
        signal: the calibration's confidence signal.
        budget: how later stages are priced and when the batch must end (None: every row below
            its threshold escalates).
        clock: the scheduler's clock (for ``budget``).
        parts_us: with it, the later stages' branch and fusion times are added to it, and their
            own overhead as :data:`mosel.chains.ESCALATION`.
    """
    started = time.perf_counter()
    run = _Run(model, spec, inputs, output, first, chains, _Store(spec, features, where), signal)
    run.read(output, run.chained, run.chained)
    first_bins: dict[Configuration, list[int]] = {}
    for chain, rows in run.groups:
        counts = np.bincount(chain.bins(0, run.confidence[rows]), minlength=len(chain.edges[0]) + 1)
        totals = first_bins.setdefault(chain.first, [0] * len(counts))
        for i, k in enumerate(counts.tolist()):
            totals[i] += k
    active = run.chained
    for t in range(2):
        active = run.decide(t, active, budget, clock)
        if not len(active):
            break
        run.step(t, active, parts_us)
    final = output
    if len(run.pieces) > 1:
        final = trees.take(trees.concat(run.pieces), torch.from_numpy(run.source))
    if parts_us is not None:
        overhead = (time.perf_counter() - started) * 1e6 - run.model_us
        parts_us[ESCALATION] = parts_us.get(ESCALATION, 0.0) + max(overhead, 0.0)
    record = Escalated(tuple(run.stages), {c: tuple(b) for c, b in first_bins.items()}, tuple(run.decisions))
    return Chained(final, tuple(run.config), tuple(run.escalated.tolist()), record)


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
        self.model, self.spec, self.inputs, self.chains, self.store = model, spec, inputs, chains, store
        self.signal = signal
        self.n = n = len(chains)
        self.config = list(first)
        self.confidence = np.full(n, np.nan)
        self.pieces = [output]
        self.source = np.arange(n, dtype=np.int64)  # each row's output: its index in the pieces, concatenated
        self.offset = n
        self.escalated = np.zeros(n, dtype=bool)
        self.model_us = 0.0
        self.stages: list[dict[Transition, int]] = []
        self.decisions: list[tuple[int, int, int, float]] = []
        by_chain: dict[int, tuple[Chain, list[int]]] = {}
        for r, chain in enumerate(chains):
            if chain is not None:
                by_chain.setdefault(id(chain), (chain, []))[1].append(r)
        self.groups = [(chain, np.asarray(rows, dtype=np.int64)) for chain, rows in by_chain.values()]
        self.chained = np.flatnonzero([c is not None for c in chains]).astype(np.int64)

    def read(self, out: Tree, rows: IntArray, of: IntArray) -> None:
        """The confidence of the batch rows ``rows`` from their ``out`` rows ``of`` (all when equal to n)."""
        if len(of) == trees.check(out, 0) and np.array_equal(of, np.arange(len(of))):
            picked = out
        else:
            picked = trees.take(out, torch.from_numpy(of))
        self.confidence[rows] = confidence_of(self.model, self.spec, self.signal, picked, len(rows)).numpy()

    def decide(
        self, t: int, active: IntArray, budget: StageBudget | None, clock: Callable[[], float] | None
    ) -> IntArray:
        """The rows that escalate at transition ``t``: below their threshold, and within the time."""
        transitions: list[Transition] = []
        below, which, gains = [], [], []
        considered, expected = 0, 0.0
        in_play = np.zeros(self.n, dtype=bool)
        in_play[active] = True
        for chain, rows in self.groups:
            if len(chain.stages) <= t + 1:
                continue
            mine = rows[in_play[rows]]
            if not len(mine):
                continue
            considered += len(mine)
            before = chain.shares[t - 1] if t > 0 else 1.0
            expected += len(mine) * (chain.shares[t] / before if before > 0 else 0.0)
            levels = chain.bins(t, self.confidence[mine])
            low = levels < chain.cuts[t]
            if low.any():
                transitions.append((chain.stages[t], chain.stages[t + 1]))
                below.append(mine[low])
                which.append(np.full(int(low.sum()), len(transitions) - 1, dtype=np.int64))
                gains.append(np.asarray(chain.gains[t])[levels[low]])
        if not considered:
            return np.zeros(0, dtype=np.int64)
        if not below:
            self.decisions.append((considered, 0, 0, expected))
            return np.zeros(0, dtype=np.int64)
        candidates = np.concatenate(below)
        chosen = candidates
        if budget is not None and clock is not None:
            # several chains may share a transition: count it once
            unique = list(dict.fromkeys(transitions))
            index = np.asarray([unique.index(step) for step in transitions], dtype=np.int64)
            mask = select_rows(
                unique, index[np.concatenate(which)], np.concatenate(gains), budget.budget_us(clock()),
                budget.price_us,
            )  # fmt: skip
            chosen = candidates[mask]
        self.decisions.append((considered, len(candidates), len(chosen), expected))
        return np.sort(chosen)

    def step(self, t: int, chosen: IntArray, parts_us: dict[str, float] | None) -> None:
        """Run transition ``t`` for the ``chosen`` rows and take their new outputs."""
        stage: dict[Transition, int] = {}
        targets: dict[Configuration, list[int]] = {}
        for r in chosen.tolist():
            chain = self.chains[r]
            assert chain is not None
            step = (chain.stages[t], chain.stages[t + 1])
            stage[step] = stage.get(step, 0) + 1
            targets.setdefault(chain.stages[t + 1], []).append(r)
        self.stages.append(stage)
        spent, outputs = _stage(
            self.model, self.spec, self.inputs, self.store, self.config, targets, self.n, parts_us
        )
        self.model_us += spent
        for target, rows, out in outputs:
            self.pieces.append(out)
            self.source[rows] = np.arange(self.offset, self.offset + len(rows))
            self.offset += len(rows)
            self.escalated[rows] = True
            for r in rows.tolist():
                self.config[r] = target
            going = np.asarray(
                [i for i, r in enumerate(rows.tolist()) if len(self.chains[r].stages) > t + 2],
                dtype=np.int64,
            )
            if len(going):
                self.read(out, rows[going], going)


def _stage(
    model: nn.Module,
    spec: ModelSpec,
    inputs: Mapping[str, Tree],
    store: _Store,
    config: list[Configuration],
    targets: Mapping[Configuration, list[int]],
    n: int,
    parts_us: dict[str, float] | None,
) -> tuple[float, list[tuple[Configuration, IntArray, Tree]]]:
    """One later stage: each new branch once over the rows that need it, then fusion per target.

    Returns the time spent in the model's code (µs) and, per target configuration, its rows
    and their new outputs.
    """
    clock = time.perf_counter
    spent = 0.0
    for m in spec.modalities:
        need = [r for target, rows in targets.items() if m in target for r in rows if m not in config[r]]
        if not need:
            continue
        rows = np.asarray(sorted(need), dtype=np.int64)
        dim = spec.batch_dim(m)
        x = trees.take(inputs[m], torch.from_numpy(rows), dim)
        name = spec.branches[m]
        t0 = clock()
        features = _checked(getattr(model, name)(x), len(rows), f"branch {name!r} ({m!r})", dim)
        took = (clock() - t0) * 1e6
        spent += took
        if parts_us is not None:
            parts_us[m] = parts_us.get(m, 0.0) + took
        store.add(m, rows, features, n)
    fuse = getattr(model, spec.fusion)
    outputs = []
    for target, members in targets.items():
        rows = np.asarray(members, dtype=np.int64)
        features = {m: store.take(m, rows) for m in spec.modalities if m in target}
        t0 = clock()
        out = _checked(fuse(features), len(members), f"fusion {spec.fusion!r}")
        took = (clock() - t0) * 1e6
        spent += took
        if parts_us is not None:
            parts_us["fusion"] = parts_us.get("fusion", 0.0) + took
        outputs.append((target, rows, out))
    return spent, outputs
