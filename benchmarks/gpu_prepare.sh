#!/usr/bin/env bash
# Run HERE before a device check: puts into .gpu/ (git-ignored) what the offline GPU machine lacks.
# It has Python 3.12 with a CUDA torch but no OR-Tools, no network and no espeak-ng, so this
# fetches OR-Tools' wheels for it and exports the AV-Digits test split (no training audio) and the
# benchmark's trained weights. Then: device run with carry [".gpu"], command
#   bash benchmarks/gpu_check.sh $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
rm -rf .gpu
mkdir -p .gpu/whl .gpu/cache/av_digits .gpu/cache/benchmarks
"$BIN/python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  ortools==9.15.6755 protobuf==6.33.6 immutabledict==4.3.1 optree==0.20.0
"$BIN/python" - <<'PY'
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = ["benchmarks", "examples"]
from av_digits import data  # noqa: E402
from scenarios import CACHE, av_digits_model  # noqa: E402

if av_digits_model("cpu") is None:  # trains and caches the weights if needed
    sys.exit("AV-Digits needs espeak-ng here: apt-get install -y espeak-ng")
full = data.build()
arrays = dict(np.load(full, allow_pickle=False))
arrays["train_audio"] = arrays["train_audio"][:0]  # the test split never reads it
np.savez_compressed(Path(".gpu/cache/av_digits") / full.name, **arrays)
shutil.copy(CACHE / "av-digits-6ep.pt", ".gpu/cache/benchmarks/")
PY
du -sh .gpu
