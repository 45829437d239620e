"""Scheduling policies: what the scheduler core runs, at which option, and whom it fails.

The core (:class:`mosel.scheduler.Scheduler`) owns the queue, admission, prices and completion,
and knows no policy by name. A policy (:class:`Policy`, :mod:`mosel.policies.base`) decides at
four moments through a narrow view of the core, combining the building blocks of
:mod:`mosel.policies.blocks`.

``mosel`` is the default; the others are the baselines it is measured against, available by name
in :class:`~mosel.scheduler.SchedulerConfig` for A/B tests. A policy of one's own subclasses
:class:`Policy` and is passed as ``SchedulerConfig(policy=MyPolicy)``.
"""

from __future__ import annotations

from mosel.policies.base import Core, Policy
from mosel.policies.baselines import Aggressive, Agnostic, AgnosticPlus, Batcher
from mosel.policies.greedy import Greedy, GreedyCpsat
from mosel.policies.mosel import Mosel

__all__ = [
    "POLICIES",
    "Aggressive",
    "Agnostic",
    "AgnosticPlus",
    "Batcher",
    "Core",
    "Greedy",
    "GreedyCpsat",
    "Mosel",
    "Policy",
    "policy_class",
]

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Mosel, Greedy, GreedyCpsat, Aggressive, Agnostic, AgnosticPlus, Batcher)
}
"""The policies available by name in :class:`~mosel.scheduler.SchedulerConfig`."""


def policy_class(policy: str | type[Policy]) -> type[Policy]:
    """The policy class for a name (or a :class:`Policy` subclass itself); ValueError if unknown."""
    if isinstance(policy, type) and issubclass(policy, Policy):
        return policy
    found = POLICIES.get(policy) if isinstance(policy, str) else None
    if found is None:
        raise ValueError(
            f"policy must be one of {sorted(POLICIES)} or a mosel.policies.Policy subclass, got {policy!r}"
        )
    return found
