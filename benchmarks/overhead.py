"""Overhead of ``model.infer`` over calling the branches and fusion by hand, and planner build time.

For each batch size and each strategy (all modalities; a mixed one from the frontier) the same
work is timed two ways, interleaved: by hand (branches on the rows that need them, fusion per
group, outputs concatenated) and through ``model.infer``. Reported: medians over repeats, the
difference (mosel's overhead) and its share of the model's own time.

The Hugging Face case (``examples/hf_image_text.py``'s ViT + BERT dual encoder; needs the
examples extra) measures mosel's per-call overhead on a real small model with pytree inputs
(the tokenizer's ``BatchEncoding``, the image processor's ``BatchFeature``): ``infer`` idle (one
caller) and loaded (several callers at once, against the same jobs run by hand one after
another), and ``POST /predict`` through ``mosel.http.create_app`` over an in-process ASGI
transport (httpx), against calling the model by hand; medians, spread (p10-p90) and each as a
share of the model's own latency.

Run: python benchmarks/overhead.py [--repeats N] [--json PATH] [--hf-only] [--no-hf]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import threading
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


# --- the Hugging Face image + text model ---------------------------------------------------------


def spread(samples: list[float]) -> dict[str, float]:
    """Median and the 10th-90th percentile range of ``samples`` (microseconds)."""
    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return {"median_us": round(float(p50), 1), "p10_us": round(float(p10), 1), "p90_us": round(float(p90), 1)}


def hf_model() -> tuple[nn.Module, Any, Any]:
    """The ViT + BERT dual encoder of examples/hf_image_text.py, untrained (latency is what is measured), profiled."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import hf_image_text as ex

    _, validation, test = ex.make_splits((200, 200, 64))
    preprocess = ex.Preprocess(ex.train_tokenizer(validation.captions), ex.image_processor())
    model = ex.build_model(len(preprocess.tokenizer)).eval()
    mosel.profile(
        model, ex.batches(validation, preprocess, 50, shuffle=1), max_batch_size=8, batch_sizes=[1, 2, 4, 8],
        progress=False,
    )  # fmt: skip
    return model, preprocess, (ex, test)


def hf_inputs(preprocess: Any, ex: Any, test: Any, n: int) -> dict[str, Any]:
    """``n`` rows as the pre-processors give them, captions padded to a bucket edge (16 tokens).

    At an edge, serving's padding to the edge adds no work: both sides compute the same shapes.
    """
    rows = ex.raw(test, range(n))
    text = preprocess.tokenizer(
        rows["text"], padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    return {"text": text, "image": preprocess({"image": rows["image"]})["image"]}


def hf_by_hand(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    """Every modality, called directly: what a user without mosel runs."""
    with torch.inference_mode():
        return model.fuse(
            {"image": model.encode_image(inputs["image"]), "text": model.encode_text(inputs["text"])}
        )  # type: ignore[operator]


def _cpu_us() -> float:
    return time.process_time_ns() / 1000  # every thread of this process: mosel's executor included


def hf_idle(model: nn.Module, inputs: Mapping[str, Any], repeats: int) -> dict[str, Any]:
    """One caller: ``infer`` (no SLO: every modality) against the same work by hand, interleaved.

    Timed in wall-clock time and in this process's CPU time (all its threads): on a busy host
    the CPU time is what mosel adds to the work, the wall time also the waits for a core.
    """
    for _ in range(10):
        hf_by_hand(model, inputs), model.infer(inputs)  # type: ignore[operator]
    direct, served, direct_cpu, served_cpu = [], [], [], []
    for _ in range(repeats):
        c0, t0 = _cpu_us(), time.perf_counter_ns()
        hf_by_hand(model, inputs)
        c1, t1 = _cpu_us(), time.perf_counter_ns()
        model.infer(inputs)  # type: ignore[operator]
        c2, t2 = _cpu_us(), time.perf_counter_ns()
        direct.append((t1 - t0) / 1000)
        served.append((t2 - t1) / 1000)
        direct_cpu.append(c1 - c0)
        served_cpu.append(c2 - c1)
    return {
        "direct": spread(direct),
        "mosel": spread(served),
        "overhead": spread([b - a for a, b in zip(direct, served)]),
        "direct_cpu": spread(direct_cpu),
        "overhead_cpu": spread([b - a for a, b in zip(direct_cpu, served_cpu)]),
    }


def hf_loaded(model: nn.Module, inputs: Mapping[str, Any], callers: int, jobs: int) -> dict[str, Any]:
    """``callers`` threads each calling ``infer`` ``jobs`` times at once, against the same jobs by hand in turn.

    Per job: the wall (and CPU) time of all jobs divided by their number, repeated 7 times. Under
    load mosel may merge jobs into batches, which can make it cheaper than calling by hand.
    """
    direct, served, direct_cpu, served_cpu = [], [], [], []
    total = callers * jobs
    for _ in range(7):
        c0, t0 = _cpu_us(), time.perf_counter()
        for _ in range(total):
            hf_by_hand(model, inputs)
        direct.append((time.perf_counter() - t0) / total * 1e6)
        direct_cpu.append((_cpu_us() - c0) / total)
        start = threading.Barrier(callers + 1)

        def caller(start: threading.Barrier = start) -> None:
            start.wait()
            for _ in range(jobs):
                model.infer(inputs)  # type: ignore[operator]

        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for t in threads:
            t.start()
        c0 = _cpu_us()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        served.append((time.perf_counter() - t0) / total * 1e6)
        served_cpu.append((_cpu_us() - c0) / total)
    return {
        "callers": callers,
        "direct": spread(direct),
        "mosel": spread(served),
        "overhead": spread([b - a for a, b in zip(direct, served)]),
        "direct_cpu": spread(direct_cpu),
        "overhead_cpu": spread([b - a for a, b in zip(direct_cpu, served_cpu)]),
    }


def _httpx() -> Any:
    try:  # starlette >= 1.0 speaks httpx2; older versions httpx
        import httpx2 as httpx
    except ImportError:  # pragma: no cover
        import httpx  # type: ignore[no-redef]
    return httpx


def hf_http(
    model: nn.Module,
    inputs: Mapping[str, Any],
    repeats: int,
    callers: int = 1,
    hook: Any = None,
    raw: Any = None,
) -> dict[str, Any]:
    """``POST /predict`` through create_app over httpx's in-process ASGI transport, against the work by hand.

    Without ``hook`` the body holds the model's inputs as JSON lists; with it, ``raw`` (caption
    strings, pixel lists) pre-processed by the hook server-side, and the work by hand includes
    the same pre-processing. ``server``: the answer's ``completion_ms`` (the request's arrival at
    the app to its response: parsing, the hook, decoding, the model, encoding), against the work
    by hand; ``round trip`` adds the in-process client. With ``callers`` > 1, that many clients
    post at once (each the same body), against the work by hand in turn, per request.
    """
    import asyncio

    import mosel.http

    httpx = _httpx()
    if hook is None:
        body = {"inputs": {m: {k: v.tolist() for k, v in x.items()} for m, x in inputs.items()}}
        work = functools.partial(hf_by_hand, model, inputs)
    else:
        body = {"inputs": {"text": raw["text"], "image": raw["image"].tolist()}}

        def work() -> Tensor:
            return hf_by_hand(model, {m: fn(body["inputs"][m]) for m, fn in hook.items()})

    payload = json.dumps(body).encode()
    app = mosel.http.create_app(model, preprocess=hook)

    async def run() -> tuple[list[float], list[float], list[float]]:
        direct, round_trip, server = [], [], []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mosel") as client:
            headers = {"content-type": "application/json"}

            async def one() -> float:
                response = await client.post("/predict", content=payload, headers=headers)
                assert response.status_code == 200, response.text
                return float(response.json()["completion_ms"]) * 1000

            for i in range(10 + repeats):
                t0 = time.perf_counter_ns()
                for _ in range(callers):
                    work()
                t1 = time.perf_counter_ns()
                completion = await asyncio.gather(*(one() for _ in range(callers)))
                t2 = time.perf_counter_ns()
                if i >= 10:
                    direct.append((t1 - t0) / 1000 / callers)
                    round_trip.append((t2 - t1) / 1000 / callers)
                    server.append(max(completion) / callers)
        return direct, round_trip, server

    direct, round_trip, server = asyncio.run(run())
    return {
        "callers": callers,
        "body_bytes": len(payload),
        "direct": spread(direct),
        "mosel": spread(server),
        "overhead": spread([b - a for a, b in zip(direct, server)]),
        "round_trip": spread(round_trip),
        "overhead_round_trip": spread([b - a for a, b in zip(direct, round_trip)]),
    }


def hf_case(repeats: int) -> list[dict[str, Any]]:
    """mosel's per-call overhead on the Hugging Face image + text model, idle, loaded and over HTTP."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from two threads on two shared cores
    try:
        model, preprocess, (ex, test) = hf_model()
        rows: list[dict[str, Any]] = []
        for n in (1, 8):
            inputs = hf_inputs(preprocess, ex, test, n)
            rows.append({"path": "infer, idle", "batch": n} | hf_idle(model, inputs, repeats))
            loaded = hf_loaded(model, inputs, 4, max(10, repeats // 20))
            rows.append({"path": "infer, 4 callers", "batch": n} | loaded)
            rows.append({"path": "HTTP, idle", "batch": n} | hf_http(model, inputs, max(50, repeats // 2)))
            rows.append(
                {"path": "HTTP, 4 clients", "batch": n}
                | hf_http(model, inputs, max(10, repeats // 10), callers=4)
            )
            raw = ex.raw(test, range(n))
            hooked = hf_http(model, inputs, max(50, repeats // 2), hook=preprocess.hooks(), raw=raw)
            rows.append({"path": "HTTP + hook (raw captions, pixels), idle", "batch": n} | hooked)
        mosel.close(model)
        return rows
    finally:
        torch.set_num_threads(threads)


def print_hf(rows: list[dict[str, Any]]) -> None:
    import transformers

    load = os.getloadavg()
    print(
        f"Hugging Face ViT + BERT (examples/hf_image_text.py), 1 torch thread, transformers "
        f"{transformers.__version__}; load average at the end {load[0]:.2f}, {load[1]:.2f} on {os.cpu_count()} cores"
    )
    print(
        "captions padded to 16 tokens (a bucket edge), pixel_values (B, 1, 32, 32); medians [p10-p90] in us;\n"
        "HTTP: mosel = the answer's completion_ms (arrival to response, server side); round trip adds the\n"
        "in-process httpx client. CPU: this process's CPU time (all threads) per call\n"
    )
    print(
        "| path | batch | by hand | mosel | overhead | % of the model | CPU overhead (% of the model's CPU) "
        "| round trip overhead (%) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d, m, o = r["direct"], r["mosel"], r["overhead"]
        share = 100 * o["median_us"] / d["median_us"]
        cpu = "-"
        if "overhead_cpu" in r:
            oc, dc = r["overhead_cpu"]["median_us"], r["direct_cpu"]["median_us"]
            cpu = f"{oc:.0f} ({100 * oc / dc:.1f})"
        trip = "-"
        if "overhead_round_trip" in r:
            ot = r["overhead_round_trip"]["median_us"]
            trip = f"{ot:.0f} ({100 * ot / d['median_us']:.1f})"
        print(
            f"| {r['path']} | {r['batch']} | {d['median_us']:.0f} [{d['p10_us']:.0f}-{d['p90_us']:.0f}] | "
            f"{m['median_us']:.0f} [{m['p10_us']:.0f}-{m['p90_us']:.0f}] | "
            f"{o['median_us']:.0f} [{o['p10_us']:.0f}-{o['p90_us']:.0f}] | {share:.1f} | {cpu} | {trip} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--hf-only", action="store_true", help="only the Hugging Face image + text case")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face case")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("default", mosel.MoselWarning)  # shown once per place, not silenced
    hf: list[dict[str, Any]] = []
    if not args.no_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("(the Hugging Face case needs the examples extra: pip install 'mosel[examples]')\n")
        else:
            hf = hf_case(args.repeats)
            print_hf(hf)
    if args.hf_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"hf": hf}, f, indent=1)
        return

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
            json.dump({"overhead": rows, "planner": planner, "hf": hf}, f, indent=1)


if __name__ == "__main__":
    main()
