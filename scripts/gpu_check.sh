#!/usr/bin/env bash
# The paper-scale CUDA measurements in one run (README, "GPUs"); the numbers go to --out.
#
#   bash scripts/gpu_check.sh --prepare-wheels                  # here, with network: build/gpu-wheels/
#   bash scripts/gpu_check.sh --device cuda --out runs/gpu-check # there: one CUDA GPU, no network
#   bash scripts/gpu_check.sh --device cpu --tiny --out DIR      # the dry run (tests/test_gpu_check.py)
#
# On the GPU machine it first makes build/gpu-venv: a venv with its own pip (ensurepip, offline)
# that reads the machine's own packages (its torch is never replaced), then installs there, with
# `pip --no-index` from build/gpu-wheels, the carried wheels the machine lacks (bitsandbytes with
# its CUDA 13 library and einops: Python-independent wheels; matplotlib only if prepared with
# --matplotlib-python X.Y) and the checkout (`pip install --no-deps -e .`). Then each method runs in
# its own process; gpu_check.json under --out is the machine-readable summary (status, versions,
# setup, measurements, targets).
# Environment: PYTHON (default python3), SLIMTUNE_GPU_WHEELS, SLIMTUNE_GPU_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${SLIMTUNE_GPU_WHEELS:-build/gpu-wheels}
VENV=${SLIMTUNE_GPU_VENV:-build/gpu-venv}

if [ "${1:-}" = "--prepare-wheels" ]; then
  shift
  if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
  exec "${PYTHON:-python3}" -m scripts.gpu_check prepare-wheels --dest "$WHEELS" "$@"
fi
PYTHON=${PYTHON:-python3}
VENV_PY=$("$PYTHON" -m scripts.gpu_check setup --venv "$VENV" --wheels "$WHEELS" "$@")
exec "$VENV_PY" -m scripts.gpu_check run "$@"
