"""Size and decode time of float32 inputs in a /predict body: JSON lists against binary leaves.

A batch of waveforms (random normal float32 samples, as a feature extractor's output looks) is
written three ways: nested JSON lists (``tensor.tolist()`` then ``json.dumps``: what a client
writes), ``{"$b64": ..., "dtype": "float32", "shape": [...]}`` and ``{"$npy": ...}``. For each:
bytes per 1,000 values, the client's encode time and the server's decode time (``json.loads``
of the whole body plus :func:`mosel.schema.decode` against a float32 schema: what
``mosel.http`` runs), per 1,000 values; medians over repeats.

Run: python benchmarks/wire.py [--rows 8] [--samples 16000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mosel.schema import LeafSchema, ModalitySchema, decode

SCHEMA = ModalitySchema(0, (LeafSchema((), "float32", (None,)),))


def as_json(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": {"audio": torch.from_numpy(x).tolist()}}).encode()


def as_b64(x: np.ndarray) -> bytes:
    leaf = {
        "$b64": base64.b64encode(x.astype("<f4").tobytes()).decode(),
        "dtype": "float32",
        "shape": list(x.shape),
    }
    return json.dumps({"inputs": {"audio": leaf}}).encode()


def as_npy(x: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, x)
    return json.dumps({"inputs": {"audio": {"$npy": base64.b64encode(out.getvalue()).decode()}}}).encode()


def server(body: bytes) -> torch.Tensor:
    return decode("audio", json.loads(body)["inputs"]["audio"], SCHEMA)


def median_us(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16_000, help="values per row (16 kHz: one second)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = np.random.default_rng(0).standard_normal((args.rows, args.samples)).astype(np.float32)
    per = x.size / 1000
    print(
        f"{args.rows} x {args.samples} float32 values, {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        "| encoding | bytes per 1,000 values | client encode (us per 1,000) | server decode (us per 1,000) |"
    )
    print("|---|---:|---:|---:|")
    for name, encode in (("JSON lists", as_json), ("$b64", as_b64), ("$npy", as_npy)):
        body = encode(x)
        assert torch.equal(server(body), torch.from_numpy(x))
        enc = median_us(lambda encode=encode: encode(x), args.repeats) / per
        dec = median_us(lambda body=body: server(body), args.repeats) / per
        print(f"| {name} | {len(body) / per:,.0f} | {enc:,.1f} | {dec:,.1f} |")


if __name__ == "__main__":
    main()
