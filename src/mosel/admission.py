"""Admission: a job's tasks (chunks and their admissible options), and the typed refusals.

:class:`Admission` splits a job into tasks of at most ``max_batch_size`` rows (per group of rows
with the same modalities), finds each task's frontier in its size bucket's plan and the first
option that meets the job's floor as asked (on the mean, at a confidence, for every request),
and refuses what can never be served: a floor above what the modalities reach
(:class:`~mosel.errors.AccuracyUnreachableError`), a deadline the job misses even alone at its
cheapest option (:class:`~mosel.errors.DeadlineError`, built by :meth:`Admission.deadline_error`).
"""

from __future__ import annotations

import math
from typing import Any

from mosel.errors import AccuracyUnreachableError, DeadlineError
from mosel.escalation import wilson_lower
from mosel.jobs import Job, Task, chunk_sizes, floor_units
from mosel.memo import Cache
from mosel.plan import ACCURACY_SCALE, Frontier, Strategy, accuracy_units
from mosel.pricing import Pricer
from mosel.profiles import Profile

__all__ = ["Admission"]

Configuration = frozenset[str]


class Admission:
    """Builds the tasks of admitted jobs for one model (with bounded caches of floors)."""

    def __init__(self, profile: Profile, pricer: Pricer) -> None:
        self.profile = profile
        self.pricer = pricer
        self._bounds: Cache[float | None, dict[Configuration, int]] = Cache(64)
        self._admissible: Cache[tuple[object, ...], int] = Cache(4096)

    def tasks(self, job: Job[Any], every_modality: bool, policy: str) -> list[Task]:
        """The job's tasks, each at its first admissible option (``task.k`` is still 0).

        Sets ``job.bucket`` (the reference bucket for a fixed-shape model) and ``job.cost``.
        ``every_modality``: each task's one option computes every available modality.

        Raises:
            AccuracyUnreachableError: the floor is above what a task's modalities reach (as
                asked: on the mean, at a confidence, for every request).
        """
        pricer = self.pricer
        if job.bucket is None or job.bucket == pricer.reference:  # a fixed-shape model: always
            job.bucket, plan, job.cost = pricer.reference, pricer.reference_plan, pricer.cost
        else:
            plan, job.cost = pricer.plan(job.bucket, job.priced)
        sizes: list[tuple[Configuration, int]] = []  # per task: its rows' modalities, its rows
        for available, rows in job.groups:
            chunks = [rows] if rows <= plan.max_batch_size else chunk_sizes(rows, plan.max_batch_size)
            sizes += [(available, size) for size in chunks]
        strict = job.confidence is not None or job.per_request
        offset = 0
        tasks = []
        for index, (available, size) in enumerate(sizes):
            frontier = plan.frontier(available, size)
            floor = floor_units(job.min_accuracy, size)
            first = self.first(frontier, job)
            task = Task(job, index, offset, size, frontier, min(first, len(frontier.strategies) - 1))
            if every_modality:
                task.fixed = pricer.every_modality(available, size, job)
            self._check_reachable(task, first, floor, strict, policy)
            tasks.append(task)
            offset += size
        return tasks

    def first(self, frontier: Frontier, job: Job[Any]) -> int:
        """The frontier index of the cheapest strategy meeting the job's floor as asked (len: none)."""
        if job.confidence is not None or job.per_request:
            return self._first_admissible(frontier, job)
        return frontier.index_meeting(floor_units(job.min_accuracy, frontier.n))

    def _check_reachable(self, task: Task, first: int, floor: int, strict: bool, policy: str) -> None:
        job, frontier, available, size = task.job, task.frontier, task.frontier.available, task.n
        if strict:
            fixed = task.fixed
            meets = self._meets(fixed, job) if fixed is not None else first < len(frontier.strategies)
            reachable = frontier.best.accuracy_units if meets else -1
        else:
            reachable = task.fixed.accuracy_units if task.fixed is not None else frontier.best.accuracy_units
        if reachable >= floor:
            return
        if strict:
            how = f"at confidence {job.confidence}" if job.confidence is not None else "on the mean"
            raise AccuracyUnreachableError(
                f"min_accuracy={job.min_accuracy} {how}"
                + (" for every request" if job.per_request else "")
                + f" is above what modalities {sorted(available)} reach "
                + ("(policy computes them all) " if task.fixed is not None else "")
                + "by the profile's lower confidence bounds; lower the floor or the confidence, "
                "send more modalities, or profile on more validation data (tighter bounds)",
                min_accuracy=float(job.min_accuracy or 0.0),
                best_accuracy=frontier.best.accuracy_units / (size * ACCURACY_SCALE),
            )
        how = (
            f"with every modality of {sorted(available)} (policy {policy!r} computes them all)"
            if task.fixed is not None
            else f"with modalities {sorted(available)}"
        )
        raise AccuracyUnreachableError(
            f"min_accuracy={job.min_accuracy} is above the best expected accuracy "
            f"{reachable / (size * ACCURACY_SCALE):.6f} reachable {how}; lower the floor or "
            f"send more modalities",
            min_accuracy=float(job.min_accuracy or 0.0),
            best_accuracy=reachable / (size * ACCURACY_SCALE),
        )

    def _unit_bounds(self, confidence: float | None) -> dict[Configuration, int]:
        """Accuracy units per request of every configuration: the mean, or its lower bound."""
        accuracy = self.pricer.cost.accuracy

        def make() -> dict[Configuration, int]:
            if confidence is None:
                return dict(accuracy)
            return {c: accuracy_units(self.profile.accuracy_bound(c, confidence)) for c in accuracy}

        return self._bounds.get(confidence, make)

    def _meets(self, strategy: Strategy, job: Job[Any]) -> bool:
        """Does ``strategy`` meet the job's floor as the job asks (confidence, per request)?"""
        bounds = self._unit_bounds(job.confidence)
        if job.per_request:  # a chain: its first configuration must meet the floor on its own
            return all(bounds[c] >= floor_units(job.min_accuracy, 1) for c, k in strategy.groups if k)
        chain = strategy.chain
        if chain is not None:  # at a confidence: the chain's credited accuracy's Wilson bound
            assert job.confidence is not None
            bound = accuracy_units(wilson_lower(chain.accuracy, chain.rows, job.confidence))
            return bound * strategy.n >= floor_units(job.min_accuracy, strategy.n)
        return sum(bounds[c] * k for c, k in strategy.groups) >= floor_units(job.min_accuracy, strategy.n)

    def _first_admissible(self, frontier: Frontier, job: Job[Any]) -> int:
        """The first frontier index from which every strategy meets the job's floor as asked.

        Options must be a suffix of the frontier; a strategy below it that meets the floor (a
        mix that happens to) is left out, which only makes the guarantee safer.
        """

        def make() -> int:
            strategies = frontier.strategies
            first = len(strategies)
            while first > 0 and self._meets(strategies[first - 1], job):
                first -= 1
            return first

        key = (frontier.available, frontier.n, job.bucket, job.min_accuracy, job.confidence, job.per_request)
        return self._admissible.get(key, make)

    def deadline_error(self, job: Job[Any], now: float, predicted_us: int) -> DeadlineError:
        """The error of a job that cannot make its deadline (``predicted_us`` from ``now``).

        Its ``best_accuracy_within_deadline`` is the most accurate strategy admission would
        take now at the same deadline (priced as decisions price it: corrected, at the tail,
        with the dispatch overhead; admitted when its median fits), so a retry with that floor
        is served; None when nothing fits.
        """
        finish_ms = (now - job.arrival) * 1000.0 + predicted_us / 1000.0
        fitting = self.fitting_accuracy(job, now)
        shown = "nothing fits" if fitting is None else f"the best accuracy that fits is {_floor4(fitting)}"
        return DeadlineError(
            f"deadline_ms={job.deadline_ms} cannot be met for {job.n} request(s) at min_accuracy="
            f"{job.min_accuracy}: the fastest admissible strategy is predicted to finish at "
            f"{finish_ms:.2f} ms after arrival; {shown}; relax the deadline or the floor, or pass "
            f"best_effort=True",
            deadline_ms=float(job.deadline_ms or 0.0),
            predicted_ms=finish_ms,
            best_accuracy_within_deadline=fitting,
        )

    def fitting_accuracy(self, job: Job[Any], now: float) -> float | None:
        """The best expected accuracy a lone job like ``job`` would be admitted at now (None: none).

        The same rule as admission's refusal: a strategy fits when its median time, from now,
        ends by the deadline. For a job of one task only (a chunked job has no single answer).
        """
        if len(job.tasks) != 1 or math.isinf(job.deadline):
            return None
        task = job.tasks[0]
        limit = job.deadline * 1e6 - now * 1e6
        typical = self.pricer.tail.typical
        if task.fixed is not None:
            return task.fixed.expected_accuracy if typical(task.lat[0]) <= limit else None
        prices = self.pricer.latencies(task.frontier, job)  # ascending: a fitting prefix
        fits = 0
        while fits < len(prices) and typical(prices[fits]) <= limit:
            fits += 1
        return task.frontier.strategies[fits - 1].expected_accuracy if fits else None


def _floor4(accuracy: float) -> str:
    """An accuracy shown to 4 decimals, rounded down (a floor written from it is still met)."""
    return f"{math.floor(accuracy * 1e4) / 1e4:.4f}"
