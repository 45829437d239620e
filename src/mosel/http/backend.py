"""What a :class:`~mosel.http.Service` serves: a local model, or anything else behind the same rules.

The front door's rules (body limits, decoding off the event loop, deadlines charged from the
request's arrival, disconnects, ``deadline_met`` as the client sees it, the metrics) live in
:class:`~mosel.http.Service`; a :class:`Backend` says only what differs between what it serves:
the input schema and modalities, how a job is submitted, awaited and cancelled, readiness, the
time to retry after, and the statistics it exports. :class:`LocalModel` serves a model in this
process; ``mosel.ray.HTTPIngress`` a Ray Serve deployment through its handle.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

import mosel
from mosel.errors import MoselError, NotMonitoredError, NotProfiledError
from mosel.execution import Result
from mosel.http.wire import ModelSource
from mosel.monitoring import Monitor
from mosel.runtime import close, monitor_of, profile_of, prometheus_collector, readiness, settle, submit_now
from mosel.schema import LeafSchema, ModalitySchema
from mosel.slo import SLO
from mosel.trees import Tree

__all__ = ["Backend", "LocalModel", "LocalServing", "Serving", "Submitted", "bool_masks"]


@dataclass(frozen=True, slots=True)
class Submitted:
    """A job a backend took: what to await, and how to withdraw it.

    Attributes:
        waiting: resolves to the job's :class:`mosel.Result`, or raises its error.
        cancel: withdraw the job; True if it was withdrawn before it ran (never computed), False
            if it runs on (its result is then dropped).
    """

    waiting: asyncio.Future[Result]
    cancel: Callable[[], bool]

    @classmethod
    def of(cls, future: concurrent.futures.Future[Result]) -> Submitted:
        """A job of an in-process model, from the future ``model.submit`` returned."""
        return cls(asyncio.wrap_future(future), future.cancel)


class Serving(abc.ABC):
    """What serves one request: bound to it when it arrives (a model built later is built then)."""

    target: nn.Module | Sequence[str]
    """What :func:`~mosel.http.decode_inputs` decodes for: the model, or the modalities it takes."""

    @abc.abstractmethod
    def schema(self) -> Mapping[str, ModalitySchema]:
        """The input schema to decode the request with, after any change of the model is handled.

        Runs on the decode pool, never waits for a re-profile.

        Raises:
            NotProfiledError, ProfileMismatchError: the model cannot serve now (503).
        """

    @abc.abstractmethod
    def submit(
        self,
        inputs: Mapping[str, Tree],
        slo: SLO,
        present: Mapping[str, Tensor] | None,
        *,
        request_id: str | None = None,
    ) -> Submitted:
        """Submit the job, its deadline counted from now; on the event loop, never blocking for long.

        ``request_id``: the caller's own id for the job; with monitoring on, its labels may
        come under it too (taken before the job's result is handed back).
        """

    @abc.abstractmethod
    def retry_after_s(self) -> int:
        """Seconds a client refused for overload should wait before retrying (at least 1)."""


class Backend(abc.ABC):
    """What a :class:`~mosel.http.Service` serves (see the module)."""

    @abc.abstractmethod
    def serving(self) -> Serving:
        """What serves the request arriving now.

        Raises:
            Exception: nothing can serve now (a model not built yet): answered 503.
        """

    @abc.abstractmethod
    def readiness(self) -> str | None:
        """Why nothing can serve now, or None when it can; computed, never waited for."""

    @abc.abstractmethod
    def feedback(self, key: str, labels: Any) -> int | None:
        """Score the labels of a served job (``key``: its ``Result.id`` or its ``request_id``).

        Blocking: the service calls it on its thread pool.

        Returns:
            The requests scored now, or None when no served job waits for labels under ``key``.

        Raises:
            NotMonitoredError: what is served is not monitored.
            InputError: the labels are malformed.
        """

    def collectors(self) -> list[Any]:
        """``prometheus_client`` collectors of what is served, exported beside the front door's."""
        return []

    def name(self) -> str:
        """The label of what is served in the front door's metrics."""
        return type(self).__qualname__

    def close(self) -> None:  # noqa: B027 (a backend with nothing to close keeps this)
        """The service closed: release what is served (queued jobs finish)."""


def _float_dtype(model: nn.Module) -> str:
    """The dtype of the model's first tensor (``"torch.float32"``), or "" if it is not a float."""
    probe = next(itertools.chain(model.parameters(), model.buffers()), None)
    return str(probe.dtype) if probe is not None and probe.is_floating_point() else ""


def _follow_dtype(schema: Mapping[str, ModalitySchema], made_for: str, now: str) -> dict[str, ModalitySchema]:
    """``schema`` with the leaves in the model's dtype ``made_for`` in its dtype ``now``."""
    name = now.removeprefix("torch.")
    return {
        m: ModalitySchema(
            s.batch_dim,
            tuple(
                LeafSchema(leaf.path, name, leaf.shape, leaf.observed, leaf.values)
                if f"torch.{leaf.dtype}" == made_for
                else leaf
                for leaf in s.leaves
            ),
            s.agree,
        )
        for m, s in schema.items()
    }


def _drain_ms(model: nn.Module) -> float | None:
    """The model's predicted queue drain time, ``mosel.load(model).drain_ms`` (None if unknown)."""
    try:
        return float(mosel.load(model).drain_ms)
    except MoselError:
        return None


class LocalModel(Backend):
    """A model in this process (or a function returning it, called per request: built later).

    Args:
        model: the model (profiled or attached), or a function returning it.
        input_schema: modality -> schema to decode inputs with, instead of the profile's.
    """

    def __init__(self, model: ModelSource, input_schema: Mapping[str, ModalitySchema] | None = None) -> None:
        self.source = model
        self.input_schema = input_schema
        # The model's float dtype when an explicit schema was given: its leaves of that dtype follow
        # the model's (read now for a model, at the first request for a function returning one).
        self.schema_dtype = _float_dtype(model) if isinstance(model, nn.Module) else None

    def model(self) -> nn.Module:
        """The served model (calling the function given for it, if any)."""
        if isinstance(self.source, nn.Module):
            return self.source
        return self.source()

    def schema_of(self, model: nn.Module) -> Mapping[str, ModalitySchema]:
        """The input schema requests are decoded with (the given one, else the profile's).

        The profile's is read when called (after a re-profile, the new profile's). Where the
        model's dtype is no longer the one the schema was made for (attached with
        ``on_stale="warn"``, then ``model.double()``; or re-profiled in float64 while an explicit
        ``input_schema`` says float32), the leaves that had the model's dtype then take its dtype
        now, so that inputs reach it in the dtype it computes in.
        """
        if self.input_schema is not None:
            if self.schema_dtype is None:
                self.schema_dtype = _float_dtype(model)
            schema, made_for = self.input_schema, self.schema_dtype
        else:
            try:
                profile = profile_of(model)
            except NotProfiledError:
                return {}
            schema, made_for = profile.input_schema, profile.fingerprint.dtype
        now = _float_dtype(model)
        if made_for and now and made_for != now:
            return _follow_dtype(schema, made_for, now)
        return schema

    def serving(self) -> Serving:
        """The model, built now if it is a function's (see :class:`Backend`)."""
        return LocalServing(self, self.model())

    def readiness(self) -> str | None:
        """:func:`mosel.runtime.readiness` of the model (why it is not built, if it is not)."""
        try:
            return readiness(self.model())
        except Exception as exc:  # the model is not built (yet)
            return f"{type(exc).__name__}: {exc}"

    def feedback(self, key: str, labels: Any) -> int | None:
        """The labels, to the model's monitor (:meth:`mosel.monitoring.Monitor.feedback`)."""
        model = self.model()
        monitor = monitor_of(model)
        if monitor is None:
            raise NotMonitoredError(
                f"{type(model).__qualname__} is not monitored; attach it with monitoring=mosel.Monitoring()"
            )
        if not monitor.holds(key):
            return None
        return monitor.feedback(key, labels)

    def collectors(self) -> list[Any]:
        """The model's statistics (``mosel_*``)."""
        return [prometheus_collector(self.model())]

    def name(self) -> str:
        """The model's class name."""
        return type(self.model()).__qualname__

    def close(self) -> None:
        """Close the model's scheduler (queued jobs finish), if the model was built."""
        try:
            model = self.model()
        except Exception:  # never built: nothing to close
            return
        close(model)


class LocalServing(Serving):
    """:class:`LocalModel`'s model, for one request."""

    def __init__(self, backend: LocalModel, model: nn.Module) -> None:
        self.backend = backend
        self.model = self.target = model

    def schema(self) -> Mapping[str, ModalitySchema]:
        """The model's schema, once a change since ``attach`` is handled (:func:`mosel.runtime.settle`)."""
        settle(self.model)  # refused, warned about, or re-profiled in the background: never waits
        return self.backend.schema_of(self.model)

    def submit(
        self,
        inputs: Mapping[str, Tree],
        slo: SLO,
        present: Mapping[str, Tensor] | None,
        *,
        request_id: str | None = None,
    ) -> Submitted:
        """``model.submit`` (:func:`mosel.runtime.submit_now`: never waits for a re-profile)."""
        future = submit_now(self.model, inputs, slo, present)
        if request_id:
            monitor = monitor_of(self.model)
            if monitor is not None:  # the alias is taken before the future's waiters hear of the result
                future.add_done_callback(partial(_alias, monitor, request_id))
        return Submitted.of(future)

    def retry_after_s(self) -> int:
        """The model's predicted queue drain, ``mosel.load(model).drain_ms``, in whole seconds."""
        drain = _drain_ms(self.model)
        return 1 if drain is None or not math.isfinite(drain) else max(1, math.ceil(drain / 1000.0))


def _alias(monitor: Monitor, key: str, done: concurrent.futures.Future[Result]) -> None:
    if not done.cancelled() and done.exception() is None:
        monitor.alias(done.result().id, key)


def bool_masks(present: Mapping[str, list[bool]] | None) -> dict[str, Tensor] | None:
    """A body's ``present`` as bool tensors."""
    if present is None:
        return None
    return {m: torch.tensor(v, dtype=torch.bool) for m, v in present.items()}
