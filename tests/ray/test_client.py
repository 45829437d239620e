"""mosel.ray.Client's waits, bounded by the job's deadline: fake handles, no Ray instance.

A fake handle scripts what each attempt does on a virtual clock (``mosel.ray.client.time`` is replaced
by it): when its replica dies, when an answer would come. Nothing here sleeps for real except
the asyncio tests, whose fake replicas never answer (they only bound the wait).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import ray.exceptions
from ray.serve.exceptions import RequestCancelledError

import mosel
import mosel.ray
from tests.unit.helpers import tiny_inputs

EPOCH = 1_000_000.0  # the virtual wall clock at the start of each test


class Clock:
    """Virtual time for mosel.ray: ``time()`` is wall clock, ``monotonic()`` counts from 0."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return self.now


@dataclass
class Outcome:
    """What one attempt does: at ``at_s`` (virtual, from the test's start) it raises or answers."""

    at_s: float
    answer: Any  # a BaseException to raise, or the value to return


@dataclass
class FakeResponse:
    clock: Clock
    outcome: Outcome
    waits: list[float] = field(default_factory=list)
    cancelled: bool = False

    def result(self, *, timeout_s: float | None = None) -> Any:
        assert timeout_s is not None and timeout_s > 0.0
        self.waits.append(timeout_s)
        if self.outcome.at_s - self.clock.now > timeout_s:
            self.clock.now += timeout_s
            raise TimeoutError("Timed out resolving to ObjectRef.")
        self.clock.now = max(self.clock.now, self.outcome.at_s)
        if isinstance(self.outcome.answer, BaseException):
            raise self.outcome.answer
        return self.outcome.answer

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeHandle:
    clock: Clock
    outcomes: list[Outcome]
    responses: list[FakeResponse] = field(default_factory=list)
    requests: list[mosel.ray.Request] = field(default_factory=list)

    def remote(self, request: mosel.ray.Request) -> FakeResponse:
        self.requests.append(request)
        response = FakeResponse(self.clock, self.outcomes[len(self.responses)])
        self.responses.append(response)
        return response


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(mosel.ray.client, "time", clock)
    return clock


def died() -> BaseException:
    return ray.exceptions.ActorDiedError()


def client(clock: Clock, outcomes: list[Outcome], **options: Any) -> tuple[mosel.ray.Client, FakeHandle]:
    handle = FakeHandle(clock, outcomes)
    return mosel.ray.Client(handle, **options), handle  # type: ignore[arg-type]


def request(deadline_ms: float | None, clock: Clock, **slo: Any) -> mosel.ray.Request:
    return mosel.ray.Request(tiny_inputs(1), deadline_ms=deadline_ms, sent_at_s=clock.time(), **slo)


RESULT = SimpleNamespace(output="the result")


@pytest.mark.parametrize("restart_s", [12.0, 36.0, 2.5])
@pytest.mark.parametrize("killed_at_s", [0.2, 1.0, 1.9])
def test_a_dead_replica_holds_the_caller_no_longer_than_its_deadline_and_grace(
    clock: Clock, killed_at_s: float, restart_s: float
) -> None:
    """The replica dies under the job; the replacement takes ``restart_s`` to answer the retry."""
    the_client, handle = client(
        clock, [Outcome(killed_at_s, died()), Outcome(killed_at_s + restart_s, RESULT)]
    )
    with pytest.raises(
        mosel.DeadlineError, match=r"2000 ms deadline .*2100 ms spent.*ActorDiedError"
    ) as caught:
        the_client.infer(request(2000.0, clock))
    assert clock.now == pytest.approx(2.1)  # the deadline plus the default grace (100 ms), not the restart
    assert caught.value.predicted_ms == pytest.approx(2100.0)  # the time really spent
    assert len(handle.responses) == 2 and handle.responses[1].cancelled


def test_every_attempt_and_the_wait_for_a_replica_share_one_bound(clock: Clock) -> None:
    # Without a deadline, timeout_s bounds the whole call, its retries included.
    the_client, handle = client(
        clock, [Outcome(3.0, died()), Outcome(4.0, died()), Outcome(30.0, RESULT)], timeout_s=5.0
    )
    with pytest.raises(mosel.ReplicaError, match=r"timeout_s=5 s.*ActorDiedError"):
        the_client.infer(tiny_inputs(1))
    assert clock.now == pytest.approx(5.0)
    assert [r.waits for r in handle.responses] == [[5.0], [2.0], [1.0]]
    assert handle.responses[-1].cancelled
    # Best effort: the deadline may pass, timeout_s still ends the wait.
    clock.now = 0.0
    the_client, _ = client(clock, [Outcome(30.0, RESULT)], timeout_s=5.0)
    with pytest.raises(mosel.ReplicaError, match="timeout_s=5 s"):
        the_client.infer(request(100.0, clock, best_effort=True))
    assert clock.now == pytest.approx(5.0)
    # A deadline later than timeout_s: timeout_s comes first.
    clock.now = 0.0
    the_client, _ = client(clock, [Outcome(30.0, RESULT)], timeout_s=5.0)
    with pytest.raises(mosel.ReplicaError, match="timeout_s=5 s"):
        the_client.infer(request(20_000.0, clock))


def test_the_time_before_the_client_counts(clock: Clock) -> None:
    """A request stamped upstream 1.5 s ago has 0.5 s of its 2 s left: that, plus the grace."""
    the_client, handle = client(clock, [Outcome(10.0, RESULT)], grace_ms=50.0)
    upstream = mosel.ray.Request(tiny_inputs(1), deadline_ms=2000.0, sent_at_s=clock.time() - 1.5)
    with pytest.raises(mosel.DeadlineError) as caught:
        the_client.infer(upstream)
    assert handle.responses[0].waits == [pytest.approx(0.55)]
    assert caught.value.predicted_ms == pytest.approx(2050.0)
    # Spent entirely upstream: nothing is sent at all.
    late = mosel.ray.Request(tiny_inputs(1), deadline_ms=2000.0, sent_at_s=clock.time() - 2.5)
    the_client, handle = client(clock, [Outcome(0.0, RESULT)], grace_ms=50.0)
    with pytest.raises(mosel.DeadlineError):
        the_client.infer(late)
    assert handle.responses == []


def test_a_job_with_time_left_is_retried_and_without_is_a_replica_error(clock: Clock) -> None:
    the_client, handle = client(clock, [Outcome(0.5, died()), Outcome(0.9, RESULT)])
    assert the_client.infer(request(2000.0, clock)) is RESULT
    assert len(handle.requests) == 2 and handle.requests[0] is handle.requests[1]  # one stamp: one deadline
    # Lost after its deadline passed (inside the grace): no time to send it again.
    clock.now = 0.0
    the_client, handle = client(clock, [Outcome(2.05, died()), Outcome(2.06, RESULT)])
    with pytest.raises(mosel.ReplicaError, match="no time is left before its 2000 ms deadline"):
        the_client.infer(request(2000.0, clock))
    assert len(handle.responses) == 1
    # Out of retries.
    clock.now = 0.0
    the_client, _ = client(clock, [Outcome(0.1, died()), Outcome(0.2, died())], retries=1)
    with pytest.raises(mosel.ReplicaError, match="1 retries are spent"):
        the_client.infer(request(2000.0, clock))
    # The replica's own typed error comes back as it is (no retry, nothing to cancel).
    clock.now = 0.0
    refused = mosel.DeadlineError(
        "late", deadline_ms=2000.0, predicted_ms=2500.0, best_accuracy_within_deadline=None
    )
    the_client, handle = client(clock, [Outcome(0.1, refused)])
    with pytest.raises(mosel.DeadlineError, match="late"):
        the_client.infer(request(2000.0, clock))
    assert not handle.responses[0].cancelled


def test_client_options_are_checked() -> None:
    handle: Any = object()
    for bad in (
        {"grace_ms": -1.0},
        {"grace_ms": float("nan")},
        {"timeout_s": 0.0},
        {"retries": -1},
        {"retries": True},
    ):
        with pytest.raises(mosel.InputError, match="Client"):
            mosel.ray.Client(handle, **bad)


# ---------------------------------------------------------------------------- ainfer (asyncio)


@dataclass
class FakeAsyncResponse:
    """Raises ``answer`` after ``after_s`` (real seconds), or never answers when ``answer`` is None."""

    answer: BaseException | None
    after_s: float = 0.0
    cancelled: bool = False

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await asyncio.sleep(self.after_s)
        if self.answer is None:
            await asyncio.Event().wait()
        raise self.answer  # type: ignore[misc]

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeAsyncHandle:
    make: Callable[[int], FakeAsyncResponse]
    responses: list[FakeAsyncResponse] = field(default_factory=list)

    def remote(self, request: mosel.ray.Request) -> FakeAsyncResponse:
        response = self.make(len(self.responses))
        self.responses.append(response)
        return response


def test_ainfer_is_bounded_by_the_deadline_too() -> None:
    """The replica dies 50 ms in; the retry is never answered: DeadlineError at 300 + 50 ms."""
    handle = FakeAsyncHandle(lambda k: FakeAsyncResponse(died(), 0.05) if k == 0 else FakeAsyncResponse(None))
    the_client = mosel.ray.Client(handle, grace_ms=50.0, timeout_s=120.0)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(mosel.DeadlineError, match="300 ms deadline") as caught:
        asyncio.run(asyncio.wait_for(the_client.ainfer(tiny_inputs(1), deadline_ms=300.0), 60.0))
    assert caught.value.predicted_ms >= 350.0
    assert time.monotonic() - started < 30.0  # not timeout_s (a loose bound: the machine may be slow)
    assert len(handle.responses) == 2 and handle.responses[1].cancelled


def test_a_cancelled_ainfer_cancels_its_serve_request() -> None:
    handle = FakeAsyncHandle(lambda k: FakeAsyncResponse(None))
    the_client = mosel.ray.Client(handle)  # type: ignore[arg-type]

    async def run() -> None:
        task = asyncio.ensure_future(the_client.ainfer(tiny_inputs(1), deadline_ms=60_000.0))
        while not handle.responses:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert [r.cancelled for r in handle.responses] == [True]


@pytest.mark.parametrize(
    "withdrawn",
    [
        mosel.ShutdownError("the model's scheduler was closed before this job ran"),
        ray.exceptions.TaskCancelledError(),
        RequestCancelledError("abc"),
    ],
    ids=["ShutdownError", "TaskCancelledError", "RequestCancelledError"],
)
def test_a_job_its_replica_withdrew_is_sent_again_while_the_deadline_allows(
    clock: Clock, withdrawn: BaseException
) -> None:
    """A replica shutting down (or Serve cancelling the request) is a lost replica, never a Ray error."""
    for at_s in (0.1, 1.0, 1.9):
        clock.now = 0.0
        the_client, handle = client(clock, [Outcome(at_s, withdrawn), Outcome(at_s + 0.05, RESULT)])
        assert the_client.infer(request(2000.0, clock)) is RESULT
        assert len(handle.responses) == 2
    clock.now = 0.0
    the_client, handle = client(clock, [Outcome(0.1, withdrawn), Outcome(0.2, withdrawn)], retries=1)
    name = type(withdrawn).__name__
    spent = rf"withdrew it \({name}\) and its 1 retries are spent"
    with pytest.raises(mosel.ReplicaError, match=spent) as caught:
        the_client.infer(request(2000.0, clock))
    assert caught.value.__cause__ is withdrawn
    clock.now = 0.0  # after the deadline (inside the grace): no time to send it again
    the_client, handle = client(clock, [Outcome(2.05, withdrawn), Outcome(2.06, RESULT)])
    with pytest.raises(mosel.ReplicaError, match="no time is left"):
        the_client.infer(request(2000.0, clock))
    assert len(handle.responses) == 1
