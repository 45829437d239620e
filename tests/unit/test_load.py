"""A replica's load report (``Scheduler.load``, ``mosel.load``) on a virtual clock."""

from __future__ import annotations

import itertools
import math
import pickle
import time

import pytest

import mosel
from mosel.clock import VirtualClock
from mosel.scheduler import Job, Scheduler, SchedulerConfig

from .helpers import Tiny, tiny_inputs, tiny_profile

ALL = frozenset({"audio", "video", "text"})


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def job(at: float, n: int = 4, deadline_ms: float | None = 50.0, floor: float | None = 0.6) -> Job:
    return Job(n=n, available=ALL, arrival=at, deadline_ms=deadline_ms, min_accuracy=floor)


def test_an_idle_scheduler_reports_an_empty_load(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True))
    load = scheduler.load(0.0, at_s=12.5)
    assert load == mosel.Load(
        drain_ms=0.0,
        queued_jobs=0,
        queued_requests=0,
        latency_margin=scheduler.tail.margin,
        overhead_ms=0.0,
        degraded_share=0.0,
        at_s=12.5,
    )
    before = time.time()
    assert before <= scheduler.load(0.0).at_s <= time.time()  # wall clock by default


def test_drain_grows_with_queued_work_and_shrinks_as_batches_finish(profile: mosel.Profile) -> None:
    clock = VirtualClock()
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True, batching=False))
    drains = [scheduler.load(clock.now()).drain_ms]
    for _ in range(4):
        scheduler.admit(job(clock.now(), deadline_ms=None, floor=None), clock.now())
        drains.append(scheduler.load(clock.now()).drain_ms)
    assert drains[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(drains))
    load = scheduler.load(clock.now())
    assert (load.queued_jobs, load.queued_requests) == (4, 16)
    # Queued work is priced as the scheduler prices it: its columns, one task after another.
    assert load.drain_ms == pytest.approx(sum(int(t.lat[t.k]) for t in scheduler.queue) / 1000.0)

    batch, _ = scheduler.dispatch(clock.now())
    assert batch is not None
    running = scheduler.load(clock.now())
    assert running.queued_jobs == 3 and running.queued_requests == 12
    assert running.drain_ms == pytest.approx(load.drain_ms)  # the batch moved from queue to device
    halfway = clock.now() + batch.predicted_us / 2e6
    clock.advance_to(halfway)
    assert scheduler.load(clock.now()).drain_ms == pytest.approx(load.drain_ms - batch.predicted_us / 2000.0)

    while batch is not None:
        clock.advance_to(scheduler.busy_until)
        scheduler.complete(batch, clock.now(), batch.predicted_us)
        drains.append(scheduler.load(clock.now()).drain_ms)
        batch, _ = scheduler.dispatch(clock.now())
    assert all(b < a for a, b in itertools.pairwise(drains[4:]))
    assert scheduler.load(clock.now()).drain_ms == 0.0


def test_an_overrunning_batch_is_reported_and_expected_to_need_its_overrun_again(
    profile: mosel.Profile,
) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True, batching=False))
    for _ in range(2):
        scheduler.admit(job(0.0, deadline_ms=None, floor=None), 0.0)
    batch, _ = scheduler.dispatch(0.0)
    assert batch is not None
    queued_ms = int(scheduler.latency_us.sum()) / 1000.0
    predicted_end = batch.predicted_us / 1e6
    on_time = scheduler.load(predicted_end / 2)
    assert on_time.overrun_ms == 0.0
    assert on_time.drain_ms == pytest.approx(queued_ms + batch.predicted_us / 2000.0)
    assert scheduler.load(predicted_end).overrun_ms == 0.0
    for late_ms in (0.5, 20.0):
        load = scheduler.load(predicted_end + late_ms / 1000.0)
        assert load.overrun_ms == pytest.approx(late_ms)
        assert load.drain_ms == pytest.approx(queued_ms + late_ms)  # as long again as the overrun
    # The timer that fails doomed jobs during an overrun moves busy_until: the report is the same.
    scheduler.expire(predicted_end + 0.02)
    assert scheduler.load(predicted_end + 0.02).overrun_ms == pytest.approx(20.0)
    scheduler.complete(batch, predicted_end + 0.02, batch.predicted_us + 20_000)
    assert scheduler.load(predicted_end + 0.02).overrun_ms == 0.0  # nothing runs


def test_latency_correction_is_the_online_correction_weighted_by_profiled_time(
    profile: mosel.Profile,
) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True))
    assert scheduler.load(0.0).latency_correction == 1.0
    now = 0.0
    for _ in range(60):  # every batch takes twice its profiled time: the correction converges to 2
        scheduler.admit(job(now, deadline_ms=None, floor=None), now)
        batch, _ = scheduler.dispatch(now)
        assert batch is not None
        measured_us = 2.0 * scheduler.cost.latency_us(batch.merged.groups)
        now += measured_us / 1e6
        scheduler.complete(batch, now, measured_us)
        scheduler.handed_over(batch, now)
    load = scheduler.load(now)
    assert load.latency_correction == pytest.approx(2.0, rel=0.05)
    scheduler.correction["fusion"] = 1.0  # parts weigh by their profiled time
    assert 1.0 < scheduler.pricer.latency_correction < load.latency_correction


def test_latency_correction_ignores_parts_no_batch_measured(profile: mosel.Profile) -> None:
    # A replica twice as slow whose jobs never carry video: video's correction stays at its
    # prior 1, and weighing it in (video is most of the profiled time) reported about 1.47.
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True))
    now = 0.0
    for _ in range(60):
        audio_text = Job(
            n=4, available=frozenset({"audio", "text"}), arrival=now, deadline_ms=None, min_accuracy=None
        )
        scheduler.admit(audio_text, now)
        batch, _ = scheduler.dispatch(now)
        assert batch is not None
        measured_us = 2.0 * scheduler.cost.latency_us(batch.merged.groups)
        now += measured_us / 1e6
        scheduler.complete(batch, now, measured_us)
    assert scheduler.correction["video"] == 1.0
    assert scheduler.load(now).latency_correction == pytest.approx(2.0, rel=0.05)


def test_degraded_share_counts_jobs_served_below_their_best(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True))
    now = 0.0
    # A tight deadline forces a cheaper strategy; so does a cold start (the first arrival).
    for i, deadline_ms in enumerate((100.0, 0.6, 100.0, 0.6)):
        submitted = job(now, n=2, deadline_ms=deadline_ms, floor=0.5)
        scheduler.admit(submitted, now)
        batch, _ = scheduler.dispatch(now)
        assert batch is not None
        now = scheduler.busy_until
        scheduler.complete(batch, now, batch.predicted_us)
        assert Scheduler.degraded(submitted) == (deadline_ms < 1.0 or i == 0)
        now += 1.0
    assert scheduler.load(now).degraded_share == pytest.approx(0.75)


def test_load_validates_and_round_trips() -> None:
    load = mosel.Load(
        drain_ms=3.5, queued_jobs=2, queued_requests=9, latency_margin=1.2, overhead_ms=0.1,
        degraded_share=0.25, at_s=1.0,
    )  # fmt: skip
    assert mosel.Load.from_json(load.to_json()) == load
    assert pickle.loads(pickle.dumps(load)) == load
    assert load.age_s(3.0) == 2.0 and load.age_s(0.0) == 0.0
    with pytest.raises(mosel.InputError, match=r"Load.drain_ms .*-1"):
        mosel.Load(-1.0, 0, 0, 1.0, 0.0, 0.0, 0.0)
    with pytest.raises(mosel.InputError, match=r"Load.degraded_share"):
        mosel.Load(0.0, 0, 0, 1.0, 0.0, 1.5, 0.0)
    with pytest.raises(mosel.InputError, match=r"lacks \['at_s'\]"):
        mosel.Load.from_json({k: v for k, v in load.to_json().items() if k != "at_s"})
    stalled = mosel.Load(3.5, 2, 9, 1.2, 0.1, 0.25, 1.0, overrun_ms=4.0, latency_correction=1.5)
    assert mosel.Load.from_json(stalled.to_json()) == stalled
    # A report from a replica that predates overrun_ms and latency_correction still reads.
    old = {k: v for k, v in stalled.to_json().items() if k not in ("overrun_ms", "latency_correction")}
    assert mosel.Load.from_json(old) == load
    with pytest.raises(mosel.InputError, match=r"Load.overrun_ms"):
        mosel.Load(0.0, 0, 0, 1.0, 0.0, 0.0, 0.0, overrun_ms=-1.0)
    with pytest.raises(mosel.InputError, match=r"Load.latency_correction"):
        mosel.Load(0.0, 0, 0, 1.0, 0.0, 0.0, 0.0, latency_correction=0.0)
    for bad in (True, math.nan, math.inf, "0.5", None):  # JSON's true, a string, null: no share
        with pytest.raises(mosel.InputError, match=r"Load.degraded_share"):
            mosel.Load.from_json(load.to_json() | {"degraded_share": bad})
    for name in ("overrun_ms", "latency_correction"):
        for bad in (True, math.nan, math.inf, "1", None):
            with pytest.raises(mosel.InputError, match=rf"Load.{name}"):
                mosel.Load.from_json(load.to_json() | {name: bad})


class _PickledBefore:
    """Pickles as 0268d3f's Load did: its seven fields' values, before overrun_ms and latency_correction."""

    def __reduce__(self) -> tuple[object, ...]:
        return object.__new__, (mosel.Load,), [3.5, 2, 9, 1.2, 0.1, 0.25, 1.0]


def test_a_load_pickled_by_an_older_version_unpickles_with_the_new_fields_defaulted() -> None:
    load = pickle.loads(pickle.dumps(_PickledBefore()))
    assert load == mosel.Load(3.5, 2, 9, 1.2, 0.1, 0.25, 1.0)
    assert (load.overrun_ms, load.latency_correction) == (0.0, 1.0)
    stalled = mosel.Load(3.5, 2, 9, 1.2, 0.1, 0.25, 1.0, overrun_ms=4.0, latency_correction=1.5)
    assert pickle.loads(pickle.dumps(stalled)) == stalled


def test_mosel_load_of_a_model_before_and_while_serving() -> None:
    model = Tiny().eval()
    mosel.attach(model, tiny_profile(model))
    idle = mosel.load(model)
    assert (idle.drain_ms, idle.queued_jobs, idle.queued_requests) == (0.0, 0, 0)
    assert idle.latency_margin >= 1.0
    assert model.__dict__["_mosel_state"].server is None  # reading the load started nothing
    with mosel.serving(model):
        model.infer(tiny_inputs(3), deadline_ms=1000.0)
        served = mosel.load(model)
        # The first call is served at its cheapest: nothing watched yet rules out a flood.
        assert served.queued_requests == 0 and served.degraded_share == 1.0
    with pytest.raises(mosel.NotProfiledError):
        mosel.load(Tiny())
