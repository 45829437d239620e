"""The exception tree of mosel.

Every error mosel raises is a :class:`MoselError`, and each class also subclasses the builtin
exception that callers would already catch for that kind of problem::

    MoselError
    ├── SpecError(TypeError)             a decorator used wrongly, or a model that is not multimodal
    ├── ProfileError(ValueError)         a profile file that is malformed, truncated or foreign
    │   └── ProfileMismatchError         a profile that belongs to another model
    ├── NotProfiledError(RuntimeError)   infer() on a model with no profile attached
    ├── InputError(ValueError, TypeError) inputs that do not fit the model (names, types, shapes)
    ├── OutputError(ValueError, TypeError) a branch or fusion returned what mosel cannot split into rows
    ├── SLOError(ValueError)             a deadline or accuracy floor that is not a valid number
    ├── InfeasibleError(ValueError)      no strategy satisfies the request's SLO
    │   ├── AccuracyUnreachableError     the floor is above every configuration's accuracy
    │   └── DeadlineError(TimeoutError)  no strategy that meets the floor fits in the deadline
    ├── QueueFullError(RuntimeError)     admission control: the queue is full
    ├── ExecutionError(RuntimeError)     the model's code stopped a job with a BaseException
    ├── ShutdownError(RuntimeError)      the scheduler was closed before the job ran
    └── ReplicaError(RuntimeError)       a remote replica (mosel.ray) died or did not answer

Warnings (a stale profile, a cost model that predicts poorly) are :class:`MoselWarning`.

Messages name the object, show the bad value and say how to fix it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccuracyUnreachableError",
    "DeadlineError",
    "ExecutionError",
    "InfeasibleError",
    "InputError",
    "MoselError",
    "MoselWarning",
    "NotProfiledError",
    "OutputError",
    "ProfileError",
    "ProfileMismatchError",
    "QueueFullError",
    "ReplicaError",
    "SLOError",
    "ShutdownError",
    "SpecError",
]


class MoselError(Exception):
    """Base class of every error raised by mosel."""


class SpecError(MoselError, TypeError):
    """A mosel decorator was used wrongly, or an object is not a ``@mosel.multimodal`` model."""


class ProfileError(MoselError, ValueError):
    """A profile could not be read: malformed, truncated, of an unknown version, or not a profile."""


class ProfileMismatchError(ProfileError):
    """A profile does not belong to the model it is attached to."""


class NotProfiledError(MoselError, RuntimeError):
    """The model has no profile; call ``mosel.profile`` or ``mosel.attach`` first."""


class InputError(MoselError, ValueError, TypeError):
    """The inputs of a request do not fit the model."""


class NotMonitoredError(InputError):
    """Labels came for a model (or deployment) that is not monitored: they have nowhere to go.

    Attach the model with ``monitoring=mosel.Monitoring()`` (``mosel.monitor(model, ...)`` for
    one already attached; ``mosel.ray.deployment(..., monitoring=...)`` for replicas).
    """


class OutputError(MoselError, ValueError, TypeError):
    """A branch or the fusion returned something mosel cannot serve.

    Branches and fusion return a tensor, or a (nested) dict, tuple or list of tensors, whose
    batch dimension has exactly one entry per request they were given. Anything else (a scalar,
    a row too many or too few, chunks that do not concatenate) fails the job that produced it,
    and only that job.
    """


class SLOError(MoselError, ValueError):
    """A deadline or accuracy floor is not a valid value."""


class InfeasibleError(MoselError, ValueError):
    """No strategy satisfies the job's service-level objectives."""


class AccuracyUnreachableError(InfeasibleError):
    """The accuracy floor is higher than any configuration reaches on the available modalities."""

    def __init__(self, message: str, *, min_accuracy: float, best_accuracy: float) -> None:
        super().__init__(message)
        self.min_accuracy = min_accuracy
        self.best_accuracy = best_accuracy

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes survive pickling (to another process, e.g. a Ray caller).
        kwargs = {"min_accuracy": self.min_accuracy, "best_accuracy": self.best_accuracy}
        return (_rebuild, (type(self), str(self), kwargs), self.__dict__)


class DeadlineError(InfeasibleError, TimeoutError):
    """No strategy meeting the accuracy floor is predicted to finish within the deadline.

    Attributes:
        deadline_ms: the job's deadline, relative to its arrival.
        predicted_ms: predicted completion (relative to arrival) of the fastest admissible strategy.
        best_accuracy_within_deadline: the best expected accuracy that would fit, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        deadline_ms: float,
        predicted_ms: float,
        best_accuracy_within_deadline: float | None,
    ) -> None:
        super().__init__(message)
        self.deadline_ms = deadline_ms
        self.predicted_ms = predicted_ms
        self.best_accuracy_within_deadline = best_accuracy_within_deadline

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "deadline_ms": self.deadline_ms,
            "predicted_ms": self.predicted_ms,
            "best_accuracy_within_deadline": self.best_accuracy_within_deadline,
        }
        return (_rebuild, (type(self), str(self), kwargs), self.__dict__)


class MoselWarning(UserWarning):
    """A condition worth knowing that does not stop mosel: a stale profile, a poor cost model."""


class QueueFullError(MoselError, RuntimeError):
    """Admission control: the model's queue holds as many requests as it is allowed to."""


class ExecutionError(MoselError, RuntimeError):
    """The model's code raised a ``BaseException`` that is not an ``Exception`` while serving a job.

    ``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit`` raised by a branch or the fusion
    on mosel's executor thread fails the jobs of that batch with this error (the original is its
    ``__cause__``); the executor goes on serving. Raised on the caller's own thread (a lone
    ``infer``), the original propagates to the caller unchanged.
    """


class ShutdownError(MoselError, RuntimeError):
    """The model's scheduler was closed before the job could run."""


class ReplicaError(MoselError, RuntimeError):
    """A remote replica serving the job died or did not answer in time (``mosel.ray``).

    Raised by the client of a scaled-out deployment once its retries are spent: the job may or
    may not have run; nothing of it comes back. The original error is ``__cause__``.
    """


def _rebuild(cls: type[BaseException], message: str, attributes: dict[str, Any]) -> BaseException:
    """Unpickle an error whose constructor takes its attributes as keyword-only arguments."""
    return cls(message, **attributes)
