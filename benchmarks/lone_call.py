"""CPU time of a lone ``infer`` on ``Passthrough`` against its branches and fusion called by hand.

Run it twice, with the code to compare on ``PYTHONPATH`` (a ``git worktree`` of another commit),
alternating in one shell: the ratio is what this figure is for on a shared host.

With ``--hf``: the same for the Hugging Face ViT + BERT model of ``benchmarks/overhead.py`` (a lone
``infer`` at batch 1 against the branches and fusion by hand, interleaved, 1 torch thread; process
CPU time per call, medians): mosel's share of the model's own CPU time.

Run: PYTHONPATH=src python benchmarks/lone_call.py [--hf [--repeats N]]
"""

import argparse
import statistics
import time
import warnings

import torch

import mosel
from mosel.testing import Passthrough, synthetic_profile, toy_av_data


def hf(repeats: int) -> None:
    import overhead  # this directory's benchmark: its model, inputs and interleaved idle timing

    torch.set_num_threads(1)
    model, preprocess, (ex, test) = overhead.hf_model()
    row = overhead.hf_idle(model, overhead.hf_inputs(preprocess, ex, test, 1), repeats)
    mosel.close(model)
    by_hand, extra = row["direct_cpu"], row["overhead_cpu"]
    print(
        f"HF ViT + BERT, batch 1: by hand {by_hand['median_us']:.0f} us CPU, infer adds {extra['median_us']:.0f} us "
        f"[p10-p90 {extra['p10_us']:.0f}-{extra['p90_us']:.0f}]: {100 * extra['median_us'] / by_hand['median_us']:.1f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", action="store_true", help="the Hugging Face model instead of Passthrough")
    parser.add_argument("--repeats", type=int, default=300, help="interleaved calls (--hf)")
    args = parser.parse_args()
    warnings.simplefilter("default", mosel.MoselWarning)  # shown once per place, not silenced
    if args.hf:
        hf(args.repeats)
        return
    torch.set_num_threads(2)
    branch_us = {"audio": [100 + 10 * b for b in range(1, 33)], "video": [300 + 60 * b for b in range(1, 33)]}
    accuracy = {"audio": 0.78, "video": 0.55, "audio+video": 0.92}
    null = Passthrough().eval()
    mosel.attach(null, synthetic_profile(null, branch_us=branch_us, accuracy=accuracy))
    spec = mosel.spec_of(null)
    x = toy_av_data(1, seed=1)[0]

    def direct() -> object:
        f = {m: getattr(null, spec.branches[m])(x[m]) for m in spec.modalities}
        return getattr(null, spec.fusion)(f)

    res: dict[str, tuple[float, float, float]] = {}
    with torch.inference_mode():
        for name, fn in (("direct", direct), ("infer", lambda: null.infer(x))):
            for _ in range(300):
                fn()
            samples = []
            for _ in range(15):
                t = time.process_time()
                w = time.perf_counter()
                for _ in range(500):
                    fn()
                samples.append(((time.process_time() - t) / 500 * 1e6, (time.perf_counter() - w) / 500 * 1e6))
            res[name] = (
                statistics.median(s[0] for s in samples),
                min(s[0] for s in samples),
                min(s[1] for s in samples),
            )
    print({k: tuple(round(v, 1) for v in vs) for k, vs in res.items()}, "(cpu median, cpu min, wall min) us")


if __name__ == "__main__":
    main()
