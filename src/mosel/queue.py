"""The earliest-deadline-first queue of tasks, with one numpy column per quantity decisions read.

Tasks stay in key order (deadline, then arrival; or arrival first under a FIFO policy). Beside
them the queue keeps six int64 columns, one entry per queued task: its current option's latency,
its deadline, its cheapest option's latency, what its next step down saves and loses, and
whether it is best-effort. Predicting every queued job's finish is then one cumulative sum, and
a policy reads the queue without walking it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from mosel.assign import step_down
from mosel.jobs import Task, deadline_us

__all__ = ["EdfQueue", "IntArray"]

IntArray = npt.NDArray[np.int64]


class EdfQueue:
    """The queued tasks in key order and their columns (insertion is one memmove, not a new array)."""

    __slots__ = ("_columns", "_jobs", "_keys", "requests", "tasks")

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        """The queued tasks, in key order (read-only for everyone but this class)."""
        self.requests = 0
        """Rows queued, over every task."""
        self._keys: list[tuple[float, int, int]] = []
        self._columns: IntArray = np.zeros((6, 64), dtype=np.int64)
        self._jobs: dict[int, int] = {}  # job id -> its queued tasks

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def jobs(self) -> int:
        """Jobs with at least one queued task."""
        return len(self._jobs)

    @property
    def latency_us(self) -> IntArray:
        """Each queued task's current option's latency, queue order (a view)."""
        return self._columns[0, : len(self.tasks)]

    @property
    def deadlines_us(self) -> IntArray:
        """Each queued task's deadline (absolute µs; :data:`~mosel.jobs.NO_DEADLINE_US` for none)."""
        return self._columns[1, : len(self.tasks)]

    @property
    def cheapest_us(self) -> IntArray:
        """Each queued task's cheapest admissible option's latency."""
        return self._columns[2, : len(self.tasks)]

    @property
    def save_us(self) -> IntArray:
        """What each queued task's next step down saves (0: none)."""
        return self._columns[3, : len(self.tasks)]

    @property
    def loss_units(self) -> IntArray:
        """And what that step loses, in accuracy units."""
        return self._columns[4, : len(self.tasks)]

    @property
    def lenient(self) -> npt.NDArray[np.bool_]:
        """Best-effort tasks: served late rather than failed (a copy)."""
        lenient: npt.NDArray[np.bool_] = self._columns[5, : len(self.tasks)] != 0
        return lenient

    def position(self, task: Task) -> int:
        """Index of a queued task."""
        i = bisect.bisect_left(self._keys, task.key)
        assert self.tasks[i] is task
        return i

    def insert(self, task: Task) -> None:
        """Queue a task whose options are priced (``task.lat``, ``task.acc``)."""
        i = bisect.bisect(self._keys, task.key)
        n = len(self.tasks)
        if n == self._columns.shape[1]:
            self._columns = np.concatenate([self._columns, np.zeros_like(self._columns)], axis=1)
        columns = self._columns
        columns[:, i + 1 : n + 1] = columns[:, i:n]
        _, saved, lost = step_down(task.lat, task.acc, task.k)
        job = task.job
        columns[:, i] = (task.lat[task.k], deadline_us(job), task.lat[0], saved, lost, job.best_effort)
        self._keys.insert(i, task.key)
        self.tasks.insert(i, task)
        task.queued = True
        self.requests += task.n
        self._jobs[task.job.id] = self._jobs.get(task.job.id, 0) + 1

    def remove(self, task: Task) -> None:
        """Take a task out (to run it, or because its job failed)."""
        i = self.position(task)
        n = len(self.tasks)
        self._columns[:, i : n - 1] = self._columns[:, i + 1 : n]
        del self.tasks[i]
        del self._keys[i]
        task.queued = False
        self.requests -= task.n
        left = self._jobs.pop(task.job.id) - 1
        if left:
            self._jobs[task.job.id] = left

    def set_option(self, task: Task, k: int, position: int | None = None) -> None:
        """Choose option ``k`` for ``task`` (late binding: until it is dispatched)."""
        task.k = k
        if task.queued:
            i = self.position(task) if position is None else position
            _, saved, lost = step_down(task.lat, task.acc, k)
            columns = self._columns
            columns[0, i] = task.lat[k]
            columns[3, i] = saved
            columns[4, i] = lost

    def repriced(self, refresh: Callable[[Task], None]) -> None:
        """Re-read every queued task's latencies after ``refresh`` brought them up to date."""
        columns = self._columns
        for i, task in enumerate(self.tasks):
            refresh(task)
            _, saved, lost = step_down(task.lat, task.acc, task.k)
            columns[0, i], columns[2, i], columns[3, i], columns[4, i] = (
                task.lat[task.k],
                task.lat[0],
                saved,
                lost,
            )
