"""Overhead of ``model.infer`` over calling the branches and fusion by hand, and planner build time.

For each batch size and each strategy (all modalities; a mixed one from the frontier) the same
work is timed two ways, interleaved: by hand (branches on the rows that need them, fusion per
group, outputs concatenated) and through ``model.infer``. Reported: medians over repeats, the
difference (mosel's overhead) and its share of the model's own time.

Run: python benchmarks/overhead.py [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import mosel
from mosel import trees
from mosel.plan import CostModel, PlannerConfig, build_plan
from mosel.testing import Passthrough, ToyAV, synthetic_profile, toy_av_batches, toy_av_data


@mosel.multimodal
class TreePassthrough(nn.Module):
    """Passthrough with pytrees: a dict input, tuple-and-dict features, a dict output."""

    @mosel.modality("audio")
    def encode_audio(self, audio: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return audio["ids"], {"mask": audio["mask"]}

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        return video

    @mosel.fusion
    def fuse(self, features: Mapping[str, Any]) -> dict[str, Tensor]:
        parts = []
        if "audio" in features:
            ids, extra = features["audio"]
            parts.append(ids * extra["mask"])
        if "video" in features:
            parts.append(features["video"].flatten(1)[:, :1])
        return {"y": torch.stack([p.flatten(1)[:, :1] for p in parts]).sum(0)}


def by_hand(model: nn.Module, strategy: mosel.Strategy, inputs: Mapping[str, Any]) -> Any:
    """The strategy written out directly, as a user would without mosel (pytrees: mosel.trees)."""
    spec = mosel.spec_of(model)
    outs, start = [], 0
    rows: dict[str, list[tuple[int, int]]] = {m: [] for m in spec.modalities}
    for config, count in strategy.groups:
        for m in config:
            rows[m].append((start, start + count))
        start += count
    feats = {}
    for m, spans in rows.items():
        if spans:
            x = (
                trees.concat([trees.take(inputs[m], slice(a, b), 0) for a, b in spans], 0)
                if len(spans) > 1
                else trees.take(inputs[m], slice(spans[0][0], spans[0][1]), 0)
            )
            feats[m] = getattr(model, spec.branches[m])(x)
    offsets = dict.fromkeys(spec.modalities, 0)
    fuse = getattr(model, spec.fusion)
    for config, count in strategy.groups:
        group = {}
        for m in config:
            group[m] = trees.take(feats[m], slice(offsets[m], offsets[m] + count), 0)
            offsets[m] += count
        outs.append(fuse(group))
    return trees.concat(outs, 0) if len(outs) > 1 else outs[0]


def interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(5):
        a(), b()
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        a()
        t1 = time.perf_counter_ns()
        b()
        t2 = time.perf_counter_ns()
        ta.append((t1 - t0) / 1000)
        tb.append((t2 - t1) / 1000)
    return statistics.median(ta), statistics.median(tb)


def measure(
    model: nn.Module, make_inputs: Callable[[int], dict[str, Any]], repeats: int
) -> list[dict[str, object]]:
    plan = mosel.profile_of(model).plan
    everything = frozenset(mosel.spec_of(model).modalities)
    rows = []
    for n in (1, 8, 32):
        inputs = make_inputs(n)
        frontier = plan.frontier(everything, n)
        mixed = [s for s in frontier.strategies if len(s.groups) > 1]
        cases = [("all modalities", mosel.Strategy(((everything, n),), 0, 0), {})]
        if mixed:
            s = mixed[len(mixed) // 2]
            i = frontier.strategies.index(s)
            gap = frontier.strategies[i + 1].latency_us - s.latency_us
            cases.append(("mixed", s, {"deadline_ms": (s.latency_us + gap / 2) / 1000, "best_effort": True}))
        for name, strategy, slo in cases:
            got = model.infer(inputs, **slo)  # type: ignore[attr-defined]
            assert got.strategies[0].groups == strategy.groups or name == "mixed", (got.strategies, strategy)
            with torch.inference_mode():
                direct, served = interleaved(
                    functools.partial(by_hand, model, strategy, inputs),
                    functools.partial(model.infer, inputs, **slo),
                    repeats,
                )
            rows.append(
                {
                    "model": type(model).__name__,
                    "batch": n,
                    "strategy": name,
                    "groups": " + ".join(f"{k}x{'+'.join(sorted(c))}" for c, k in strategy.groups),
                    "direct_us": round(direct, 1),
                    "infer_us": round(served, 1),
                    "overhead_us": round(served - direct, 1),
                    "overhead_pct": round(100 * (served - direct) / direct, 2),
                }
            )
    return rows


def synthetic_cost(m: int, max_batch: int, seed: int = 0) -> CostModel:
    rng = np.random.default_rng(seed)
    names = tuple("abcdefgh"[:m])
    configs = [frozenset(c) for r in range(1, m + 1) for c in itertools.combinations(names, r)]
    branch = {}
    for name in names:
        base, per = rng.uniform(200, 2000), rng.uniform(20, 400)
        branch[name] = (0, *(int(base + per * b**0.9) for b in range(1, max_batch + 1)))
    fusion = {c: (0, *(int(30 + 5 * b * len(c)) for b in range(1, max_batch + 1))) for c in configs}
    acc = {c: int(1e6 * (0.5 + 0.08 * len(c) + rng.uniform(0, 0.1))) for c in configs}
    return CostModel(names, MappingProxyType(branch), MappingProxyType(fusion), MappingProxyType(acc))


def planner_times(repeats: int = 3) -> list[dict[str, object]]:
    rows = []
    for m, max_batch in ((2, 32), (3, 32), (4, 16)):
        cost = synthetic_cost(m, max_batch)
        times, plan = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            plan = build_plan(cost, PlannerConfig(workers=2))
            times.append(time.perf_counter() - started)
        assert plan is not None
        full = plan.frontier(frozenset(cost.modalities), max_batch)
        rows.append(
            {
                "modalities": m,
                "max_batch_size": max_batch,
                "frontiers": len(plan.frontiers),
                "strategies_at_max": len(full.strategies),
                "exact": plan.exact,
                "build_s_median": round(statistics.median(times), 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", mosel.MoselWarning)

    branch_us = {
        "audio": [100 + 10 * b for b in range(1, 33)],
        "video": [300 + 60 * b for b in range(1, 33)],
    }
    accuracy = {"audio": 0.78, "video": 0.55, "audio+video": 0.92}
    null = Passthrough().eval()
    mosel.attach(null, synthetic_profile(null, branch_us=branch_us, accuracy=accuracy))
    tree = TreePassthrough().eval()  # the same, with pytree inputs, features and outputs
    mosel.attach(tree, synthetic_profile(tree, branch_us=branch_us, accuracy=accuracy))
    toy = ToyAV().eval()
    mosel.profile(toy, toy_av_batches(64, 32), max_batch_size=32)

    def toy_inputs(n: int) -> dict[str, Tensor]:
        return toy_av_data(n, seed=n)[0]

    def tree_inputs(n: int) -> dict[str, Any]:
        x = toy_inputs(n)
        return {"audio": {"ids": x["audio"], "mask": torch.ones_like(x["audio"])}, "video": x["video"]}

    rows = (
        measure(null, toy_inputs, args.repeats)
        + measure(tree, tree_inputs, args.repeats)
        + measure(toy, toy_inputs, max(30, args.repeats // 5))
    )
    planner = planner_times()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads 2\n")
    print("| model | batch | strategy | direct (us) | infer (us) | overhead (us) | overhead (%) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['strategy']}: {r['groups']} | {r['direct_us']} | "
            f"{r['infer_us']} | {r['overhead_us']} | {r['overhead_pct']} |"
        )
    print("\n| modalities | max batch | frontiers | strategies at max | exact | build (s, median of 3) |")
    print("|---:|---:|---:|---:|---|---:|")
    for r in planner:
        print(
            f"| {r['modalities']} | {r['max_batch_size']} | {r['frontiers']} | {r['strategies_at_max']} | "
            f"{r['exact']} | {r['build_s_median']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"overhead": rows, "planner": planner}, f, indent=1)


if __name__ == "__main__":
    main()
