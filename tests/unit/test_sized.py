"""Shape-aware costs: size buckets declared on a modality, priced per job (virtual clock)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import mosel
from mosel import pricing, profiles, runtime, scheduler
from mosel.plan import CostModel, Plan
from mosel.profiles import SizedLatency, bucket_edge, priced_ahead
from mosel.testing import synthetic_profile

pytestmark = pytest.mark.unit


@mosel.multimodal
class TextImage(nn.Module):
    @mosel.modality("text", size=lambda x: x.shape[-1], buckets=(16, 64, 256))
    def encode_text(self, x: Tensor) -> Tensor:
        return x.float().mean(-1, keepdim=True)

    @mosel.modality("image")
    def encode_image(self, x: Tensor) -> Tensor:
        return x

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return sum(features.values())  # type: ignore[return-value]


MAX = 8
WAIT = 30.0  # a hang guard only: nothing here is timed
TEXT_16 = [100.0 * b for b in range(1, MAX + 1)]
TEXT_64 = [400.0 * b for b in range(1, MAX + 1)]
TEXT_256 = [1600.0 * b for b in range(1, MAX + 1)]
IMAGE = [300.0 + 50.0 * b for b in range(1, MAX + 1)]
ACCURACY = {"text": 0.80, "image": 0.70, "text+image": 0.90}


def sized_profile(model: nn.Module | type[nn.Module] = TextImage, largest: int = 256) -> mosel.Profile:
    """Text measured at 16, 64 and 256 tokens (or only up to ``largest``)."""
    tables = {16: TEXT_16, 64: TEXT_64, 256: TEXT_256}
    return synthetic_profile(
        model,
        branch_us={"image": IMAGE},
        sized_us={"text": {edge: table for edge, table in tables.items() if edge <= largest}},
        accuracy=ACCURACY,
    )


def text_image(n: int, length: int) -> dict[str, Tensor]:
    return {"text": torch.ones(n, length), "image": torch.zeros(n, 1)}


def test_spec_records_sizing_and_rejects_misuse() -> None:
    sizing = mosel.spec_of(TextImage).sizings["text"]
    assert sizing.buckets == (16, 64, 256)
    assert sizing.read("text", torch.zeros(2, 40)) == 40
    assert "image" not in mosel.spec_of(TextImage).sizings
    with pytest.raises(mosel.SpecError, match="strictly ascending"):
        mosel.modality("text", size=len, buckets=(32, 16))
    with pytest.raises(mosel.SpecError, match="buckets= needs size="):
        mosel.modality("text", buckets=(16, 32))
    with pytest.raises(mosel.SpecError, match="function"):
        mosel.modality("text", size=3)  # type: ignore[arg-type]
    with pytest.raises(mosel.InputError, match="size function of modality 'text' failed"):
        sizing.read("text", "not a tensor")
    with pytest.raises(mosel.InputError, match="returned 0"):
        sizing.read("text", torch.zeros(2, 0))


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=6, unique=True), st.integers(1, 5000))
def test_bucket_edge_is_the_first_edge_at_or_above(edges: list[int], size: int) -> None:
    buckets = tuple(sorted(edges))
    edge = bucket_edge(buckets, size)
    assert edge >= size
    if size <= buckets[-1]:
        assert edge in buckets
        assert all(e < size for e in buckets if e < edge)
    else:
        assert edge & (edge - 1) == 0 and edge // 2 < size  # the next power of two


def test_each_bucket_has_its_own_plan_and_costs() -> None:
    profile = sized_profile()
    assert profile.reference_bucket == (16,)
    assert set(profile.sized_plans) == {(64,), (256,)}
    everything = frozenset({"text", "image"})
    for edge, text in ((16, TEXT_16), (64, TEXT_64), (256, TEXT_256)):
        plan, cost = profile.priced_at((edge,))
        assert cost.branch_us["text"][1:] == tuple(int(v) for v in text)
        for n in (1, MAX):
            for strategy in plan.frontier(everything, n).strategies:
                assert strategy.latency_us == cost.latency_us(strategy.groups)
    # Sizes between buckets are priced at the bucket above; beyond the last, scaled linearly.
    assert profile.bucket({"text": 17}) == (64,)
    assert profile.bucket({}) == (16,)
    _, beyond = profile.priced_at(profile.bucket({"text": 1000}))
    assert beyond.branch_us["text"][1] == pytest.approx(1600.0 * 1024 / 256, abs=1)


def test_sized_profile_round_trips_and_rejects_a_tampered_plan(tmp_path: object) -> None:
    profile = sized_profile()
    data = json.loads(json.dumps(profile.to_json()))
    again = mosel.Profile.from_json(data)
    assert again.sized == profile.sized
    assert again.sized_plans.keys() == profile.sized_plans.keys()
    assert again.priced_at((64,))[1] == profile.priced_at((64,))[1]
    data["sized"]["text"]["tables"]["64"]["median_us"][0] = 1.0
    with pytest.raises(mosel.ProfileError, match="plan does not match"):
        mosel.Profile.from_json(data)
    data = json.loads(json.dumps(profile.to_json()))
    del data["sized_plans"][0]
    with pytest.raises(mosel.ProfileError, match="lacks a plan"):
        mosel.Profile.from_json(data)
    assert isinstance(profile.sized["text"], SizedLatency)


def test_unsized_profile_json_has_no_sized_fields() -> None:
    profile = synthetic_profile(TextImage, branch_us={"text": TEXT_16, "image": IMAGE}, accuracy=ACCURACY)
    assert "sized" not in profile.to_json()
    assert profile.reference_bucket == ()
    assert profile.priced_at(())[0] is profile.plan


def test_a_long_job_is_priced_at_its_bucket_and_gets_a_strategy_that_fits() -> None:
    """One job of 4 requests at each length, alone, deadline 3 ms: the text branch costs 0.4 ms at
    16 tokens, 1.6 ms at 64 and 6.4 ms at 256; priced at the reference every job would take text.
    """
    profile = sized_profile()
    deadline_ms = 3.0
    arrivals = [
        mosel.Arrival(time_s=i * 0.1, n=4, deadline_ms=deadline_ms, sizes={"text": size})
        for i, size in enumerate((16, 64, 256))
    ]
    sim = mosel.simulate(profile, arrivals)
    assert all(r.on_time for r in sim.records)
    text_rows = [sum(k for c, k in r.strategies[0].groups if "text" in c) for r in sim.records]
    assert text_rows[0] == 4  # 16 tokens: text for everyone (with image: 0.9)
    assert text_rows[2] <= 1  # 256 tokens: 1.6 ms per text row, 2 rows would not fit in 3 ms
    # Without sizes the same job is priced at the reference (16 tokens) and takes text for all.
    blind = mosel.simulate(profile, [mosel.Arrival(time_s=0.0, n=4, deadline_ms=deadline_ms)])
    assert sum(k for c, k in blind.records[0].strategies[0].groups if "text" in c) == 4


def test_jobs_of_different_buckets_never_share_a_batch() -> None:
    profile = sized_profile()
    arrivals = [mosel.Arrival(time_s=0.0, n=2, sizes={"text": 16 if i % 2 else 200}) for i in range(8)]
    sim = mosel.simulate(profile, arrivals, mosel.SchedulerConfig(max_merge=8))
    assert all(r.served for r in sim.records)
    batches: dict[float, set[tuple[int, ...]]] = {}  # a batch's jobs start together
    for record in sim.records:
        assert record.arrival.sizes is not None
        batches.setdefault(record.started_s, set()).add(profile.bucket(record.arrival.sizes))
    assert all(len(buckets) == 1 for buckets in batches.values())
    assert len(batches) < len(arrivals)  # jobs of one bucket did merge


def test_simulate_rejects_sizes_for_an_unsized_modality() -> None:
    with pytest.raises(mosel.InputError, match="sizes must map"):
        mosel.simulate(sized_profile(), [mosel.Arrival(time_s=0.0, n=1, sizes={"image": 3})])
    with pytest.raises(mosel.InputError, match="sizes must map"):
        mosel.simulate(sized_profile(), [mosel.Arrival(time_s=0.0, n=1, sizes={"text": 0})])


def test_beyond_the_measured_buckets_every_pure_strategy_stays_an_option() -> None:
    """At 4096 tokens text costs 16x its 256-token table: image alone (0.35 ms) must be served,
    though the 256-token plan had no reason to keep it next to cheaper text."""
    profile = sized_profile()
    plan, cost = profile.priced_at(profile.bucket({"text": 4096}))
    assert not plan.frontier(frozenset({"text", "image"}), 1).exact  # repriced, not proven
    for strategy in plan.frontier(frozenset({"text", "image"}), 1).strategies:
        assert strategy.latency_us == cost.latency_us(strategy.groups)
    sim = mosel.simulate(profile, [mosel.Arrival(0.0, 1, deadline_ms=1.0, sizes={"text": 4096})])
    record = sim.records[0]
    assert record.on_time and record.strategies[0].groups == ((frozenset({"image"}), 1),)


def test_declared_buckets_beyond_the_measured_are_priced_at_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Declared (16, 64, 256), measured up to 64: 256 is repriced once, at attach, never per job."""
    model = TextImage().eval()
    profile = sized_profile(model, largest=64)
    assert set(profile.sized["text"].tables) == {16, 64}
    mosel.attach(model, profile)
    ahead = runtime._state(model).priced
    assert set(ahead) == {(64,), (256,)}  # every declared bucket but the reference
    plan, cost = ahead[(256,)]
    assert not plan.frontier(frozenset({"text", "image"}), 1).exact  # repriced, beyond the measured
    assert cost == profile.cost_at((256,))

    def never(self: mosel.Profile, bucket: tuple[int, ...]) -> tuple[Plan, CostModel]:
        raise AssertionError(f"bucket {bucket} priced while serving")

    monkeypatch.setattr(mosel.Profile, "priced_at", never)
    for length in (200, 40, 3):  # buckets 256, 64 and the reference
        with pytest.warns(mosel.MoselWarning, match="beyond the largest") if length == 200 else nullcontext():
            result = model.infer(text_image(2, length), deadline_ms=10_000.0, min_accuracy=0.0)
        assert result.output.shape == (2, 1)
    assert result.strategies[0] in profile.plan.frontier(frozenset({"text", "image"}), 2).strategies
    mosel.close(model)
    with pytest.warns(mosel.MoselWarning, match="beyond the largest"):  # once per server
        assert model.infer(text_image(1, 200)).output.shape == (1, 1)  # a restarted scheduler has them too
    mosel.close(model)


def test_priced_ahead_takes_the_smallest_buckets_first_and_skips_the_reference() -> None:
    profile = sized_profile(largest=64)
    assert priced_ahead(profile, {}) == {}  # nothing declared: the reference only, never repriced
    assert list(priced_ahead(profile, {"text": (16, 64, 256)}, limit=1)) == [(64,)]
    assert list(priced_ahead(profile, {"text": (20, 1000)})) == [(64,), (1024,)]  # each size's bucket
    fixed = synthetic_profile(TextImage, branch_us={"text": TEXT_16, "image": IMAGE}, accuracy=ACCURACY)
    assert priced_ahead(fixed, {"text": (16, 64)}) == {}


def test_priced_ahead_builds_only_the_combinations_it_keeps() -> None:
    # Many sized modalities with many declared edges: a product of a billion combinations. Only
    # the smallest ``limit`` are generated (it used to build and sort all of them at attach).
    class Sized:
        def __init__(self, buckets: tuple[int, ...]) -> None:
            self.buckets, self.reference = buckets, buckets[0]

        def edge(self, size: int) -> int:
            return bucket_edge(self.buckets, size)

    edges = tuple(range(1, 1001))
    fake = type("Fake", (), {})()
    fake.sized = {m: Sized(edges) for m in ("a", "b", "c")}
    fake.reference_bucket = (1, 1, 1)
    fake.priced_at = lambda key: key
    ahead = priced_ahead(fake, {m: edges for m in fake.sized}, limit=5)
    assert list(ahead) == [(1, 1, 2), (1, 2, 1), (2, 1, 1), (1, 1, 3), (1, 2, 2)]


def test_the_scheduler_keeps_the_buckets_priced_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    profile = sized_profile(largest=64)
    ahead = priced_ahead(profile, {"text": (16, 64, 256)})
    monkeypatch.setattr(pricing, "PRICED_CACHE", 2)
    core = scheduler.Scheduler(profile, priced=ahead)
    assert core.pricer.plan_outside_lock((256,)) is ahead[(256,)]
    for edge in (512, 1024, 2048, 4096, 8192):
        computed = core.pricer.plan_outside_lock((edge,))
        assert core.pricer.plan((edge,), computed) is computed  # what the caller priced is what is kept
        assert core.pricer.plan((edge,)) is computed
    assert core.pricer.plan((256,)) is ahead[(256,)]
    assert core.pricer.plan((16,))[0] is profile.plan
    assert len(core.pricer._plans.data) <= len(ahead) + 1 + 2


@pytest.mark.filterwarnings("ignore:a job of .* beyond the largest bucket:mosel.MoselWarning")
def test_a_bucket_beyond_the_measured_is_repriced_outside_the_servers_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first job of a new bucket reprices a plan (milliseconds): while it does, the model's
    other callers and its executor go on (the server's lock is not held)."""
    model = TextImage().eval()
    mosel.attach(model, sized_profile(model))
    model.infer(text_image(1, 16))
    srv = runtime._state(model).server
    assert srv is not None
    entered, release = threading.Event(), threading.Event()
    held: list[bool] = []
    real = profiles.repriced_plan

    def slow(plan: Plan, cost: CostModel) -> Plan:
        probe = threading.Thread(target=lambda: held.append(not _take(srv.lock)))
        probe.start()
        probe.join(WAIT)
        entered.set()
        release.wait(WAIT)
        return real(plan, cost)

    monkeypatch.setattr(profiles, "repriced_plan", slow)
    long: list[mosel.Result] = []
    repricing = threading.Thread(target=lambda: long.append(model.infer(text_image(2, 1000))))
    repricing.start()
    try:
        assert entered.wait(WAIT)
        assert held == [False]  # another thread could take the lock while the plan was repriced
        others = [model.submit(text_image(1, 40)), model.submit(text_image(3, 16))]  # queued, run
        assert [f.result(WAIT).output.shape for f in others] == [(1, 1), (3, 1)]
        assert model.infer(text_image(1, 200)).output.shape == (1, 1)
    finally:
        release.set()
        repricing.join(WAIT)
    assert long[0].output.shape == (2, 1)
    assert (1024,) in srv.scheduler.pricer._plans.data  # kept: the next job of that bucket prices nothing
    mosel.close(model)


def _take(lock: threading.RLock) -> bool:
    """Whether this thread could take ``lock`` at once (released again)."""
    if not lock.acquire(blocking=False):
        return False
    lock.release()
    return True
