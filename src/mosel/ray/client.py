"""Calling a mosel deployment with mosel's signature and errors, every wait bounded by the deadline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Final

import ray
import ray.exceptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from mosel.errors import DeadlineError, InputError, MoselError, QueueFullError, ReplicaError, ShutdownError
from mosel.execution import Result
from mosel.ray.request import Feedback, Request
from mosel.trees import Tree

__all__ = ["Client"]

_log = logging.getLogger("mosel")

_REPLICA_LOST: Final = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.RayActorError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    ray.exceptions.TaskCancelledError,  # Serve's RequestCancelledError too: cancelled on the serving side
    ShutdownError,  # the replica's scheduler closed under the job (the replica is going away)
)
"""What a job's replica raises when it lost or withdrew the job, not the caller: sent again."""


# ---------------------------------------------------------------------------------- the caller


class Client:
    """Calls a mosel deployment through its ``DeploymentHandle`` with mosel's signature and errors.

    Every wait on the caller's behalf (for the result, for a replica to take the job, behind a
    replica's restart, before a retry) ends by the job's deadline plus ``grace_ms``; a job
    without a deadline, or best effort, waits at most ``timeout_s`` in all. Then the call
    cancels what it sent and raises :class:`mosel.DeadlineError` (the deadline passed; its
    ``predicted_ms`` and message give the time really spent since the job was sent) or
    :class:`mosel.ReplicaError` (``timeout_s`` passed). A job whose replica died under it is
    sent again (Serve takes another live replica, or waits for one) while its deadline leaves
    time and ``retries`` last; else :class:`mosel.ReplicaError`. So is a job its replica
    withdrew without the caller asking: a :class:`mosel.ShutdownError` (the replica's scheduler
    closed under it, e.g. a replica shutting down) or Ray's ``TaskCancelledError`` (Serve's
    ``RequestCancelledError``: cancelled on the serving side); no Ray error reaches the caller.
    Cancelling the caller (a cancelled ``ainfer`` task, Ctrl-C in ``infer``) cancels the Serve
    request: a job still in the replica's mosel queue is withdrawn and never computed (one
    already running finishes, its result unclaimed).

    Args:
        handle: what ``serve.run(app)`` (or ``serve.get_deployment_handle``) returned.
        retries: how many times a job whose replica died is sent again (while its deadline
            leaves time); then :class:`mosel.ReplicaError`.
        timeout_s: the longest a call waits in all, its retries included, when its job has no
            deadline or is best effort (and at most, with one); then :class:`mosel.ReplicaError`.
        grace_ms: how long past its deadline a call still waits for the replica's answer (a
            result that finished a little late, a typed error on its way back); then
            :class:`mosel.DeadlineError`.
    """

    def __init__(
        self, handle: DeploymentHandle, *, retries: int = 2, timeout_s: float = 60.0, grace_ms: float = 100.0
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"Client retries must be an int >= 0, got {retries!r}")
        for name, value in (("timeout_s", timeout_s), ("grace_ms", grace_ms)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"Client {name} must be a finite number, got {value!r}")
        if timeout_s <= 0 or grace_ms < 0:
            raise InputError(
                f"Client needs timeout_s > 0 and grace_ms >= 0, got {timeout_s!r} and {grace_ms!r}"
            )
        self.handle = handle
        self.retries = retries
        self.timeout_s = float(timeout_s)
        self.grace_ms = float(grace_ms)

    def request(self, inputs: Mapping[str, Tree], **slo: Any) -> Request:
        """A :class:`Request` stamped now (``slo``: the keyword arguments of ``model.infer``)."""
        return Request(inputs, **slo)

    def infer(self, inputs: Mapping[str, Tree] | Request, **slo: Any) -> Result:
        """``model.infer`` on the deployment: blocks until the job's result or typed error."""
        call = _Call(self, inputs if isinstance(inputs, Request) else self.request(inputs, **slo))
        while True:
            wait_s = call.wait_s()
            response = self.handle.remote(call.request)
            try:
                result: Result = response.result(timeout_s=wait_s)
                return result
            except BaseException as exc:
                call.settle(exc, response)

    async def ainfer(self, inputs: Mapping[str, Tree] | Request, **slo: Any) -> Result:
        """``await model.ainfer`` on the deployment (call it from inside an event loop)."""
        call = _Call(self, inputs if isinstance(inputs, Request) else self.request(inputs, **slo))
        while True:
            wait_s = call.wait_s()
            response = self.handle.remote(call.request)
            try:
                result: Result = await asyncio.wait_for(_awaited(response), wait_s)
                return result
            except BaseException as exc:
                call.settle(exc, response)

    def feedback(self, result_id: str, labels: Any, *, tries: int = 8) -> int:
        """Report a served job's labels to the replica that served it (see :func:`mosel.feedback`).

        The slack router sends them to the replica whose process made ``result_id``; with
        Serve's own router (or a caller's own ``request_id``) a replica that does not hold the
        job says so and the labels are sent again, at most ``tries`` times in all.

        Returns:
            The requests scored (0: no replica holds the job: forgotten, or never served here).

        Raises:
            NotMonitoredError: the deployment is not monitored.
            InputError: the labels are malformed.
            ReplicaError: no answer within ``timeout_s``.
        """
        handle = self.handle.options(method_name="feedback")
        for _ in range(max(tries, 1)):
            response = handle.remote(Feedback(result_id, labels))
            try:
                scored = response.result(timeout_s=self.timeout_s)
            except BaseException as exc:
                error = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
                if isinstance(error, MoselError):
                    raise error from None
                if isinstance(error, (TimeoutError, concurrent.futures.TimeoutError)):
                    _cancel(response)
                    raise ReplicaError(
                        f"no replica answered feedback within timeout_s={self.timeout_s:g} s"
                    ) from None
                raise
            if scored is not None:
                return int(scored)
        return 0


class _Call:
    """One :class:`Client` call: its job, its attempts, and the bound on its waits."""

    __slots__ = ("attempt", "client", "deadline_binds", "lost", "request", "started")

    def __init__(self, client: Client, request: Request) -> None:
        self.client = client
        self.request = request
        self.started = time.monotonic()
        self.attempt = 0
        self.lost: BaseException | None = None  # the replica loss that caused the last retry
        self.deadline_binds = False

    def wait_s(self) -> float:
        """How long the next wait may last; raises the call's typed error when nothing is left."""
        client, request = self.client, self.request
        by_timeout = client.timeout_s - (time.monotonic() - self.started)
        left_ms = None if request.best_effort else request.remaining_ms(time.time())
        by_deadline = math.inf if left_ms is None else (left_ms + client.grace_ms) / 1000.0
        self.deadline_binds = by_deadline <= by_timeout
        wait = min(by_timeout, by_deadline)
        if wait <= 0.0:
            raise self.expired()
        return wait

    def expired(self) -> MoselError:
        """The error of a call whose deadline (plus grace) or timeout passed before an answer."""
        request, client = self.request, self.client
        lost = ""
        if self.lost is not None:
            lost = (
                f"; its replica was lost ({type(self.lost).__name__}), no replica answered the retry in time"
            )
        if self.deadline_binds and request.deadline_ms is not None:
            spent_ms = max(time.time() - request.sent_at_s, 0.0) * 1000.0
            return DeadlineError(
                f"no answer within the job's {request.deadline_ms:g} ms deadline and the client's "
                f"{client.grace_ms:g} ms grace: {spent_ms:.0f} ms spent since it was sent{lost}; the "
                "request was cancelled",
                deadline_ms=float(request.deadline_ms),
                predicted_ms=spent_ms,
                best_accuracy_within_deadline=None,
            )
        return ReplicaError(
            f"no answer within the client's timeout_s={client.timeout_s:g} s{lost}; the request was "
            "cancelled (raise timeout_s, or give the job a deadline)"
        )

    def settle(self, exc: BaseException, response: DeploymentResponse) -> None:
        """Turn what a wait raised into mosel's error, or return to send the job again."""
        error = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, BaseException):
            error = error.cause
        if isinstance(error, MoselError) and not isinstance(error, ShutdownError):
            raise error from None
        if isinstance(error, BackPressureError):
            raise QueueFullError(f"the deployment is overloaded: {error}") from error
        if isinstance(error, (TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError)):
            _cancel(response)
            raise self.expired() from None
        if isinstance(error, _REPLICA_LOST):
            self.lost = error
            request = self.request
            left = request.remaining_ms(time.time())
            if self.attempt >= self.client.retries:
                raise ReplicaError(
                    f"the replica serving the job was lost or withdrew it ({type(error).__name__}) and "
                    f"its {self.client.retries} retries are spent: {error}"
                ) from error
            if left is not None and left <= 0.0 and not request.best_effort:
                raise ReplicaError(
                    f"the replica serving the job was lost or withdrew it ({type(error).__name__}) and "
                    f"no time is left before its {request.deadline_ms:g} ms deadline to send it again: "
                    f"{error}"
                ) from error
            self.attempt += 1
            _log.warning("mosel.ray: replica lost under a job (%s); retrying", type(error).__name__)
            return
        if not isinstance(exc, Exception):  # cancelled, interrupted: the job is withdrawn
            _cancel(response)
            raise exc
        raise error


def _cancel(response: DeploymentResponse) -> None:
    """Cancel a Serve request (best effort: a request that already finished stays so)."""
    try:
        response.cancel()
    except Exception:  # never hide the caller's own error behind a failed cancel
        _log.debug("mosel.ray: could not cancel a request", exc_info=True)


async def _awaited(response: DeploymentResponse) -> Any:
    return await response
