"""A mosel deployment as what a :class:`mosel.http.Service` serves: jobs through a :class:`Client`.

Imported when an :class:`~mosel.ray.HTTPIngress` builds its app (it needs ``mosel.http``, and so
FastAPI, which Ray Serve ships).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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

__all__ = ["DeploymentBackend", "ReplicaWatch"]

_log = logging.getLogger("mosel")


class ReplicaWatch:
    """Whether a Serve deployment has a running replica, as Serve's controller last said.

    :meth:`why_not` answers at once from the last reading, and starts a new reading (on a
    thread of its own: Serve's status is a call to its controller) when the last is older than
    ``period_s``. Before the first reading it says so (not ready); a reading that fails leaves
    the last answer as it was.

    Args:
        handle: the deployment's handle (its ``app_name`` and ``deployment_name``).
        period_s: the longest an answer is reused.
        read: reads Serve's status (``ray.serve.status``).
    """

    def __init__(self, handle: Any, period_s: float = 1.0, read: Callable[[], Any] | None = None) -> None:
        self.app = str(getattr(handle, "app_name", ""))
        self.deployment = str(getattr(handle, "deployment_name", ""))
        self.period_s = period_s
        self._read = read
        self._why: str | None = f"the replicas of deployment {self.deployment!r} were not looked at yet"
        self._read_at = -math.inf
        self._reading = False
        self._lock = threading.Lock()

    def why_not(self) -> str | None:
        """Why nothing can serve (no running replica), or None, from the last reading."""
        with self._lock:
            if not self._reading and time.monotonic() - self._read_at >= self.period_s:
                self._reading = True
                threading.Thread(target=self._refresh, name="mosel-replica-watch", daemon=True).start()
            return self._why

    def _refresh(self) -> None:
        why = self._why
        try:
            why = self._look()
        except Exception:  # Serve's controller did not answer: keep the last answer, ask again later
            _log.debug("mosel could not read Serve's status", exc_info=True)
        with self._lock:
            self._why, self._read_at, self._reading = why, time.monotonic(), False

    def _look(self) -> str | None:
        if self._read is None:
            import ray  # noqa: PLC0415  (only where an ingress runs)
            from ray import serve  # noqa: PLC0415

            if not ray.is_initialized():  # serve.status would start a Ray instance
                return "Ray is not running in this process: no deployment to serve with"
            self._read = serve.status
        status = self._read()
        app = status.applications.get(self.app)
        deployment = None if app is None else app.deployments.get(self.deployment)
        if deployment is None:
            return f"deployment {self.deployment!r} of application {self.app!r} is not on Serve"
        if int(deployment.replica_states.get("RUNNING", 0)) > 0:
            return None
        message = f": {deployment.message}" if deployment.message else ""
        return f"no replica of deployment {self.deployment!r} is running ({deployment.status}{message})"


class DeploymentBackend(Backend):
    """A mosel deployment behind its handle, served by a :class:`mosel.http.Service`.

    Inputs are decoded with the deployment's profile's schema; each job goes out as a
    :class:`Request` (stamped when it is sent, with what is left of its deadline then, so the
    slack router places it and the replica charges its transit) through ``client``, whose
    waits are bounded by the deadline plus its grace and whose errors are mosel's. A cancelled
    job (the HTTP client went away) cancels its Serve request: a job still queued in its
    replica is withdrawn there; one running finishes. Which of the two it was is not known
    here: the front door counts the cancel as withdrawn.

    Ready while Serve reports a running replica of the deployment (:class:`ReplicaWatch`).

    Args:
        client: calls the deployment (its handle, retries, timeout and grace).
        profile: the profile the replicas serve with.
        watch: how readiness learns of the deployment's replicas (a :class:`ReplicaWatch` of
            the client's handle by default).
    """

    def __init__(self, client: Client, profile: Profile, watch: ReplicaWatch | None = None) -> None:
        self.client = client
        self.profile = profile
        self._serving = _DeploymentServing(client, profile)
        self.watch = ReplicaWatch(client.handle) if watch is None else watch

    def serving(self) -> Serving:
        """The deployment (the same for every request)."""
        return self._serving

    def readiness(self) -> str | None:
        """Why no job can be served now: no replica of the deployment is running (never waits)."""
        return self.watch.why_not()

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
