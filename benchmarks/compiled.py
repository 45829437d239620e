"""Compiled against eager branches, as the profiler measures them (issue 13, item 7).

The worked example's model (``examples/image_text.py``: a CNN image tower, a transformer text
tower over token ids) is trained once, profiled eager, then compiled with
``mosel.compile_branches`` (torch.compile, inductor) and profiled again. Printed: each branch's
profiled latency at every measured batch size, both ways, and the compile time.

Run: python benchmarks/compiled.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import image_text

import mosel


def main() -> None:
    torch.set_num_threads(1)
    model, eager, (test_inputs, test_labels) = image_text.build()
    started = time.perf_counter()
    mosel.compile_branches(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = mosel.profile(
            model, image_text.batches(test_inputs, test_labels), max_batch_size=16,  # type: ignore[arg-type]
            batch_sizes=[1, 2, 4, 8, 16], progress=False,
        )  # fmt: skip
    took = time.perf_counter() - started
    print(
        f"image_text on {compiled.fingerprint.device}, 1 torch thread; compiled parts {compiled.fingerprint.compiled}"
    )
    print(f"profiling the compiled model took {took:.0f} s (compilation included); warnings: {len(caught)}")
    print("| branch | batch | eager ms | compiled ms | compiled / eager |")
    print("|---|---:|---:|---:|---:|")
    for name in eager.modalities:
        for b in eager.branch_latency[name].measured_sizes:
            e, c = eager.branch_latency[name].at(b) / 1000, compiled.branch_latency[name].at(b) / 1000
            print(f"| {name} | {b} | {e:.3f} | {c:.3f} | {c / e:.2f} |")


if __name__ == "__main__":
    main()
