"""Escalation in simulation: which rows of a batch's chains go on, and what that costs, on a virtual clock.

The simulator's executor has no tensors; a row is an index into a :class:`~mosel.escalation.RowSample`
(held-out rows' confidences and scores per configuration), drawn per job, or with no sample, a
coin per row at the calibrated share. Rows below their threshold go on as the executor would
send them (:func:`mosel.chains.select_rows` against the batch's remaining time), and every later
stage takes what :func:`mosel.chains.later_parts` prices at the rows that went on, times the
batch's residual. Each row's final configuration, and its score in the sample, give a job's
measured accuracy.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from mosel.chains import Escalated, Transition, later_parts, select_rows
from mosel.escalation import Chain, RowSample
from mosel.jobs import Batch, Job
from mosel.plan import CostModel

__all__ = ["Replay"]

Configuration = frozenset[str]


class Replay:
    """Per job, its rows (sample indices), each row's final configuration and whether it escalated."""

    def __init__(
        self, sample: RowSample | None, rng: random.Random, stage_overhead_us: Callable[[int], float]
    ) -> None:
        self.sample = sample
        self.rng = rng
        self.overhead_us = stage_overhead_us  # of one later stage, per batch size
        self.rows: dict[int, list[int]] = {}
        self.final: dict[int, list[Configuration]] = {}
        self.escalated: dict[int, list[bool]] = {}

    def admitted(self, job: Job[Any]) -> None:
        """Draw the job's rows from the sample."""
        if self.sample is not None:
            total = self.sample.rows
            self.rows[job.id] = [self.rng.randrange(total) for _ in range(job.n)]

    def accuracy(self, job: Job[Any]) -> float:
        """The job's measured accuracy: its rows' scores at their final configurations (NaN: no sample)."""
        sample, rows, final = self.sample, self.rows.get(job.id), self.final.get(job.id)
        if sample is None or rows is None or final is None:
            return math.nan
        return float(np.mean([sample.score[c][r] for c, r in zip(final, rows)]))

    def outcome(self, job: Job[Any]) -> tuple[tuple[Configuration, ...], tuple[bool, ...]]:
        """Each row's final configuration and whether it escalated (empty before it ran)."""
        return tuple(self.final.get(job.id, ())), tuple(self.escalated.get(job.id, ()))

    def run(
        self, batch: Batch, cost: CostModel, now: float, first_us: float, ratio: float
    ) -> tuple[float, Escalated | None]:
        """The batch's later stages after a first stage of ``first_us``; returns their time and record."""
        rows: list[tuple[Job[Any], int, Chain | None]] = []
        for task, strategy in zip(batch.tasks, batch.strategies):
            job = task.job
            final = self.final.setdefault(job.id, [job.available] * job.n)
            self.escalated.setdefault(job.id, [False] * job.n)
            at = task.offset
            for config, count in strategy.groups:
                for i in range(count):
                    final[at + i] = config
                    rows.append((job, at + i, strategy.chain))
                at += count
        later = batch.later
        if later is None or not any(chain is not None for _, _, chain in rows):
            return 0.0, None
        elapsed = first_us
        overhead_us = self.overhead_us(batch.merged.n)
        first_bins: dict[Configuration, list[int]] = {}
        stages: list[dict[Transition, int]] = []
        decisions: list[tuple[int, int, int, float]] = []
        active = [k for k, (_, _, chain) in enumerate(rows) if chain is not None]
        for t in range(2):
            considered, expected, candidates, transitions, which, gains = self._candidates(
                rows, active, t, first_bins
            )
            if not considered:
                break
            chosen = candidates
            if candidates:
                mask = select_rows(
                    transitions, np.asarray(which, dtype=np.int64), np.asarray(gains, dtype=np.float64),
                    later.budget_us(now + elapsed / 1e6), later.price_us,
                )  # fmt: skip
                chosen = [k for k, keep in zip(candidates, mask.tolist()) if keep]
            decisions.append((considered, len(candidates), len(chosen), expected))
            if not chosen:
                break
            stage: dict[Transition, int] = {}
            for k in chosen:
                job, i, chain = rows[k]
                assert chain is not None
                step = (chain.stages[t], chain.stages[t + 1])
                stage[step] = stage.get(step, 0) + 1
                self.final[job.id][i] = chain.stages[t + 1]
                self.escalated[job.id][i] = True
            stages.append(stage)
            elapsed += sum(later_parts(cost, [stage], overhead_us).values()) * ratio
            active = chosen
        record = Escalated(tuple(stages), {c: tuple(b) for c, b in first_bins.items()}, tuple(decisions))
        return elapsed - first_us, record

    def _candidates(
        self,
        rows: list[tuple[Job[Any], int, Chain | None]],
        active: list[int],
        t: int,
        first_bins: dict[Configuration, list[int]],
    ) -> tuple[int, float, list[int], list[Transition], list[int], list[float]]:
        """At transition ``t``: rows considered, rows expected below, and the rows below their threshold."""
        candidates: list[int] = []
        which: list[int] = []
        gains: list[float] = []
        transitions: list[Transition] = []
        considered, expected = 0, 0.0
        for k in active:
            job, i, chain = rows[k]
            assert chain is not None
            if len(chain.stages) <= t + 1:
                continue
            considered += 1
            before = chain.shares[t - 1] if t > 0 else 1.0
            odds = chain.shares[t] / before if before > 0 else 0.0
            expected += odds
            below, gain = self._below(job, i, chain, t, odds, first_bins)
            if below:
                step = (chain.stages[t], chain.stages[t + 1])
                if step not in transitions:
                    transitions.append(step)
                candidates.append(k)
                which.append(transitions.index(step))
                gains.append(gain)
        return considered, expected, candidates, transitions, which, gains

    def _below(
        self,
        job: Job[Any],
        i: int,
        chain: Chain,
        t: int,
        odds: float,
        first_bins: dict[Configuration, list[int]],
    ) -> tuple[bool, float]:
        """Is row ``i`` of ``job`` below its threshold at transition ``t``, and its expected gain?"""
        rows = self.rows.get(job.id)
        if self.sample is None or rows is None:
            return self.rng.random() < odds, 1.0
        confidence = float(self.sample.confidence[chain.stages[t]][rows[i]])
        level = bisect.bisect_right(chain.edges[t], confidence)
        if t == 0:
            counts = first_bins.setdefault(chain.first, [0] * (len(chain.edges[0]) + 1))
            counts[level] += 1
        return level < chain.cuts[t], chain.gains[t][level]
