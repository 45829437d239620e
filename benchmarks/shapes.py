"""Shape-aware costs (issue 13, item 3): a text tower priced per sequence-length bucket, or at one.

The worked example's model (``examples/image_text.py``: CNN image tower, transformer text tower
over token ids with a padding mask) is trained once; its text then arrives padded to 24, 64, 128
or 256 tokens (a service whose callers pad to their batch's longest text). The subclass below
declares ``@mosel.modality("text", size=<padded length>, buckets=(24, 64, 128, 256))``, so the
profiler times the text tower at each length the validation data holds and plans per bucket.
"blind" is the same profile with the size buckets removed: every job priced at the first
validation batch's length (24), which is what a fixed-shape profile gives.

Printed, measured side by side in one run:

1. Pricing: for each length and job size, measured execution (all modalities, median of
   ``--repeats`` runs) over the prediction, blind and sized.
2. Serving: one mixed-length Poisson trace (lengths uniform, jobs of 1-8 requests, one fixed
   deadline; three floors), replayed live under blind and sized pricing, alternating, ``--runs``
   times each: violation ratio, expected and measured accuracy. Medians with the min-max spread.

Run: python benchmarks/shapes.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import image_text
from replay import RealJob, replay
from workloads import poisson_arrivals

import mosel

LENGTHS = (24, 64, 128, 256)


@mosel.multimodal
class LongImageText(image_text.ImageText):
    """The worked example with positions up to 256 tokens and its text priced per padded length."""

    def __init__(self) -> None:
        super().__init__()
        self.position = nn.Parameter(0.02 * torch.randn(max(LENGTHS), self.position.shape[1]))

    @mosel.modality("text", size=lambda text: text["input_ids"].shape[1], buckets=LENGTHS)
    def encode_text(self, text: Mapping[str, Tensor]) -> Tensor:
        return super().encode_text(text)


def pad(inputs: Mapping[str, object], length: int) -> dict[str, object]:
    """The inputs with the text padded (id 0, mask False) to ``length`` tokens."""
    text = inputs["text"]
    assert isinstance(text, dict)
    extra = length - text["input_ids"].shape[1]
    return dict(inputs) | {
        "text": {
            "input_ids": functional.pad(text["input_ids"], (0, extra), value=image_text.PAD),
            "attention_mask": functional.pad(text["attention_mask"], (0, extra), value=False),
        }
    }


def spread(values: list[float], fmt: str = ".3f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter traces")
    parser.add_argument("--runs", type=int, default=3, help="live runs per pricing")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the live trace")
    parser.add_argument("--load", type=float, default=0.5, help="arrival rate over the all-modality capacity")
    parser.add_argument(
        "--deadline-length",
        type=int,
        default=128,
        choices=LENGTHS,
        help="the deadline is 1.5x the all-modality time of a 4-request job at this text length",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per pricing cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.seconds, args.repeats = 2, 5.0, 7
    torch.set_num_threads(1)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = LongImageText()
    train_inputs, train_labels = image_text.make_split(3000, seed=1)
    mosel.train_with_modality_dropout(
        model, lambda: image_text.batches(train_inputs, train_labels, 64), epochs=12, drop_probability=0.5
    )
    model.eval()
    test_inputs, test_labels = image_text.make_split(1000, seed=2)
    validation = [
        (
            pad(image_text.rows(test_inputs, slice(i * 250, (i + 1) * 250)), length),
            test_labels[i * 250 : (i + 1) * 250],
        )
        for i, length in enumerate(LENGTHS)
    ]
    sized = mosel.profile(model, validation, max_batch_size=16, batch_sizes=[1, 2, 4, 8, 16], progress=False)
    blind = dataclasses.replace(sized, sized=MappingProxyType({}), sized_plans=MappingProxyType({}))
    everything = frozenset(sized.modalities)
    print(
        f"shapes: LongImageText (examples/image_text.py, positions to {max(LENGTHS)}), {sized.fingerprint.device}, "
        f"torch {torch.__version__}, 1 torch thread; trained and profiled in {time.perf_counter() - started:.0f} s"
    )
    print("accuracy: " + ", ".join(f"{sized.key(c)} {a:.3f}" for c, a in sized.accuracy.items()))
    print("text branch profiled per bucket (ms at b=1 / b=8 / b=16): " + ", ".join(
        f"{e}: {t.at(1) / 1000:.2f}/{t.at(8) / 1000:.2f}/{t.at(16) / 1000:.2f}"
        for e, t in sorted(sized.sized["text"].tables.items())
    ))  # fmt: skip
    checks = [abs(c.relative_error) for c in sized.cost_checks]
    print(f"cost checks: {len(checks)} (at {len({c.buckets for c in sized.cost_checks})} buckets), "
          f"median |error| {statistics.median(checks):.0%}")  # fmt: skip

    print(f"\n## 1. Pricing: measured / predicted execution, all modalities, median of {args.repeats} runs\n")
    print(
        "| text length | job size | measured ms | blind predicted ms | measured / blind | sized predicted ms | measured / sized |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    mosel.attach(model, sized)
    ratios: dict[str, list[float]] = {"blind": [], "sized": []}
    served_ms: dict[tuple[int, int], float] = {}  # (length, n) -> measured, all modalities
    for length in LENGTHS:
        for n in (1, 4, 8):
            job = pad(image_text.rows(test_inputs, slice(0, n)), length)
            measured = statistics.median(
                model.infer(job).measured_latency_ms
                for _ in range(args.repeats)  # type: ignore[operator]
            )
            served_ms[length, n] = measured
            groups = ((everything, n),)
            blind_ms = blind.cost_model().latency_us(groups) / 1000
            sized_ms = sized.priced_at(sized.bucket({"text": length}))[1].latency_us(groups) / 1000
            ratios["blind"].append(measured / blind_ms)
            ratios["sized"].append(measured / sized_ms)
            print(f"| {length} | {n} | {measured:.2f} | {blind_ms:.2f} | {measured / blind_ms:.2f} | "
                  f"{sized_ms:.2f} | {measured / sized_ms:.2f} |")  # fmt: skip
    mosel.close(model)
    for name, values in ratios.items():
        print(f"{name}: measured/predicted {spread(values, '.2f')} (median, min-max over the cells)")

    # One fixed deadline for the service, from the machine as served now (measured above, not the
    # profile: a shared host drifts): 1.5x the all-modality time of a 4-request job at
    # --deadline-length tokens (longer texts must drop text on some rows to make it).
    # The load is relative to the all-modality time of 4-request jobs, averaged over the lengths.
    # Three floors: none; just below the best single modality (a long text can drop to it); and
    # half-way between it and the pair (every job needs text on some rows).
    deadline_ms = round(1.5 * served_ms[args.deadline_length, 4], 2)
    single = max(a for c, a in sized.accuracy.items() if len(c) == 1)
    floors = (None, round(single - 0.01, 3), round((single + sized.accuracy[everything]) / 2, 3))
    rate = args.load * 1000 / statistics.mean(served_ms[length, 4] for length in LENGTHS)
    rng = random.Random(args.seed)
    trace = []
    for t in poisson_arrivals(rate, args.seconds, args.seed):
        n = rng.randint(1, 8)
        length = rng.choice(LENGTHS)
        rows = torch.tensor([rng.randrange(len(test_labels)) for _ in range(n)])
        trace.append((t, n, pad(image_text.rows(test_inputs, rows), length), test_labels[rows]))
    print(
        f"\n## 2. Serving: {len(trace)} jobs over {args.seconds:.0f} s, Poisson, {args.load}x the all-modality "
        f"capacity as measured above (4-request jobs, mean over lengths), jobs of 1-8 requests, lengths "
        f"uniform in {LENGTHS}, deadline {deadline_ms} ms; policy mosel, latency quantile 0.5; "
        f"{args.runs} runs per cell, alternating; seed {args.seed}. A job refused at admission counts as a "
        f"violation.\n"
    )
    print(
        "| floor | pricing | violation ratio | served | expected accuracy | measured accuracy | JCT p50 ms | JCT p99 ms |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for floor in floors:
        jobs = [RealJob(t, n, deadline_ms, floor, x, y) for t, n, x, y in trace]  # type: ignore[arg-type]
        results: dict[str, list[dict[str, float]]] = {"blind": [], "sized": []}
        for run in range(args.runs):
            for name in ("blind", "sized") if run % 2 == 0 else ("sized", "blind"):
                profile = blind if name == "blind" else sized
                results[name].append(replay(model, profile, jobs, mosel.SchedulerConfig()).metrics)
        for name, runs in results.items():
            print(
                f"| {floor or 'none'} | {name} | {spread([r['violation_ratio'] for r in runs])} | "
                f"{spread([r['served_ratio'] for r in runs])} | "
                f"{spread([r['expected_accuracy'] for r in runs], '.4f')} | "
                f"{spread([r['measured_accuracy'] for r in runs], '.4f')} | "
                f"{spread([r['jct_p50_ms'] for r in runs], '.1f')} | "
                f"{spread([r['jct_p99_ms'] for r in runs], '.1f')} |"
            )
    print(f"\nshapes finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
