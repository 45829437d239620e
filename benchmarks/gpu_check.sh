#!/usr/bin/env bash
# The benchmark's real mode on a CUDA device, for a lent GPU machine: under 8 minutes.
# Usage: bash benchmarks/gpu_check.sh OUTDIR
set -euo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
command -v espeak-ng >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq espeak-ng; }
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install --quiet torch -e ".[examples]" 2>&1 | tail -n 2
.venv-gpu/bin/python - <<'PY' | tee "$out/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
timeout 420 .venv-gpu/bin/python benchmarks/run.py --quick --real --device cuda --json "$out/benchmark.json" \
  | tee "$out/benchmark.txt"
