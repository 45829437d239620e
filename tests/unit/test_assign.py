from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mosel.assign import Item, cpsat_assign, exhaustive_assign, greedy_assign, total_accuracy, violations


@st.composite
def items(draw: st.DrawFn) -> tuple[list[Item], int]:
    count = draw(st.integers(1, 5))
    queue = []
    deadline = 0
    for _ in range(count):
        options = draw(st.integers(1, 4))
        lat = list(
            itertools.accumulate(draw(st.lists(st.integers(1, 300), min_size=options, max_size=options)))
        )
        acc = list(
            itertools.accumulate(draw(st.lists(st.integers(0, 50_000), min_size=options, max_size=options)))
        )
        deadline += draw(st.integers(0, 400))
        queue.append(Item(tuple(lat), tuple(acc), deadline))
    return queue, draw(st.integers(0, 50))


@settings(max_examples=150, deadline=None)
@given(case=items())
def test_cpsat_matches_exhaustive(case: tuple[list[Item], int]) -> None:
    queue, start = case
    best = exhaustive_assign(queue, start)
    got, proven = cpsat_assign(queue, start, time_limit_s=5.0, deterministic=True)
    if best is None:
        assert got is None
        return
    assert got is not None and proven
    assert not violations(queue, got, start)
    assert total_accuracy(queue, got) == total_accuracy(queue, best)


@settings(max_examples=150, deadline=None)
@given(case=items())
def test_greedy_is_feasible_without_its_doomed_jobs(case: tuple[list[Item], int]) -> None:
    queue, start = case
    top = [len(item.latency_us) - 1 for item in queue]
    ks, doomed = greedy_assign(queue, top, start)
    kept = [i for i in range(len(queue)) if i not in doomed]
    assert not violations([queue[i] for i in kept], [ks[i] for i in kept], start)
    assert all(0 <= k < len(item.latency_us) for item, k in zip(queue, ks))
    # The exact optimum with every job kept exists only if greedy dooms nothing... or greedy was unlucky.
    if exhaustive_assign(queue, start) is None:
        assert doomed
