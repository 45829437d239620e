"""The authors' online policy (benchmarks/paper_policy.py): hand-worked decisions and simulations.

Profiles are synthetic and linear, so every option's latency and accuracy can be read off:
``LINEAR`` has audio 1 ms and video 4 ms per request (accuracy 0.7 audio, 0.6 video, 0.9 both;
video alone is dominated), so one request has options [audio 1 ms 0.70, both 5 ms 0.90], two
requests [2 ms 0.70, 6 ms 0.80, 10 ms 0.90] and three [3 ms 0.70, 7 ms 0.767, 11 ms 0.833,
15 ms 0.90]. ``SMALL_STEPS`` has audio 1 ms and video 0.25 ms (video alone 0.4), so one request
with a floor of 0.5 has [audio 1 ms 0.70, both 1.25 ms 0.90]: steps small against the cheapest.
"""

from __future__ import annotations

import math
import random
import sys
import threading
from pathlib import Path

import pytest

import mosel
from mosel.jobs import Job
from mosel.policies import Policy
from mosel.scheduler import Scheduler
from mosel.testing import Passthrough, synthetic_profile

from ..unit.helpers import Tiny, tiny_inputs, tiny_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from paper_policy import Paper, PaperFixed, PaperPolicy, paper_policy

AV = frozenset({"audio", "video"})
MAX_BATCH = 8


def linear_profile(audio_us: float, video_us: float, video_accuracy: float) -> mosel.Profile:
    return synthetic_profile(
        Passthrough,
        branch_us={
            "audio": [audio_us * b for b in range(1, MAX_BATCH + 1)],
            "video": [video_us * b for b in range(1, MAX_BATCH + 1)],
        },
        accuracy={"audio": 0.7, "video": video_accuracy, "audio+video": 0.9},
    )


@pytest.fixture(scope="module")
def linear() -> mosel.Profile:
    return linear_profile(1000.0, 4000.0, 0.6)


@pytest.fixture(scope="module")
def small_steps() -> mosel.Profile:
    return linear_profile(1000.0, 250.0, 0.4)


def queued(
    profile: mosel.Profile,
    jobs: list[tuple[int, float, float | None]],
    policy: type[Policy],
    deterministic: bool = True,
) -> tuple[Scheduler, list[Job]]:
    """A scheduler whose queue holds ``jobs`` (n, deadline_ms, floor) at their top options, all
    arrived at t = 0, with ``policy`` installed afterwards (admission itself re-plans nothing)."""
    core = Scheduler(profile, mosel.SchedulerConfig(policy=Policy, deterministic=deterministic))
    out = []
    for n, deadline_ms, floor in jobs:
        job = Job(n=n, available=AV, arrival=0.0, deadline_ms=deadline_ms, min_accuracy=floor)
        core.admit(job, 0.0)
        out.append(job)
    core.policy = policy(core)
    for task in core.queue:
        core.set_option(task, len(task.lat) - 1)
    return core, out


def test_factory_names_and_knobs() -> None:
    assert (Paper.name, PaperFixed.name) == ("paper", "paper_fixed")
    assert issubclass(Paper, PaperPolicy) and issubclass(PaperFixed, PaperPolicy)
    assert Paper.defect and not PaperFixed.defect
    assert Paper.tolerance_ms == PaperFixed.tolerance_ms == 12.0
    strict = paper_policy(defect=False, tolerance_ms=0.0)
    assert strict.name == "paper_fixed" and strict.tolerance_ms == 0.0 and not strict.defect
    assert mosel.SchedulerConfig(policy=Paper).policy is Paper


def test_a_no_predicted_violation_keeps_every_job_most_accurate(linear: mosel.Profile) -> None:
    core = Scheduler(linear, mosel.SchedulerConfig(policy=Paper, deterministic=True))
    jobs = [
        Job(n=n, available=AV, arrival=0.0, deadline_ms=d, min_accuracy=None)
        for n, d in [(1, 20), (2, 30), (3, 40)]
    ]
    for job in jobs:
        assert core.admit(job, 0.0) == []
    # Tops 5 + 10 + 15 ms finish at 5, 15 and 30 ms: all on time.
    assert [t.k for t in core.queue] == [len(t.lat) - 1 for t in core.queue]
    counters = core.stats.snapshot().counters
    assert "violations_predicted" not in counters and "paper_solves" not in counters
    served = []
    now = 0.0
    while core.queue:
        batch, failures = core.dispatch(now)
        assert failures == [] and batch is not None and len(batch.tasks) == 1
        assert batch.tasks[0].k == len(batch.tasks[0].lat) - 1
        served.append(batch.tasks[0].job)
        now += batch.predicted_us / 1e6
        core.complete(batch, now, batch.predicted_us)
    assert served == jobs


def test_b_relaxation_reassigns_the_prefix_only_and_ignores_earlier_deadlines(linear: mosel.Profile) -> None:
    # A (1 request, due 3 ms) was lowered to audio (1 ms) earlier; B (2 requests, due 9 ms) is at
    # its top (10 ms) and finishes at 11 ms: the first late job, v = 1, diff = -2 ms. C (due 30 ms)
    # follows. Budget = 0.91 x (1 + 10 - 2) = 8.19 ms.
    #
    # By hand: over the padded points, accuracy is an affine function of latency for each job
    # (A: 0.7 + 0.05/ms x (lat - 1), B: 0.7 + 0.025/ms x (lat - 2)), so the unweighted mean
    # gains twice as much per ms given to A. The relaxation gives A the largest latency its
    # spline reaches: the cubic through (0, 1) (1, 5) (2, 5) (3, 5) ms peaks at x = 2 - 1/sqrt(3)
    # = 1.42 (5.26 ms); B gets the rest, 2.93 ms, at x = 0.29. Truncated: A -> 1 (both
    # modalities, 5 ms), B -> 0 (audio only, 2 ms); the prefix takes 7 ms <= 8.19 ms. A now
    # finishes at 5 ms, after its own deadline: the aggregate constraint does not see it.
    core, (a, b, c) = queued(linear, [(1, 3.0, None), (2, 9.0, None), (1, 30.0, None)], Paper)
    core.set_option(a.tasks[0], 0)
    assert list(core.finishes_us(0.0)) == [1000, 11000, 16000]

    assert core.policy.replan(0.0) == []

    assert (a.tasks[0].k, b.tasks[0].k, c.tasks[0].k) == (1, 0, 1)  # C untouched at its top
    finishes = core.finishes_us(0.0)
    assert list(finishes) == [5000, 7000, 12000]
    assert finishes[1] <= 0.91 * 9000
    assert finishes[0] > 3000  # A's own deadline is now violated
    counters = core.stats.snapshot().counters
    assert counters["violations_predicted"] == 1 and counters["paper_solves"] == 1
    assert "paper_fallbacks" not in counters and "paper_defect_hits" not in counters


def test_a_solve_past_its_wall_limit_falls_back_in_the_server(linear: mosel.Profile) -> None:
    # The queue of test (b); the solve is cut after its first iteration. random_fill: A is already
    # at its cheapest (diff stays -2 ms), lowering B credits 8 ms: covered, C untouched.
    hasty = type("Hasty", (PaperFixed,), {"time_limit_ms": 0.0})
    core, (a, b, c) = queued(
        linear, [(1, 3.0, None), (2, 9.0, None), (1, 30.0, None)], hasty, deterministic=False
    )
    core.set_option(a.tasks[0], 0)
    assert core.policy.replan(0.0) == []
    assert (a.tasks[0].k, b.tasks[0].k, c.tasks[0].k) == (0, 0, 1)
    assert core.stats.snapshot().counters["paper_fallbacks"] == 1


def test_c_infeasible_budget_falls_back_in_edf_order(small_steps: mosel.Profile) -> None:
    # Three one-request jobs at their tops (1.25 ms each; cheapest 1 ms). C is due at 3.26 ms and
    # predicted at 3.75 ms: diff = -0.49 ms. Budget 0.91 x 3.26 = 2.97 ms < 3 ms, the three
    # cheapest options: infeasible, so random_fill runs. Lowering A credits 0.25 ms (-0.24),
    # lowering B 0.25 ms more (+0.01 >= 0): it stops there and C keeps its top option.
    core, (a, b, c) = queued(small_steps, [(1, 3.0, 0.5), (1, 3.1, 0.5), (1, 3.26, 0.5)], Paper)
    assert [t.lat for t in core.queue] == [(1000, 1250)] * 3
    assert core.policy.replan(0.0) == []
    assert (a.tasks[0].k, b.tasks[0].k, c.tasks[0].k) == (0, 0, 1)
    assert list(core.finishes_us(0.0)) == [1000, 2000, 3250]
    counters = core.stats.snapshot().counters
    assert counters["paper_solves"] == 1 and counters["paper_fallbacks"] == 1

    # Due at 2.9 ms instead: even all three at their cheapest finish at 3 ms, so C is dropped.
    core, (a, b, c) = queued(small_steps, [(1, 2.5, 0.5), (1, 2.7, 0.5), (1, 2.9, 0.5)], Paper)
    failures = core.policy.replan(0.0)
    assert [(job, type(error)) for job, error in failures] == [(c, mosel.DeadlineError)]
    assert c.error is failures[0][1] and not c.tasks[0].queued
    assert (a.tasks[0].k, b.tasks[0].k) == (0, 0)
    assert [t.job for t in core.queue] == [a, b]
    assert core.stats.snapshot().counters["failed_doomed"] == 1


@pytest.mark.parametrize(("policy", "k", "hits"), [(Paper, 1, 1), (PaperFixed, 0, 0)])
def test_d_the_index_defect_sends_upper_half_jobs_to_their_most_accurate_option(
    linear: mosel.Profile, policy: type[Policy], k: int, hits: int
) -> None:
    # Three requests, floor 0.8: the row is [3, 7, 11, 15] ms and the cheapest admissible option
    # is index 2 (11 ms, 0.833), in the upper half. Alone at its top (15 ms) it misses its 13 ms
    # deadline; budget 0.91 x 13 = 11.83 ms, so the relaxation stays below index 1 of the
    # admissible options (the spline through 11, 15, 15, 15 ms reaches 11.83 ms at x = 0.11):
    # d = 0. The defect compares 2 + 0 with len(row) - 2 = 2 and sends the job to 15 ms.
    core = Scheduler(linear, mosel.SchedulerConfig(policy=policy, deterministic=True))
    job = Job(n=3, available=AV, arrival=0.0, deadline_ms=13.0, min_accuracy=0.8)
    assert core.admit(job, 0.0) == []
    task = job.tasks[0]
    assert task.first == 2 and task.lat == (11000, 15000)
    assert task.k == k
    counters = core.stats.snapshot().counters
    assert counters["paper_solves"] == 1 and counters.get("paper_defect_hits", 0) == hits
    # At dispatch the job runs as it is, 2 ms late with the defect: within the 12 ms tolerance.
    batch, failures = core.dispatch(0.0)
    assert failures == [] and batch is not None and batch.predicted_us == task.lat[k]


def test_d_the_defect_changes_nothing_in_the_lower_half(linear: mosel.Profile) -> None:
    # Floor 0.75: cheapest admissible index 1 of 4; the defect fires only for 1 + d >= 3, where
    # the correct mapping is the top option too.
    core = Scheduler(linear, mosel.SchedulerConfig(policy=Paper, deterministic=True))
    job = Job(n=3, available=AV, arrival=0.0, deadline_ms=13.0, min_accuracy=0.75)
    core.admit(job, 0.0)
    assert job.tasks[0].first == 1 and job.tasks[0].strategy.latency_us <= 13000
    assert "paper_defect_hits" not in core.stats.snapshot().counters


def test_e_dispatch_runs_one_job_and_drops_only_past_the_tolerance(linear: mosel.Profile) -> None:
    # Three one-request jobs at their tops (5 ms), due at 10, 20 and 40 ms; the device frees at
    # 20 ms. P would finish at 25 ms > 10 + 12: dropped. Q finishes at 25 ms, 5 ms late but within
    # 20 + 12: it runs, alone (R follows in a batch of its own).
    jobs: list[tuple[int, float, float | None]] = [(1, 10.0, None), (1, 20.0, None), (1, 40.0, None)]
    core, (p, q, r) = queued(linear, jobs, Paper)
    batch, failures = core.dispatch(0.020)
    assert [(job, type(error)) for job, error in failures] == [(p, mosel.DeadlineError)]
    assert batch is not None and [t.job for t in batch.tasks] == [q]
    assert core.stats.snapshot().counters["failed_late"] == 1
    core.complete(batch, 0.025, 5000.0)
    batch, failures = core.dispatch(0.025)
    assert failures == [] and batch is not None and [t.job for t in batch.tasks] == [r]

    # With no tolerance Q is dropped as well.
    core, (p, q, r) = queued(linear, jobs, paper_policy(tolerance_ms=0.0))
    batch, failures = core.dispatch(0.020)
    assert [job for job, _ in failures] == [p, q]
    assert batch is not None and [t.job for t in batch.tasks] == [r]


def test_e_never_merges_where_the_default_would() -> None:
    model = Tiny()
    profile = tiny_profile(model)
    everything = frozenset(profile.modalities)
    batches = {}
    for policy in (Policy, Paper):
        core = Scheduler(profile, mosel.SchedulerConfig(policy=policy, deterministic=True))
        for _ in range(3):
            core.admit(Job(n=2, available=everything, arrival=0.0, deadline_ms=50.0, min_accuracy=None), 0.0)
        batch, _ = core.dispatch(0.0)
        assert batch is not None
        batches[policy] = len(batch.tasks)
    assert batches[Policy] > 1 and batches[Paper] == 1


def test_deadline_including_the_tolerance_plans_earlier_and_drops_later(linear: mosel.Profile) -> None:
    told = paper_policy(tolerance_ms=12.0, deadline_includes_tolerance=True)
    # One request due (as told) at 16 ms: the policy plans against 4 ms, so its top (5 ms) is a
    # predicted violation and the relaxation (budget 0.91 x 4 = 3.64 ms) lowers it to audio.
    core = Scheduler(linear, mosel.SchedulerConfig(policy=told, deterministic=True))
    job = Job(n=1, available=AV, arrival=0.0, deadline_ms=16.0, min_accuracy=None)
    core.admit(job, 0.0)
    assert job.tasks[0].k == 0
    # At dispatch a head is dropped only past the told deadline.
    core, (p, q) = queued(linear, [(1, 25.0, None), (1, 30.0, None)], told)
    batch, failures = core.dispatch(0.0205)  # P: 25.5 ms > 25; Q: 25.5 ms <= 30
    assert [job for job, _ in failures] == [p]
    assert batch is not None and [t.job for t in batch.tasks] == [q]


def test_alone_on_an_idle_device_is_one_pass(linear: mosel.Profile) -> None:
    core = Scheduler(linear, mosel.SchedulerConfig(policy=PaperFixed, deterministic=True))
    job = Job(n=3, available=AV, arrival=0.0, deadline_ms=13.0, min_accuracy=0.8)
    batch = core.start_alone(job, 0.0)
    assert batch is not None and batch.predicted_us == 11000


@pytest.mark.parametrize("policy", [Paper, PaperFixed])
def test_every_job_resolves_in_a_simulation(policy: type[Policy]) -> None:
    model = Tiny()
    profile = tiny_profile(model)
    everything = frozenset(profile.modalities)
    rng = random.Random(7)
    arrivals = []
    t = 0.0
    for i in range(240):
        t += rng.expovariate(1000.0)  # about 3x what the device serves at full accuracy
        n = rng.choice([1, 1, 1, 2, 3, 5, 8, 11])  # 11: split into two tasks
        available = everything if i % 7 else frozenset({"audio", "text"})
        floor = rng.choice([None, 0.6, 0.7, 0.8])
        if available != everything and floor == 0.8:
            floor = 0.7
        arrivals.append(
            mosel.Arrival(
                t, n, deadline_ms=rng.uniform(1.0, 8.0), min_accuracy=floor, available=available,
                best_effort=i % 31 == 0,
            )
        )  # fmt: skip
    arrivals.append(mosel.Arrival(t, 2))  # no SLO: every modality
    sim = mosel.simulate(profile, arrivals, mosel.SchedulerConfig(policy=policy))
    assert len(sim.records) == len(arrivals)
    for record in sim.records:
        assert record.served != (record.error is not None)
        if record.served:
            assert not math.isnan(record.finish_s)
            floor = record.arrival.min_accuracy
            assert floor is None or record.expected_accuracy >= floor
    counters = sim.stats.counters
    assert counters["paper_solves"] > 0 and counters["violations_predicted"] >= counters["paper_solves"]
    assert sum(r.served for r in sim.records) > len(arrivals) // 4
    assert any(not r.on_time for r in sim.records)
    assert (counters.get("paper_defect_hits", 0) > 0) == (policy is Paper)


def test_serves_concurrent_callers_in_the_threaded_server() -> None:
    model = Tiny().eval()
    mosel.attach(model, tiny_profile(model), scheduler=mosel.SchedulerConfig(policy=Paper))
    try:
        results: list[object] = [None] * 16
        barrier = threading.Barrier(4)

        def call(i: int) -> None:
            if i < 4:
                barrier.wait()
            try:
                results[i] = model.infer(tiny_inputs(1 + i % 3), deadline_ms=500.0, min_accuracy=0.6)
            except mosel.MoselError as exc:
                results[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert all(isinstance(r, (mosel.Result, mosel.DeadlineError)) for r in results)
        assert any(isinstance(r, mosel.Result) for r in results)
    finally:
        mosel.close(model)
