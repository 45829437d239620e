#!/usr/bin/env bash
# The benchmark's real mode on a CUDA device, for a lent GPU machine: under 8 minutes.
# Usage (on the device, after benchmarks/gpu_prepare.sh here, carrying .gpu):
#   bash benchmarks/gpu_check.sh OUTDIR
# Uses the machine's own python3 and its CUDA torch (nothing is downloaded there).
set -euo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .gpu/whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mosel-site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/mosel-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .gpu/cache ]; then mkdir -p .cache && cp -rn .gpu/cache/. .cache/; fi
device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
"$PY" - <<'PY' | tee "$out/device.txt"
import os, platform, torch, ortools
print("torch", torch.__version__, "ortools", ortools.__version__, "python", platform.python_version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)")
print("cpu cores", os.cpu_count())
PY
timeout 420 "$PY" benchmarks/run.py --quick --real-only --device "$device" \
  --json "$out/benchmark.json" 2>&1 | tee "$out/benchmark.txt"
