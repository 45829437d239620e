"""A batch's later stages on its saved features: each row exact, and no copy that is not needed."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch

import mosel
from mosel import trees
from mosel.chains import StageBudget
from mosel.escalation import Calibration, Chain
from mosel.execution import Later, run_chained
from mosel.plan import Strategy
from mosel.stages import confidence_of
from tests.unit.votes import Votes, votes_data, votes_profile

Configuration = frozenset[str]
A, IMAGE, V = frozenset({"audio"}), frozenset({"image"}), frozenset({"video"})
AI, AV, ALL = A | IMAGE, A | V, A | IMAGE | V


@pytest.fixture(scope="module")
def model() -> Votes:
    return Votes().eval()


@pytest.fixture(scope="module")
def calibration(model: Votes) -> Calibration:
    calibration = votes_profile(model).calibration
    assert calibration is not None
    return calibration


def _chain(calibration: Calibration, stages: Sequence[Configuration]) -> Chain:
    """A chain whose every transition cuts at its middle confidence bin."""
    transitions = list(itertools.pairwise(stages))
    return Chain(
        tuple(stages),
        tuple(calibration.bins(lower) // 2 for lower, _ in transitions),
        tuple(calibration.edges[lower] for lower, _ in transitions),
        tuple(calibration.gains(lower, upper) for lower, upper in transitions),
        (0.5,) * len(transitions),
        calibration.accuracy(stages[-1]),
        calibration.rows,
    )


def _alone(
    model: Votes, inputs: dict[str, torch.Tensor], row: int, configuration: Configuration
) -> torch.Tensor:
    return mosel.run_configuration(model, {m: x[row : row + 1] for m, x in inputs.items()}, configuration)


def _by_hand(
    model: Votes, inputs: dict[str, torch.Tensor], row: int, chain: Chain, signal: str
) -> tuple[Configuration, bool]:
    """Where a row's chain ends when each of its stages runs on the row alone."""
    spec = mosel.spec_of(model)
    for t in range(len(chain.stages) - 1):
        output = _alone(model, inputs, row, chain.stages[t])
        confidence = confidence_of(model, spec, signal, output, 1).numpy()
        if chain.bins(t, confidence)[0] >= chain.cuts[t]:
            return chain.stages[t], t > 0
    return chain.stages[-1], True


def test_rows_of_several_chains_in_one_batch_end_where_each_row_alone_would(
    model: Votes, calibration: Calibration
) -> None:
    # four first configurations (the first stage gathers rows for some branches), chains of two
    # and three stages sharing a target, and static rows, in one batch
    first = _chain(calibration, (A, AI, ALL))
    second = _chain(calibration, (AI, ALL))
    third = _chain(calibration, (V, AV, ALL))
    groups = ((A, 6), (AI, 5), (V, 6), (ALL, 3))
    chains = [first] * 6 + [second] * 5 + [third] * 6 + [None] * 3
    inputs, _ = votes_data(20, seed=5)
    with torch.inference_mode():
        done = run_chained(
            model, mosel.spec_of(model), Strategy(groups, 0, 0), chains, inputs, Later(calibration.signal)
        )
    expected = [(ALL, False)] * 20
    for row, chain in enumerate(chains):
        if chain is not None:
            expected[row] = _by_hand(model, inputs, row, chain, calibration.signal)
    assert list(zip(done.modalities, done.escalated)) == expected
    ends = [c for c, escalated in expected if escalated]
    assert AI in ends and AV in ends and ALL in ends  # rows stop after each transition, and go on
    assert any(not escalated for c, escalated in expected[:17])
    for row, configuration in enumerate(done.modalities):
        assert torch.equal(done.output[row : row + 1], _alone(model, inputs, row, configuration)), row
    assert sum(sum(stage.values()) for stage in done.record.stages) == sum(
        1 + (c == ALL and chains[r] is not second) for r, (c, escalated) in enumerate(expected) if escalated
    )


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    take, concat = trees.take, trees.concat

    def counted_take(*args: object, **kwargs: object) -> object:
        calls.append("take")
        return take(*args, **kwargs)  # type: ignore[arg-type]

    def counted_concat(*args: object, **kwargs: object) -> object:
        calls.append("concat")
        return concat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trees, "take", counted_take)
    monkeypatch.setattr(trees, "concat", counted_concat)
    return calls


@pytest.mark.parametrize("every", [True, False])
def test_a_later_stage_copies_only_rows_that_are_not_what_was_computed(
    model: Votes, calibration: Calibration, monkeypatch: pytest.MonkeyPatch, every: bool
) -> None:
    chain = _chain(calibration, (A, ALL))
    if every:
        chain = Chain(
            (A, ALL), (calibration.bins(A),), chain.edges, chain.gains, (1.0,), chain.accuracy, chain.rows
        )
    inputs, _ = votes_data(8, seed=9)
    spec = mosel.spec_of(model)
    budget = StageBudget(votes_profile(model).cost_model(), {}, 1.0, 20.0, finish_by=1e9, reserve_us=0.0)
    calls = _counting(monkeypatch)
    with torch.inference_mode():
        done = run_chained(
            model,
            spec,
            Strategy(((A, 8),), 0, 0),
            [chain] * 8,
            inputs,
            Later(calibration.signal, budget, lambda: 0.0),
        )
    monkeypatch.undo()
    escalated = sum(done.escalated)
    if every:
        # every row goes on: the inputs, the saved audio features and the new outputs are used as they are
        assert escalated == 8 and calls == []
    else:
        # some rows go on: their image and video inputs and their audio features are gathered, once each
        assert 0 < escalated < 8 and calls == ["take"] * 3
    for row, configuration in enumerate(done.modalities):
        assert torch.equal(done.output[row : row + 1], _alone(model, inputs, row, configuration))
