"""Issue 9 regressions on the threaded server: real threads, orderings forced with events, no races.

Every wait has a timeout, so a regression shows as a failure, never as a hung suite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import random
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import mosel
from mosel import runtime, server
from mosel.slo import SLO
from mosel.testing import synthetic_profile

WAIT = 30.0


@mosel.multimodal
class Echo(nn.Module):
    """Output row = audio row + 1000 * video row; hooks let a test make one job misbehave."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.on_audio: Callable[[Tensor], object] | None = None
        self.on_fuse: Callable[[Mapping[str, Tensor], Tensor], object] | None = None

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        self.entered.set()
        assert self.gate.wait(WAIT)
        if self.on_audio is not None:
            replaced = self.on_audio(audio)
            if replaced is not None:
                return replaced  # type: ignore[return-value]
        return audio + self.bias

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        return video * 1000

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> object:
        out: Tensor = sum(features.values())  # type: ignore[assignment]
        if self.on_fuse is not None:
            replaced = self.on_fuse(features, out)
            if replaced is not None:
                return replaced
        return out


def _queued_job(srv: server.Server, inputs: dict[str, torch.Tensor]) -> Any:
    """A job as ``submit`` builds it (no SLO, a future), not yet admitted."""
    return srv.requests.job(inputs, SLO(), None, srv.clock.now(), server._Future())


def served(**config: object) -> Echo:
    model = Echo().eval()
    profile = synthetic_profile(
        model,
        branch_us={
            "audio": [50.0 + 5 * b for b in range(1, 9)],
            "video": [300.0 + 40 * b for b in range(1, 9)],
        },
        accuracy={"audio": 0.7, "video": 0.6, "audio+video": 0.9},
    )
    mosel.attach(model, profile, scheduler=mosel.SchedulerConfig(**config))  # type: ignore[arg-type]
    return model


def rows(n: int, base: float) -> dict[str, Tensor]:
    return {"audio": torch.arange(n, dtype=torch.float32)[:, None] + base, "video": torch.zeros(n, 1)}


def blocked(model: Echo) -> concurrent.futures.Future[mosel.Result]:
    """Occupy the executor with a one-row job held at the gate until the test opens it."""
    model.gate.clear()
    model.entered.clear()
    future = model.submit(rows(1, -1.0))
    assert model.entered.wait(WAIT)
    return future


def threads_of(model_server: server.Server) -> list[threading.Thread]:
    return [t for t in (model_server._thread, model_server._watchdog) if t is not None]


# ---------------------------------------------------------------- 1: rows never leak


def test_a_fusion_dropping_a_row_fails_alone_and_never_shifts_rows_in_a_merged_batch() -> None:
    model = served()
    model.on_fuse = lambda features, out: out[1:] if bool((features["audio"] < -50).any()) else None
    with pytest.raises(mosel.OutputError, match="returned 2 row\\(s\\) for 3 request"):
        model.infer({"audio": -100 - torch.arange(3.0)[:, None], "video": torch.zeros(3, 1)})
    gate = blocked(model)
    good = [model.submit(rows(2, 10.0 * i)) for i in range(3)]
    bad = model.submit({"audio": -100 - torch.arange(2.0)[:, None], "video": torch.zeros(2, 1)})
    more = [model.submit(rows(2, 100.0 + i)) for i in range(2)]
    model.gate.set()
    with pytest.raises(mosel.OutputError):
        bad.result(WAIT)
    for i, future in enumerate(good):
        torch.testing.assert_close(future.result(WAIT).output, rows(2, 10.0 * i)["audio"])
    for i, future in enumerate(more):
        torch.testing.assert_close(future.result(WAIT).output, rows(2, 100.0 + i)["audio"])
    gate.result(WAIT)
    assert mosel.stats(model).counters.get("batches_merged", 0) >= 1
    mosel.close(model)


# ---------------------------------------------------------------- 2: the executor never dies


def test_outputs_that_change_shape_with_the_row_count_fail_their_job_only() -> None:
    model = served()
    model.on_fuse = lambda features, out: out.squeeze()  # (1, 1) -> (): no batch dimension left
    gate = blocked(model)
    one = model.submit(rows(1, 5.0))
    model.gate.set()
    with pytest.raises(mosel.OutputError, match="cannot split"):
        one.result(WAIT)
    assert isinstance(gate.exception(WAIT), mosel.OutputError)  # one row too: the same fault
    model.on_fuse = None
    torch.testing.assert_close(model.submit(rows(3, 1.0)).result(WAIT).output, rows(3, 1.0)["audio"])
    mosel.close(model)


def test_chunks_that_do_not_concatenate_fail_the_job_not_the_executor() -> None:
    model = served()
    calls = iter(range(100))
    model.on_fuse = lambda features, out: torch.cat([out] * (1 + next(calls) % 2), dim=1)
    future = model.submit(rows(17, 0.0))  # three chunks of 6, 6, 5 rows with different widths
    with pytest.raises(mosel.OutputError, match="do not concatenate"):
        future.result(WAIT)
    model.on_fuse = None
    torch.testing.assert_close(model.submit(rows(17, 3.0)).result(WAIT).output, rows(17, 3.0)["audio"])
    mosel.close(model)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_a_base_exception_in_a_branch_fails_its_job_and_the_executor_goes_on(exc: BaseException) -> None:
    model = served()
    gate = blocked(model)

    def explode(audio: Tensor) -> None:
        if bool((audio == 42).any()):
            raise exc

    model.on_audio = explode
    victim = model.submit(rows(1, 42.0))
    model.gate.set()
    gate.result(WAIT)
    with pytest.raises(mosel.ExecutionError) as info:
        victim.result(WAIT)
    assert info.value.__cause__ is exc
    torch.testing.assert_close(model.submit(rows(2, 7.0)).result(WAIT).output, rows(2, 7.0)["audio"])
    mosel.close(model)


class RacyFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """Cancelled by its caller between mosel's check and mosel's call (a forced interleaving)."""

    def set_exception(self, exception: BaseException | None) -> None:
        self.cancel()
        super().set_exception(exception)

    def set_result(self, result: object) -> None:
        self.cancel()
        super().set_result(result)


def test_a_cancel_racing_with_mosel_resolving_the_job_is_harmless() -> None:
    model = served()
    srv = runtime._state(model).serve(model)
    job = _queued_job(srv, rows(1, 0.0))
    job.payload.future = RacyFuture()
    srv._fail([(job, mosel.ShutdownError("x"))])  # used to raise InvalidStateError
    assert job.payload.future.cancelled()
    racy = RacyFuture()
    server._resolve_future(racy, result=None)
    assert racy.cancelled()
    torch.testing.assert_close(model.infer(rows(2, 1.0)).output, rows(2, 1.0)["audio"])
    mosel.close(model)


class _WatchedLock:
    """The server's lock, telling the test when ``thread`` is about to wait for it."""

    def __init__(self, lock: Any, thread: threading.Thread) -> None:
        self.lock, self.thread, self.wanted = lock, thread, threading.Event()

    def __enter__(self) -> None:
        if threading.current_thread() is self.thread:
            self.wanted.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def acquire(self, *args: Any) -> bool:
        return bool(self.lock.acquire(*args))

    def release(self) -> None:
        self.lock.release()


@pytest.mark.parametrize("when", ["before dispatch", "while the executor dispatches", "after dispatch"])
def test_a_job_whose_cancel_succeeds_is_never_computed(when: str) -> None:
    """``future.cancel()`` True means withdrawn: never computed, whatever the interleaving with dispatch.

    The executor is paused inside its dispatch (holding the server's lock) and the cancel is
    made before, during (it must wait for the lock) or after it.
    """
    model = served()
    computed: list[float] = []
    model.on_audio = lambda audio: computed.extend(audio[:, 0].tolist())  # type: ignore[func-returns-value]
    gate = blocked(model)
    srv = runtime._state(model).serve(model)
    victim = model.submit(rows(1, 42.0))
    dispatching, go = threading.Event(), threading.Event()
    dispatch = srv.scheduler.dispatch

    def paused(now: float) -> Any:
        dispatching.set()
        assert go.wait(WAIT)
        return dispatch(now)

    srv.scheduler.dispatch = paused  # type: ignore[method-assign]
    outcome: list[bool] = []
    canceller = threading.Thread(target=lambda: outcome.append(victim.cancel()))
    if when == "before dispatch":
        canceller.start()
        canceller.join(WAIT)
        go.set()
        model.gate.set()
    elif when == "while the executor dispatches":
        model.gate.set()
        assert dispatching.wait(WAIT)
        watched = _WatchedLock(srv.lock, canceller)
        srv.lock = watched  # type: ignore[assignment]
        canceller.start()
        assert watched.wanted.wait(WAIT)  # the cancel waits for the lock the dispatch holds
        go.set()
        canceller.join(WAIT)
        srv.lock = watched.lock
    else:
        go.set()
        model.gate.set()
        wait = time.monotonic() + WAIT
        while not victim.running() and not victim.done() and time.monotonic() < wait:
            time.sleep(0.001)
        canceller.start()
        canceller.join(WAIT)
    gate.result(WAIT)
    model.on_audio = None
    model.submit(rows(1, 7.0)).result(WAIT)  # the executor is past the victim
    (cancelled,) = outcome
    assert cancelled == (42.0 not in computed), (when, cancelled, computed)
    if cancelled:
        assert victim.cancelled() and mosel.stats(model).counters["cancelled"] == 1
    else:
        torch.testing.assert_close(victim.result(WAIT).output, rows(1, 42.0)["audio"])
    mosel.close(model)


def test_the_callbacks_a_cancel_triggers_run_outside_the_models_lock() -> None:
    """A done-callback that waits for another thread using the model cannot deadlock a cancel."""
    model = served()
    gate = blocked(model)
    srv = runtime._state(model).serve(model)
    victim = model.submit(rows(1, 3.0))
    served_meanwhile: list[mosel.Result] = []

    def wait_for_another_caller(future: concurrent.futures.Future[mosel.Result]) -> None:
        assert not srv.lock._is_owned()  # type: ignore[attr-defined]
        other = threading.Thread(target=lambda: served_meanwhile.append(srv.load()))  # takes the lock
        other.start()
        other.join(WAIT)

    victim.add_done_callback(wait_for_another_caller)
    assert victim.cancel()
    assert len(served_meanwhile) == 1
    model.gate.set()
    gate.result(WAIT)
    assert mosel.stats(model).counters["cancelled"] == 1
    mosel.close(model)


# ---------------------------------------------------------------- 3: Ctrl-C in a lone infer


def test_ctrl_c_during_a_lone_infer_leaves_the_model_usable() -> None:
    model = served()

    def interrupt(audio: Tensor) -> None:
        raise KeyboardInterrupt

    model.on_audio = interrupt
    with pytest.raises(KeyboardInterrupt):
        model.infer(rows(2, 0.0))  # on this thread: the device was idle
    model.on_audio = None
    srv = runtime._state(model).server
    assert srv is not None and srv.scheduler.in_flight is None
    torch.testing.assert_close(model.infer(rows(2, 1.0)).output, rows(2, 1.0)["audio"])
    torch.testing.assert_close(model.submit(rows(2, 2.0)).result(WAIT).output, rows(2, 2.0)["audio"])
    assert mosel.stats(model).counters["failed_error"] == 1
    mosel.close(model)


def test_ctrl_c_while_waiting_in_the_queue_takes_the_job_out() -> None:
    model = served()
    gate = blocked(model)
    srv = runtime._state(model).serve(model)
    waiting: list[concurrent.futures.Future[mosel.Result]] = []
    original = concurrent.futures.Future.result

    def interrupted(self: concurrent.futures.Future[mosel.Result], timeout: float | None = None) -> object:
        waiting.append(self)
        raise KeyboardInterrupt

    concurrent.futures.Future.result = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            model.infer(rows(1, 0.0))
    finally:
        concurrent.futures.Future.result = original  # type: ignore[method-assign]
    assert waiting[0].cancelled() and not srv.scheduler.queue
    model.gate.set()
    gate.result(WAIT)
    mosel.close(model)


# ---------------------------------------------------------------- 4: fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_serves_a_model_its_parent_was_serving() -> None:
    model = served()
    model.submit(rows(2, 0.0)).result(WAIT)  # the parent's threads are running
    gate = blocked(model)  # and the parent's lock and queue are busy at the fork
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded process forked"
        pid = os.fork()
    if pid == 0:  # the child: no mosel thread exists here
        code = 1
        try:
            signal.alarm(20)
            model.gate.set()
            out = model.submit(rows(3, 5.0)).result(WAIT).output
            ok = torch.equal(out, rows(3, 5.0)["audio"])
            ok = ok and torch.equal(model.infer(rows(2, 9.0)).output, rows(2, 9.0)["audio"])
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    model.gate.set()
    gate.result(WAIT)
    assert os.waitstatus_to_exitcode(status) == 0
    mosel.close(model)


# ---------------------------------------------------------------- 5: re-entrancy


@pytest.mark.parametrize("path", ["lone", "executor"])
def test_infer_and_close_from_inside_a_branch_never_deadlock(path: str) -> None:
    model = served()
    inner: list[mosel.Result] = []

    def nested(audio: Tensor) -> None:
        if bool((audio == 7).any()):
            inner.append(model.infer(rows(2, 50.0), deadline_ms=1e4))
            inner.append(model.submit(rows(1, 60.0)).result(WAIT))

    model.on_audio = nested
    if path == "lone":
        result = model.infer(rows(1, 7.0))
    else:
        gate = blocked(model)
        future = model.submit(rows(1, 7.0))
        model.gate.set()
        result = future.result(WAIT)
        gate.result(WAIT)
    torch.testing.assert_close(result.output, rows(1, 7.0)["audio"])
    torch.testing.assert_close(inner[0].output, rows(2, 50.0)["audio"])
    torch.testing.assert_close(inner[1].output, rows(1, 60.0)["audio"])

    def closing(audio: Tensor) -> None:
        if bool((audio == 8).any()):
            mosel.close(model)

    model.on_audio = closing
    if path == "lone":
        model.infer(rows(1, 8.0))
    else:
        gate = blocked(model)
        future = model.submit(rows(1, 8.0))
        model.gate.set()
        future.result(WAIT)
        gate.result(WAIT)
    model.on_audio = None
    torch.testing.assert_close(model.infer(rows(1, 3.0)).output, rows(1, 3.0)["audio"])  # serves again
    mosel.close(model)


def test_a_done_callback_on_the_executor_thread_may_call_infer() -> None:
    model = served()
    gate = blocked(model)
    got: concurrent.futures.Future[mosel.Result] = concurrent.futures.Future()
    future = model.submit(rows(1, 1.0))
    future.add_done_callback(lambda _: got.set_result(model.infer(rows(1, 2.0))))
    model.gate.set()
    torch.testing.assert_close(got.result(WAIT).output, rows(1, 2.0)["audio"])
    gate.result(WAIT)
    mosel.close(model)


# ---------------------------------------------------------------- 7: a stalled device


def test_a_stalled_batch_does_not_hold_a_waiting_caller_past_its_deadline() -> None:
    model = served()
    gate = blocked(model)  # predicted at well under a millisecond; held until the test opens it
    tight = model.submit(rows(1, 3.0), deadline_ms=20.0)
    # Resolved while the batch ahead is still stalled: it cannot be the device freeing up.
    with pytest.raises(mosel.DeadlineError):
        tight.result(WAIT)
    assert not model.gate.is_set()
    model.gate.set()
    gate.result(WAIT)
    mosel.close(model)


# ---------------------------------------------------------------- 13-15: races and leaks


def test_concurrent_first_use_starts_exactly_one_server(monkeypatch: pytest.MonkeyPatch) -> None:
    model = served()
    created: list[server.Server] = []
    both_inside = threading.Barrier(2)
    real_init = server.Server.__init__

    def slow_init(self: server.Server, *args: object, **kwargs: object) -> None:
        created.append(self)
        with contextlib.suppress(threading.BrokenBarrierError):  # alone: times out
            both_inside.wait(timeout=0.5)
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server.Server, "__init__", slow_init)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = list(pool.map(lambda i: model.submit(rows(1, float(i))), range(4)))
    for i, future in enumerate(futures):
        torch.testing.assert_close(future.result(WAIT).output, rows(1, float(i))["audio"])
    assert len(created) == 1
    mosel.close(model)


def test_close_racing_with_a_first_submit_orphans_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    model = served()
    inside, release = threading.Event(), threading.Event()
    created: list[server.Server] = []
    real_init = server.Server.__init__

    def held_init(self: server.Server, *args: object, **kwargs: object) -> None:
        created.append(self)
        inside.set()
        assert release.wait(WAIT)
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server.Server, "__init__", held_init)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        submitted = pool.submit(model.submit, rows(1, 0.0))
        assert inside.wait(WAIT)
        closing = pool.submit(mosel.close, model)  # waits for the server being made, then closes it
        release.set()
        with contextlib.suppress(mosel.ShutdownError):  # served, or refused after the close
            submitted.result(WAIT).result(WAIT)
        closing.result(WAIT)
    (made,) = created
    assert made.closed
    for thread in threads_of(made):
        thread.join(WAIT)
        assert not thread.is_alive()


def test_a_model_that_served_is_collected_and_its_threads_end() -> None:
    model = served()
    model.submit(rows(2, 0.0)).result(WAIT)
    srv = runtime._state(model).server
    assert srv is not None
    threads = threads_of(srv)
    assert all(t.is_alive() for t in threads)
    ref = weakref.ref(model)
    del model, srv
    gc.collect()
    assert ref() is None
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


# ---------------------------------------------------------------- 17: pytree outputs on every path


@mosel.multimodal
class Pairs(nn.Module):
    """Branches return (features, squares) tuples; fusion returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        return audio + self.bias, audio**2

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> tuple[Tensor, Tensor]:
        return video * 1000, video**2

    @mosel.fusion
    def fuse(self, features: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, object]:
        total = sum(f[0] for f in features.values())
        return {"sum": total, "parts": (len(features) * torch.ones_like(total),)}


def test_tuple_features_and_dict_outputs_are_served_on_every_path() -> None:
    model = Pairs().eval()
    profile = synthetic_profile(
        model,
        branch_us={"audio": [50.0 * b for b in range(1, 5)], "video": [400.0 * b for b in range(1, 5)]},
        accuracy={"audio": 0.7, "video": 0.6, "audio+video": 0.9},
    )
    mosel.attach(model, profile)

    def expected(inputs: dict[str, Tensor], result: mosel.Result) -> dict[str, Tensor]:
        sums, counts = [], []
        for i, config in enumerate(result.modalities):
            row = sum(inputs["audio"][i] if m == "audio" else inputs["video"][i] * 1000 for m in config)
            sums.append(row)
            counts.append(torch.full_like(inputs["audio"][i], len(config)))
        return {"sum": torch.stack(sums), "parts": (torch.stack(counts),)}

    def check(inputs: dict[str, Tensor], result: mosel.Result) -> None:
        torch.testing.assert_close(result.output, expected(inputs, result))

    lone = {"audio": torch.arange(4.0)[:, None], "video": torch.ones(4, 1)}
    check(lone, model.infer(lone))  # alone, all modalities
    mixed = model.infer(lone, deadline_ms=0.55, min_accuracy=0.72, best_effort=True)
    assert len(set(mixed.modalities)) > 1  # a mixed strategy: groups joined back
    check(lone, mixed)
    big = {"audio": torch.arange(11.0)[:, None], "video": torch.ones(11, 1)}
    check(big, model.infer(big))  # chunked
    futures = [
        model.submit({"audio": torch.full((2, 1), float(i)), "video": torch.ones(2, 1)}) for i in range(6)
    ]
    for i, future in enumerate(futures):  # merged when they queue up
        check({"audio": torch.full((2, 1), float(i)), "video": torch.ones(2, 1)}, future.result(WAIT))
    mosel.close(model)


# ---------------------------------------------------------------- 20-22: values and lifecycle


@pytest.mark.parametrize("deadline", [10**400, np.int64(50), np.float32(50.0), 50])
def test_any_real_number_is_a_deadline(deadline: object) -> None:
    model = served()
    result = model.infer(rows(1, 0.0), deadline_ms=deadline, min_accuracy=np.float32(0.5))  # type: ignore[arg-type]
    torch.testing.assert_close(result.output, rows(1, 0.0)["audio"])
    mosel.close(model)


def test_stats_survive_close_and_completion_is_stamped_at_hand_over() -> None:
    model = served()
    result = model.infer(rows(2, 0.0))
    assert result.completion_ms >= result.measured_latency_ms
    mosel.close(model)
    snap = mosel.stats(model)
    assert snap.counters["submitted"] == 1 and snap.counters["served_on_time"] == 1
    model.infer(rows(2, 0.0))
    assert mosel.stats(model).counters["submitted"] == 2


def test_exit_waits_at_most_five_seconds_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    models = [served() for _ in range(3)]
    gates = [blocked(m) for m in models]
    budgets: list[float] = []
    real_join = threading.Thread.join

    def join(self: threading.Thread, timeout: float | None = None) -> None:
        budgets.append(float("inf") if timeout is None else timeout)
        real_join(self, 0.01)

    monkeypatch.setattr(threading.Thread, "join", join)
    server._close_all()
    monkeypatch.undo()
    assert budgets and max(budgets) <= 5.0
    for model, gate in zip(models, gates):
        model.gate.set()
        gate.result(WAIT)
        mosel.close(model)


# ---------------------------------------------------------------- the stress test


def poison(audio: Tensor) -> None:
    if bool(torch.isnan(audio).any()):
        raise ValueError("poisoned")


def misfit(features: Mapping[str, Tensor], out: Tensor) -> Tensor | None:
    return out[1:] if "audio" in features and bool((features["audio"] == 666).any()) else None


def test_sixty_four_threads_of_hostile_traffic_all_resolve_with_their_own_rows() -> None:
    model = served(max_queued_requests=10_000)
    model.on_audio = poison
    model.on_fuse = misfit
    outcomes: dict[int, str] = {}
    barrier = threading.Barrier(64)

    def client(i: int) -> None:
        rng = random.Random(i)
        barrier.wait(WAIT)
        for j in range(6):
            tag = 10_000.0 * i + 100.0 * j
            n = rng.randint(1, 12)
            inputs = rows(n, tag)
            kind = rng.choice(["poison", "misfit"] + ["plain"] * 6)
            if kind == "poison":
                inputs["audio"][0, 0] = float("nan")
            elif kind == "misfit":
                inputs["audio"][-1, 0] = 666.0
            slo = {
                "deadline_ms": rng.choice([None, 0.05, 5.0, 200.0]),
                "min_accuracy": rng.choice([None, 0.6, 0.75, 0.95]),
                "best_effort": rng.random() < 0.3,
            }
            how = rng.choice(["infer", "submit", "ainfer", "cancel"])
            key = i * 100 + j
            try:
                if how == "infer":
                    result = model.infer(inputs, **slo)  # type: ignore[arg-type]
                elif how == "ainfer":
                    result = asyncio.run(model.ainfer(inputs, **slo))  # type: ignore[arg-type]
                else:
                    future = model.submit(inputs, **slo)  # type: ignore[arg-type]
                    if how == "cancel" and future.cancel():
                        outcomes[key] = "cancelled"
                        continue
                    result = future.result(WAIT)
            except mosel.MoselError as exc:
                outcomes[key] = type(exc).__name__
                continue
            except ValueError as exc:
                assert "poisoned" in str(exc) and kind == "poison"
                outcomes[key] = "poisoned"
                continue
            # Served: a marked row, if any, was not computed with audio (its marker never ran).
            mine = torch.where(
                torch.tensor(["audio" in c for c in result.modalities]), inputs["audio"][:, 0], torch.zeros(n)
            )
            assert result.output.shape == (n, 1)
            torch.testing.assert_close(result.output[:, 0], mine, equal_nan=True)  # every row is its own
            floor = slo["min_accuracy"]
            assert floor is None or result.expected_accuracy >= floor  # type: ignore[operator]
            outcomes[key] = "ok"

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        for future in [pool.submit(client, i) for i in range(64)]:
            future.result(120)
    assert len(outcomes) == 64 * 6
    assert "ok" in outcomes.values() and "OutputError" in outcomes.values()
    srv = runtime._state(model).server
    assert srv is not None
    threads = threads_of(srv)
    mosel.close(model, timeout=WAIT)
    for thread in threads:
        assert not thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("mosel-") and t in threads]


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("fork and signals", allow_module_level=True)


# ---------------------------------------------------------------- found by hostile probing


def test_a_done_callback_raising_system_exit_stops_nothing() -> None:
    model = served()
    gate = blocked(model)
    futures = [model.submit(rows(1, float(i))) for i in range(4)]

    def leave(_: object) -> None:
        raise SystemExit(1)

    futures[0].add_done_callback(leave)
    model.gate.set()
    for i, future in enumerate(futures):
        torch.testing.assert_close(future.result(WAIT).output, rows(1, float(i))["audio"])
    gate.result(WAIT)
    srv = runtime._state(model).server
    assert srv is not None and all(t.is_alive() for t in threads_of(srv))
    torch.testing.assert_close(model.submit(rows(2, 5.0)).result(WAIT).output, rows(2, 5.0)["audio"])
    mosel.close(model)


def test_an_interrupt_between_admission_and_execution_leaves_the_model_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = served()
    real = server.Server._execute
    calls = {"n": 0}

    def interrupted(self: server.Server, batch: object, *rest: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # after start_alone, before the model runs
        return real(self, batch, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(server.Server, "_execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.infer(rows(2, 0.0))
    srv = runtime._state(model).server
    assert srv is not None and srv.scheduler.in_flight is None
    torch.testing.assert_close(model.infer(rows(2, 1.0)).output, rows(2, 1.0)["audio"])
    torch.testing.assert_close(model.submit(rows(1, 2.0)).result(WAIT).output, rows(1, 2.0)["audio"])
    mosel.close(model)


def test_ctrl_c_inside_the_scheduler_is_held_until_its_state_is_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = served()
    gate = blocked(model)
    srv = runtime._state(model).serve(model)
    real = srv.scheduler.admit
    seen: list[object] = []

    def admit_then_signal(job: object, now: float) -> object:
        out = real(job, now)  # type: ignore[arg-type]
        seen.append(signal.getsignal(signal.SIGINT))  # mosel's holding handler
        signal.raise_signal(signal.SIGINT)  # arrives while the queue is being changed
        srv.scheduler.queue  # noqa: B018  (more bytecode before the block ends)
        return out

    # Ctrl-C as Python sets it up (whatever an earlier test's library left installed).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(srv.scheduler, "admit", admit_then_signal)
    raised = False
    try:
        model.submit(rows(1, 3.0))
    except KeyboardInterrupt:
        raised = True
    finally:
        after = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, previous)
    assert raised, f"no KeyboardInterrupt; handlers seen in admit: {seen}, before the test: {previous!r}"
    assert len(seen) == 1 and seen[0] is not signal.default_int_handler  # held while admitting
    assert after is signal.default_int_handler  # put back as it was
    monkeypatch.undo()
    assert len(srv.scheduler.queue) == len(srv.scheduler.latency_us) == 0  # withdrawn, and whole
    after = model.submit(rows(1, 4.0))
    model.gate.set()
    torch.testing.assert_close(after.result(WAIT).output, rows(1, 4.0)["audio"])
    gate.result(WAIT)
    mosel.close(model)


def test_a_real_ctrl_c_in_a_lone_infer_is_held_in_the_scheduler_and_immediate_in_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = served()
    srv = runtime._state(model).serve(model)
    real = srv.scheduler.start_alone
    seen: list[str] = []

    def start_then_signal(job: object, now: float) -> object:
        out = real(job, now)  # type: ignore[arg-type]
        signal.raise_signal(signal.SIGINT)  # arrives while the lone batch is being started
        seen.append("after the signal, in the scheduler")
        return out

    def interrupted_in_the_branch(audio: Tensor) -> None:
        signal.raise_signal(signal.SIGINT)
        seen.append("after the signal, in the model")  # never: the model's code is interrupted at once

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(srv.scheduler, "start_alone", start_then_signal)
        with pytest.raises(KeyboardInterrupt):
            model.infer(rows(1, 1.0))
        assert seen == ["after the signal, in the scheduler"]  # held until the state was whole
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        monkeypatch.undo()
        model.on_audio = interrupted_in_the_branch
        with pytest.raises(KeyboardInterrupt):
            model.infer(rows(1, 2.0))
        assert seen == ["after the signal, in the scheduler"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back as it was
        mine: list[int] = []

        def installs_its_own(audio: Tensor) -> None:  # the model's code sets its own handler
            signal.signal(signal.SIGINT, lambda signum, frame: mine.append(signum))

        model.on_audio = installs_its_own
        model.infer(rows(1, 3.0))
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # kept, not undone
        signal.raise_signal(signal.SIGINT)
        assert mine == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
    model.on_audio = None
    assert srv.scheduler.in_flight is None and not srv.scheduler.queue
    torch.testing.assert_close(model.infer(rows(2, 4.0)).output, rows(2, 4.0)["audio"])
    mosel.close(model)


def test_a_failure_posted_by_an_interrupted_thread_is_resolved_by_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = served()
    srv = runtime._state(model).serve(model)
    stranded = _queued_job(srv, rows(1, 0.0))
    with srv.lock:
        srv._post(
            [
                (
                    stranded,
                    mosel.DeadlineError(
                        "x", deadline_ms=1.0, predicted_ms=2.0, best_accuracy_within_deadline=None
                    ),
                )
            ]
        )
    # the thread that decided it was interrupted before resolving it
    assert not stranded.payload.future.done()
    model.infer(rows(1, 1.0))  # any later call through the server resolves it
    assert isinstance(stranded.payload.future.exception(0), mosel.DeadlineError)
    mosel.close(model)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_holds_the_lock_does_not_hang_the_child() -> None:
    model = served()
    model.submit(rows(1, 0.0)).result(WAIT)
    srv = runtime._state(model).server
    assert srv is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with srv.lock:
            held.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(WAIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)
            out = model.submit(rows(2, 6.0)).result(WAIT).output
            gc.collect()  # the parent's server, now unreachable, is finalised here
            ok = torch.equal(out, rows(2, 6.0)["audio"]) and torch.equal(
                model.infer(rows(1, 7.0)).output, rows(1, 7.0)["audio"]
            )
            code = 0 if ok else 2
        finally:
            os._exit(code)
    release.set()
    holder.join(WAIT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    mosel.close(model)


def test_a_merged_job_output_holds_only_its_own_rows() -> None:
    model = served()
    gate = blocked(model)
    futures = [model.submit(rows(2 + i, 10.0 * i)) for i in range(3)]
    model.gate.set()
    gate.result(WAIT)
    assert mosel.stats(model).counters.get("batches_merged", 0) >= 1
    for i, future in enumerate(futures):
        out = future.result(WAIT).output
        assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
        torch.testing.assert_close(out, rows(2 + i, 10.0 * i)["audio"])
    mosel.close(model)


def test_a_base_exception_fails_only_its_own_job_in_a_merged_batch() -> None:
    model = served()
    gate = blocked(model)

    def leave(audio: Tensor) -> None:
        if bool((audio == 42).any()):
            raise SystemExit(2)

    model.on_audio = leave
    futures = [model.submit(rows(1, 41.0 + i)) for i in range(3)]  # the middle one holds 42
    model.gate.set()
    gate.result(WAIT)
    torch.testing.assert_close(futures[0].result(WAIT).output, rows(1, 41.0)["audio"])
    assert isinstance(futures[1].exception(WAIT), mosel.ExecutionError)
    torch.testing.assert_close(futures[2].result(WAIT).output, rows(1, 43.0)["audio"])
    mosel.close(model)


def test_jobs_with_inputs_of_other_dtypes_are_not_merged_or_cast() -> None:
    model = served()
    gate = blocked(model)
    halves = model.submit(
        {"audio": torch.ones(2, 1, dtype=torch.float64), "video": torch.zeros(2, 1, dtype=torch.float64)}
    )
    singles = model.submit(rows(2, 3.0))
    model.gate.set()
    gate.result(WAIT)
    assert halves.result(WAIT).output.dtype == torch.float64
    assert singles.result(WAIT).output.dtype == torch.float32
    mosel.close(model)


def test_a_nested_call_is_served_when_the_queue_is_full_and_counted() -> None:
    model = served(max_queued_requests=2)
    inner: list[mosel.Result] = []

    def nested(audio: Tensor) -> None:
        if bool((audio == 9).any()):
            inner.append(model.infer(rows(3, 50.0)))  # 3 > the queue's bound: never queued anyway

    model.on_audio = nested
    torch.testing.assert_close(model.infer(rows(1, 9.0)).output, rows(1, 9.0)["audio"])
    torch.testing.assert_close(inner[0].output, rows(3, 50.0)["audio"])
    counters = mosel.stats(model).counters
    assert counters["served_inline"] == 1 and counters["served_on_time"] == 2
    mosel.close(model)


@pytest.mark.parametrize(
    "deadline", [__import__("decimal").Decimal("50"), torch.tensor(50.0), np.array(50.0), np.float16(50)]
)
def test_other_real_numbers_are_deadlines_too(deadline: object) -> None:
    model = served()
    torch.testing.assert_close(model.infer(rows(1, 0.0), deadline_ms=deadline).output, rows(1, 0.0)["audio"])  # type: ignore[arg-type]
    mosel.close(model)


def test_ctrl_c_of_one_waiting_caller_does_not_fail_the_jobs_it_shares_a_batch_with() -> None:
    model = served()
    gate = blocked(model)
    other = model.submit(rows(2, 5.0))
    srv = runtime._state(model).serve(model)
    mine = _queued_job(srv, rows(1, 9.0))
    with srv.lock:
        srv._admit_locked(mine)
    model.gate.set()
    gate.result(WAIT)
    srv._withdraw(mine, None, KeyboardInterrupt())  # the caller of `mine` pressed Ctrl-C meanwhile
    torch.testing.assert_close(other.result(WAIT).output, rows(2, 5.0)["audio"])
    torch.testing.assert_close(model.infer(rows(1, 1.0)).output, rows(1, 1.0)["audio"])
    mosel.close(model)


def test_an_interrupt_while_resolving_failures_strands_none(monkeypatch: pytest.MonkeyPatch) -> None:
    model = served()
    srv = runtime._state(model).serve(model)
    jobs = [_queued_job(srv, rows(1, float(i))) for i in range(3)]
    real = server._resolve_future
    calls = {"n": 0}

    def interrupted(future: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(future, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server, "_resolve_future", interrupted)
    with pytest.raises(KeyboardInterrupt):
        srv._fail([(j, mosel.ShutdownError("x")) for j in jobs])
    monkeypatch.undo()
    srv._drain()  # the next thread through resolves what is left
    assert all(isinstance(j.payload.future.exception(0), mosel.ShutdownError) for j in jobs)
    mosel.close(model)


def test_results_say_whether_the_deadline_was_met_and_batches_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = served()
    with caplog.at_level("DEBUG", logger="mosel"):
        assert model.infer(rows(1, 0.0)).deadline_met is None
        assert model.infer(rows(1, 0.0), deadline_ms=10_000.0).deadline_met is True
    assert any("batch of 1 job(s), 1 row(s)" in r.getMessage() for r in caplog.records)
    mosel.close(model)
