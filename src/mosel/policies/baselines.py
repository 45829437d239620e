"""The baselines mosel is measured against: every modality (with and without care), and the cheapest.

``agnostic`` is the paper's modality-agnostic server, ``agnostic_plus`` a careful deadline-aware
Triton or Ray Serve deployment, ``batcher`` their default dynamic batching, and ``aggressive``
every job at its cheapest admissible strategy: what mosel must never lose to.
"""

from __future__ import annotations

from mosel.jobs import Failure, Task, time_us
from mosel.policies.base import Policy
from mosel.policies.blocks import least_valuable, predict, repair

__all__ = ["Aggressive", "Agnostic", "AgnosticPlus", "Batcher"]


class Agnostic(Policy):
    """Every modality, earliest deadline first, late jobs dropped at dispatch: the paper's baseline."""

    name = "agnostic"
    every_modality = True
    merge_skips = False


class Batcher(Policy):
    """FIFO dynamic batching of every modality that never drops (Triton or Ray Serve defaults)."""

    name = "batcher"
    every_modality = True
    fifo = True
    refuse_late = False
    merge_always = True
    merge_skips = False


class Aggressive(Policy):
    """Every job at its cheapest admissible strategy; doomed jobs fail at once.

    Where one job must go for the others to make it, the least valuable per microsecond goes
    (weighted Moore-Hodgson): what mosel serves as once its miss budget is spent.
    """

    name = "aggressive"

    def initial(self, task: Task, now: float, share: float) -> int:
        """Always the cheapest admissible option."""
        return 0

    def victim(self, late: int) -> int:
        """The least valuable job per microsecond at or before the late one."""
        return least_valuable(self, late)

    def replan(self, now: float) -> list[Failure]:
        """Fail the jobs that cannot make it even with every job at its cheapest option."""
        return repair(self, now)


class AgnosticPlus(Agnostic):
    """A careful all-modality server: batch-aware shedding and batching that may skip jobs.

    What a deadline-aware Triton or Ray Serve deployment could do without modality selection:

    * prediction that merges consecutive jobs exactly as dispatch would;
    * shedding (weighted Moore-Hodgson): while a queued job is predicted late, the job at or
      before it with the fewest requests per microsecond fails with ``DeadlineError``;
    * batching that may skip queued jobs: any queued job that fits the batch's rows and its
      earliest deadline joins, unless the jobs it would overtake then miss theirs.
    """

    name = "agnostic_plus"
    merge_skips = True

    def replan(self, now: float) -> list[Failure]:
        """Shed, fewest requests per microsecond first, until no queued job is predicted late."""
        core = self.core
        failures: list[Failure] = []
        while core.queue:
            finish, late = predict(self, time_us(core.start(now)), self.horizon, stop=True)
            if late < 0:
                break
            candidates = [t for t in core.queue[: late + 1] if not t.job.best_effort]
            core.count("violations_predicted")
            victim = min(candidates, key=lambda t: t.job.n / max(1, t.lat[0]))
            error = core.deadline_error(victim.job, now, finish[late] - time_us(now))
            failures.append(core.fail(victim.job, error, "shed"))
        return failures
