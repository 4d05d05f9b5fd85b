#!/usr/bin/env bash
# GPU benchmark of the deep-learning backends (TotalSegmentator fast, nnU-Net, MONAI) on a
# 512x512x300 CT: model load, time per study cold and warm, peak host and GPU memory.
# The same script as the CPU figures (bench/bench_backends.py), with --device cuda.
# Runs unchanged on any CUDA machine with segnode[dl] installed; nothing is downloaded
# (random-weight networks of real size are built locally, see bench/bench_backends.py).
#
#   bench/gpu_bench.sh [WORKDIR]            (default: bench/out/backends_gpu)
#
# Environment: PYTHON (interpreter, default .venv/bin/python), WARM (warm repeats, default 2),
# BACKENDS (default totalsegmentator,nnunet,monai), SLICES (default 300).
# Prints a table and writes WORKDIR/results_cuda.json; expect a few minutes in total
# (the CPU run of the same benchmark takes tens of minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=${1:-bench/out/backends_gpu}
"$PY" - <<'PYEOF' || { echo "no CUDA device visible to torch: this benchmark is for a GPU (use bench/bench_backends.py --device cpu)"; exit 2; }
import sys, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(0 if torch.cuda.is_available() else 1)
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" bench/bench_backends.py --device cuda --work "$WORK" --warm "${WARM:-2}" \
  --backends "${BACKENDS:-totalsegmentator,nnunet,monai}" --slices "${SLICES:-300}"
