"""A mosel deployment as what a :class:`mosel.http.Service` serves: jobs through a :class:`Client`.

Imported when an :class:`~mosel.ray.HTTPIngress` builds its app (it needs ``mosel.http``, and so
FastAPI, which Ray Serve ships).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from mosel.execution import Result
from mosel.http.backend import Backend, Serving, Submitted
from mosel.profiles import Profile
from mosel.ray.client import Client
from mosel.ray.request import Request
from mosel.schema import ModalitySchema
from mosel.slo import SLO
from mosel.trees import Tree

__all__ = ["DeploymentBackend"]


class DeploymentBackend(Backend):
    """A mosel deployment behind its handle, served by a :class:`mosel.http.Service`.

    Inputs are decoded with the deployment's profile's schema; each job goes out as a
    :class:`Request` (stamped when it is sent, with what is left of its deadline then, so the
    slack router places it and the replica charges its transit) through ``client``, whose
    waits are bounded by the deadline plus its grace and whose errors are mosel's. A cancelled
    job (the HTTP client went away) cancels its Serve request: a job still queued in its
    replica is withdrawn there; one running finishes. Which of the two it was is not known
    here: the front door counts the cancel as withdrawn.

    Args:
        client: calls the deployment (its handle, retries, timeout and grace).
        profile: the profile the replicas serve with.
    """

    def __init__(self, client: Client, profile: Profile) -> None:
        self.client = client
        self.profile = profile
        self._serving = _DeploymentServing(client, profile)

    def serving(self) -> Serving:
        """The deployment (the same for every request)."""
        return self._serving

    def readiness(self) -> str | None:
        """Always ready: the replicas report their own readiness to Serve."""
        return None

    def feedback(self, key: str, labels: Any) -> int | None:
        """The labels, to the replica that served the job (:meth:`Client.feedback`)."""
        return self.client.feedback(key, labels) or None

    def name(self) -> str:
        """The served model's class name (from the profile)."""
        return self.profile.fingerprint.model_class.rsplit(".", 1)[-1]


class _DeploymentServing(Serving):
    def __init__(self, client: Client, profile: Profile) -> None:
        self.client = client
        self.profile = profile
        self.target: Sequence[str] = tuple(profile.modalities)

    def schema(self) -> Mapping[str, ModalitySchema]:
        return self.profile.input_schema

    def submit(
        self,
        inputs: Mapping[str, Tree],
        slo: SLO,
        present: Mapping[str, Tensor] | None,
        *,
        request_id: str | None = None,
    ) -> Submitted:
        request = Request(
            inputs,
            deadline_ms=slo.deadline_ms,
            min_accuracy=slo.min_accuracy,
            best_effort=slo.best_effort,
            confidence=slo.confidence,
            per_request=slo.per_request,
            present=present,
            sent_at_s=time.time(),
            request_id=request_id,
        )
        task: asyncio.Task[Result] = asyncio.ensure_future(self.client.ainfer(request))
        return Submitted(task, task.cancel)

    def retry_after_s(self) -> int:
        return 1
