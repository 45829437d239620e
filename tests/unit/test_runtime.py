from __future__ import annotations

import math
import pickle
import threading

import pytest
import torch

import mosel
from mosel.plan import accuracy_units

from .helpers import MAX_BATCH, Tiny, tiny_inputs, tiny_profile

ALL = frozenset({"audio", "video", "text"})


@pytest.fixture
def model() -> Tiny:
    m = Tiny().eval()
    mosel.attach(m, tiny_profile(m))
    return m


def expected_rows(model: Tiny, inputs: dict[str, torch.Tensor], result: mosel.Result) -> torch.Tensor:
    """Each row recomputed alone with exactly the modalities the result says it got."""
    rows = []
    for i, config in enumerate(result.modalities):
        feats = {m: getattr(model, f"encode_{m}")(inputs[m][i : i + 1]) for m in config}
        rows.append(model.fuse(feats))
    return torch.cat(rows)


def test_no_slo_computes_every_modality_and_matches_direct_call(model: Tiny) -> None:
    inputs = tiny_inputs(5)
    result = model.infer(inputs)
    assert result.modalities == (ALL,) * 5
    direct = model.fuse({m: getattr(model, f"encode_{m}")(inputs[m]) for m in ALL})
    torch.testing.assert_close(result.output, direct)
    assert result.expected_accuracy == pytest.approx(0.90)
    assert result.predicted_latency_ms > 0 and result.measured_latency_ms > 0
    assert result.completion_ms >= result.measured_latency_ms


def test_deadline_picks_most_accurate_fitting_strategy(model: Tiny) -> None:
    frontier = mosel.profile_of(model).plan.frontier(ALL, 6)
    middle = frontier.strategies[len(frontier.strategies) // 2]
    # Generous slack over the strategy's latency but below the next one's.
    nxt = frontier.strategies[len(frontier.strategies) // 2 + 1]
    deadline_ms = (middle.latency_us + (nxt.latency_us - middle.latency_us) * 0.5) / 1000
    inputs = tiny_inputs(6)
    result = model.infer(inputs, deadline_ms=deadline_ms, best_effort=True)  # a slow CI machine may wait
    # Waiting before the lookup only shrinks the budget; the pick is this one or a cheaper one.
    assert result.strategies[0] in frontier.strategies[: len(frontier.strategies) // 2 + 1]
    assert result.predicted_latency_ms <= deadline_ms
    torch.testing.assert_close(result.output, expected_rows(model, inputs, result))
    counts = {c: result.modalities.count(c) for c in set(result.modalities)}
    assert counts == dict(result.strategies[0].groups)


def test_floor_is_respected_and_rows_keep_input_order(model: Tiny) -> None:
    inputs = tiny_inputs(8)
    loose = model.infer(inputs, deadline_ms=1.0, min_accuracy=0.7, best_effort=True)
    assert loose.expected_accuracy >= 0.7
    torch.testing.assert_close(loose.output, expected_rows(model, inputs, loose))
    assert loose.predicted_latency_ms <= 1.0 or loose.strategies[0] == mosel.profile_of(model).plan.frontier(
        ALL, 8
    ).cheapest_meeting(8 * 700_000)


def test_unreachable_floor_and_unmeetable_deadline(model: Tiny) -> None:
    with pytest.raises(mosel.AccuracyUnreachableError, match="above the best expected accuracy") as info:
        model.infer(tiny_inputs(2), min_accuracy=0.95)
    assert isinstance(info.value, ValueError)
    assert info.value.best_accuracy == pytest.approx(0.90)
    with pytest.raises(mosel.DeadlineError, match="cannot be met") as late:
        model.infer(tiny_inputs(4), deadline_ms=0.01, min_accuracy=0.8)
    assert isinstance(late.value, TimeoutError)
    assert late.value.deadline_ms == 0.01 and late.value.predicted_ms > 0.01
    served = model.infer(tiny_inputs(4), deadline_ms=0.01, min_accuracy=0.8, best_effort=True)
    assert served.expected_accuracy >= 0.8


def test_missing_modality_is_never_computed(model: Tiny) -> None:
    inputs = tiny_inputs(4)
    del inputs["video"]
    model.calls.clear()
    result = model.infer(inputs)
    assert all("video" not in c for c in result.modalities)
    assert not any(name == "video" for name, _ in model.calls)
    result = model.infer({"audio": inputs["audio"], "video": None, "text": inputs["text"]}, deadline_ms=300.0)
    assert all(c <= {"audio", "text"} for c in result.modalities)


def test_each_branch_runs_once_over_its_rows(model: Tiny) -> None:
    frontier = mosel.profile_of(model).plan.frontier(ALL, 8)
    mixed = next(s for s in frontier.strategies if len(s.groups) > 1)
    model.calls.clear()
    result = model.infer(tiny_inputs(8), deadline_ms=mixed.latency_us / 1000 + 0.04, best_effort=True)
    strategy = result.strategies[0]
    branch_calls = [c for c in model.calls if c[0] != "fuse"]
    rows = {m: sum(k for c, k in strategy.groups if m in c) for m in ALL}
    assert sorted(branch_calls) == sorted((m, k) for m, k in rows.items() if k)
    assert sorted(k for name, k in model.calls if name == "fuse") == sorted(k for _, k in strategy.groups)


def test_jobs_larger_than_max_batch_are_split(model: Tiny) -> None:
    n = 2 * MAX_BATCH + 3
    inputs = tiny_inputs(n)
    result = model.infer(inputs, deadline_ms=500.0, min_accuracy=0.7)
    assert result.output.shape[0] == n and len(result.modalities) == n
    assert [s.n for s in result.strategies] == [7, 6, 6]
    assert result.expected_accuracy >= 0.7
    torch.testing.assert_close(result.output, expected_rows(model, inputs, result))


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ([1, 2], "must map modality names"),
        ({"smell": torch.ones(2, 1)}, "unknown modality 'smell'"),
        ({"audio": [1.0, 2.0]}, "must be a torch.Tensor"),
        ({"audio": torch.tensor(1.0)}, "scalar"),
        ({"audio": torch.ones(2, 1), "text": torch.ones(3, 1)}, "disagree"),
        ({}, "none of the modalities"),
        ({"audio": torch.ones(0, 1)}, "zero requests"),
    ],
)
def test_bad_inputs_raise_input_error(model: Tiny, inputs: object, match: str) -> None:
    with pytest.raises(mosel.InputError, match=match):
        model.infer(inputs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("slo", "match"),
    [
        ({"deadline_ms": 0}, "deadline_ms must be"),
        ({"deadline_ms": -3.0}, "deadline_ms must be"),
        ({"deadline_ms": math.nan}, "deadline_ms must be"),
        ({"deadline_ms": math.inf}, "deadline_ms must be"),
        ({"deadline_ms": "10"}, "deadline_ms must be"),
        ({"deadline_ms": True}, "deadline_ms must be"),
        ({"min_accuracy": 1.2}, "min_accuracy must be"),
        ({"min_accuracy": -0.1}, "min_accuracy must be"),
        ({"min_accuracy": math.nan}, "min_accuracy must be"),
    ],
)
def test_bad_slo_values_raise_slo_error(model: Tiny, slo: dict[str, object], match: str) -> None:
    with pytest.raises(mosel.SLOError, match=match) as info:
        model.infer(tiny_inputs(1), **slo)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_unprofiled_model_says_what_to_do() -> None:
    with pytest.raises(mosel.NotProfiledError, match=r"mosel.profile\(model"):
        Tiny().infer(tiny_inputs(1))


def test_concurrent_callers_all_get_their_own_rows(model: Tiny) -> None:
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            inputs = {m: t + 1000 * i for m, t in tiny_inputs(1 + i % MAX_BATCH).items()}
            results[i] = model.infer(inputs, deadline_ms=1000.0).output[:, 0]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, out in results.items():
        torch.testing.assert_close(out, torch.arange(1, 2 + i % MAX_BATCH, dtype=torch.float32) + 1000 * i)


def test_profiled_model_pickles_with_its_profile(model: Tiny) -> None:
    restored = pickle.loads(pickle.dumps(model))
    assert mosel.profile_of(restored) == mosel.profile_of(model)
    torch.testing.assert_close(restored.infer(tiny_inputs(3)).output, model.infer(tiny_inputs(3)).output)


def test_accuracy_units_resolution() -> None:
    assert accuracy_units(0.72) == 720_000
    assert accuracy_units(0.1 + 0.2) == 300_000
