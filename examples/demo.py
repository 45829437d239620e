"""The main demo (`make demo`): mosel on a real three-modality model and real data, on this CPU.

1. builds AV-Digits (handwritten digits, espeak-ng speech, a noisy "video"), cached;
2. trains the from-scratch model with and without modality dropout and compares them;
3. profiles the model on this machine and prints accuracy, latency and strategy frontiers;
4. serves the same bursty stream of jobs (deadlines, an accuracy floor) twice, always all
   modalities and with mosel, and prints them side by side.

Run: python examples/demo.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from av_digits import data
from av_digits import model as av_model
from replay import RealJob, replay, with_inputs
from workloads import bursty_arrivals, job_size

import mosel


def say(text: str) -> None:
    print(text, flush=True)


def describe(strategy: mosel.Strategy) -> str:
    return " + ".join(f"{k}x{'+'.join(sorted(c))}" for c, k in strategy.groups)


def make_trace(
    profile: mosel.Profile, split: data.Split, duration_s: float, load: float, seed: int
) -> list[RealJob]:
    """Bursty arrivals; deadline = all-modality latency of the job + slack; floor = best - 6 points."""
    everything = frozenset(profile.modalities)
    full_ms = {n: profile.plan.frontier(everything, n).best.predicted_latency_ms for n in range(1, 33)}
    sizes = [job_size(random.Random(seed + 1), 32) for _ in range(10_000)]
    mean_ms = statistics.mean(full_ms[n] for n in sizes)
    rate = load * 1000.0 / mean_ms  # jobs per second at `load` times the all-modality capacity
    floor = round(max(profile.accuracy.values()) - 0.06, 3)
    rng = random.Random(seed)
    arrivals = []
    for t in bursty_arrivals(rate, duration_s, seed, burst_factor=4.0, mean_phase_s=0.5):
        n = job_size(rng, 32)
        arrivals.append(mosel.Arrival(t, n, deadline_ms=full_ms[n] + 3.0 * mean_ms, min_accuracy=floor))
    return with_inputs(arrivals, split, seed)


def pretrained_section(train: data.Split, test: data.Split, scratch: torch.nn.Module, quick: bool) -> None:
    """Frozen EfficientNet-Lite0 + Whisper tiny.en encoders with a trained fusion head."""
    try:
        from av_digits import pretrained
        from av_digits.encoders import MissingWeightsError
    except ImportError as exc:  # pragma: no cover
        say(f"\n4. pretrained encoders skipped: {exc}")
        return
    say(
        "\n4. pretrained encoders (EfficientNet-Lite0 for image and video frames, Whisper tiny.en "
        "for audio) ..."
    )
    t0 = time.perf_counter()
    try:
        model = pretrained.PretrainedAVDigits()
    except MissingWeightsError as exc:
        say(f"   skipped: {exc}")
        return
    if quick:
        train = data.Split(*(t[:256] for t in (train.image, train.audio, train.video, train.labels)))
        test = data.Split(*(t[:128] for t in (test.image, test.audio, test.video, test.labels)))
    feats_train, feats_test = pretrained.features(model, train), pretrained.features(model, test)
    say(
        f"   encoders loaded and features of {len(train) + len(test)} samples computed in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    pretrained.train_head(model, feats_train, train.labels, epochs=10 if quick else 30)
    accuracy = pretrained.head_accuracy(model, feats_test, test.labels)
    say(f"   {'configuration':<20} {'accuracy (frozen encoders + head, modality dropout)':>10}")
    for key, value in accuracy.items():
        say(f"   {key:<20} {value:.3f}")
    real = pretrained.asterisk_digits()
    if real is None:
        say("   real human speech: skipped (apt-get install asterisk-core-sounds-en-wav)")
    else:
        clips, labels = real
        with torch.inference_mode():
            ours = float(
                (model.fuse({"audio": model.encode_audio(clips)}).argmax(-1) == labels).double().mean()
            )
            base = float(
                (scratch.fuse({"audio": scratch.encode_audio(clips)}).argmax(-1) == labels).double().mean()
            )
        say(
            f"   real human speech (Asterisk recordings of 0-9, never trained on), audio only: "
            f"pretrained {ours:.0%}, from scratch {base:.0%}"
        )
    t0 = time.perf_counter()
    top, sizes = (4, [1, 4]) if quick else (16, [1, 2, 4, 8, 16])
    profile = mosel.profile(model, test.batches(64), max_batch_size=top, batch_sizes=sizes, repeats=3)
    say(f"   profiled (max batch {top}) in {time.perf_counter() - t0:.1f} s; branch latency (median ms):")
    for name, table in profile.branch_latency.items():
        say(f"   {name:<8} " + " ".join(f"b={b}: {table.at(b) / 1000:.1f}" for b in sorted({1, 4, top})))
    frontier = profile.plan.frontier(frozenset(profile.modalities), 4)
    first, best = frontier.strategies[0], frontier.best
    say(
        f"   frontier for 4 requests: {len(frontier.strategies)} strategies, from "
        f"{first.predicted_latency_ms:.1f} ms ({first.expected_accuracy:.3f}) to "
        f"{best.predicted_latency_ms:.1f} ms ({best.expected_accuracy:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and a shorter stream (tests)")
    parser.add_argument("--load", type=float, default=0.5, help="mean load, times the all-modality capacity")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seconds", type=float, default=None, help="length of the served stream")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", mosel.MoselWarning)
    started = time.perf_counter()
    epochs, duration_s = (6, 4.0) if args.quick else (20, 20.0)
    duration_s = args.seconds or duration_s

    say("1. building AV-Digits (sklearn digits + espeak-ng speech + noisy video frames) ...")
    t0 = time.perf_counter()
    train, test = data.load("train"), data.load("test")
    say(
        f"   {len(train)} train / {len(test)} test samples, speaker-independent split, "
        f"in {time.perf_counter() - t0:.1f} s"
    )

    say(f"2. training the from-scratch model, {epochs} epochs, with and without modality dropout ...")
    t0 = time.perf_counter()
    model = av_model.train(train, epochs=epochs, drop_probability=0.5)
    plain = av_model.train(train, epochs=epochs, drop_probability=0.0)
    with_drop = av_model.accuracy_per_configuration(model, test)
    without = av_model.accuracy_per_configuration(plain, test)
    say(f"   trained both in {time.perf_counter() - t0:.1f} s; test accuracy per configuration:")
    say(f"   {'configuration':<20} {'dropout':>8} {'no dropout':>11}")
    for key in with_drop:
        say(f"   {key:<20} {with_drop[key]:>8.3f} {without[key]:>11.3f}")

    say("3. profiling on this machine (latency per branch and batch size, accuracy per configuration) ...")
    t0 = time.perf_counter()
    profile = mosel.profile(
        model, test.batches(100), max_batch_size=32, batch_sizes=[1, 2, 4, 8, 12, 16, 24, 32], repeats=5
    )
    say(
        f"   profiled in {time.perf_counter() - t0:.1f} s (8 batch sizes timed, the others interpolated; "
        f"planner {profile.plan.build_seconds:.2f} s, exact={profile.plan.exact})"
    )
    say(f"\n   {'configuration':<20} {'accuracy':>9}   {'latency ms @1':>13} {'@8':>7} {'@32':>7}")
    cost = profile.cost_model()
    for config, accuracy in sorted(profile.accuracy.items(), key=lambda kv: kv[1]):
        lat = [cost.latency_us(((config, n),)) / 1000 for n in (1, 8, 32)]
        say(f"   {profile.key(config):<20} {accuracy:>9.3f}   {lat[0]:>13.2f} {lat[1]:>7.2f} {lat[2]:>7.2f}")
    say(f"\n   {'branch':<8} " + " ".join(f"{'b=' + str(b):>7}" for b in (1, 8, 16, 32)) + "   (median ms)")
    for name, table in profile.branch_latency.items():
        say(f"   {name:<8} " + " ".join(f"{table.at(b) / 1000:>7.2f}" for b in (1, 8, 16, 32)))
    everything = frozenset(profile.modalities)
    for n in (1, 8, 32):
        frontier = profile.plan.frontier(everything, n)
        say(f"\n   frontier for {n} request(s): {len(frontier.strategies)} strategies, e.g.")
        count = len(frontier.strategies)
        for i in sorted({0, count // 4, count // 2, 3 * count // 4, count - 1}):
            s = frontier.strategies[i]
            say(f"     {s.predicted_latency_ms:7.2f} ms  accuracy {s.expected_accuracy:.3f}  {describe(s)}")

    pretrained_section(train, test, model, quick=args.quick)

    say(
        f"\n5. serving the same bursty stream ({duration_s:.0f} s, job sizes max(1, N(1, 6)), deadline = "
        "all-modality latency + slack, floor = best - 6 points) twice ..."
    )
    trace = make_trace(profile, test, duration_s, load=args.load, seed=7)
    results = {}
    for policy in ("agnostic", "mosel"):
        t0 = time.perf_counter()
        results[policy] = replay(model, profile, trace, policy).metrics
        say(f"   {policy}: {time.perf_counter() - t0:.1f} s")
    say(f"\n   {len(trace)} jobs, {results['mosel']['requests']:.0f} requests, floor {trace[0].min_accuracy}")
    say(f"   {'metric':<28} {'all modalities':>15} {'mosel':>10}")
    rows = [
        ("deadline violations", "violation_ratio", "{:.1%}"),
        ("goodput (requests/s)", "goodput_rps", "{:.1f}"),
        ("job completion p50 (ms)", "jct_p50_ms", "{:.2f}"),
        ("job completion p99 (ms)", "jct_p99_ms", "{:.2f}"),
        ("accuracy vs labels (served)", "measured_accuracy", "{:.3f}"),
        ("  worst 1 s window", "window_accuracy_min", "{:.3f}"),
        ("  1 s windows below floor", "windows_below_floor", "{:.0%}"),
        ("expected accuracy (served)", "expected_accuracy", "{:.3f}"),
        ("requests served", "served_ratio", "{:.1%}"),
    ]
    for title, key, fmt in rows:
        say(
            f"   {title:<28} {fmt.format(results['agnostic'][key]):>15} "
            f"{fmt.format(results['mosel'][key]):>10}"
        )
    if args.quick:  # tests run the worked example on its own (tests/examples/test_image_text.py)
        say("\n6. the worked example (examples/image_text.py) is skipped with --quick")
    else:
        say("\n6. a model people actually have: examples/image_text.py (token ids + attention mask, image)")
        import image_text

        image_text.main()
    say(f"\ndemo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
