"""CPU time of a lone ``infer`` on ``Passthrough`` against its branches and fusion called by hand.

Run it twice, with the code to compare on ``PYTHONPATH`` (a ``git worktree`` of another commit),
alternating in one shell: the ratio is what this figure is for on a shared host.

Run: PYTHONPATH=src python benchmarks/lone_call.py
"""

import statistics
import time
import warnings

import torch

import mosel
from mosel.testing import Passthrough, synthetic_profile, toy_av_data


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", mosel.MoselWarning)
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
