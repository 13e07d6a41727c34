#!/usr/bin/env bash
# The GPU checks, in a few minutes: gpt2-124m training step in bfloat16 (tokens/s, MFU against
# the measured bfloat16 matmul peak), generation throughput, and `fit` for the same config.
# Needs a machine with an NVIDIA GPU and this package installed (JAX with CUDA).
# Usage: bash scripts/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
"$PY" -c "import jax; print(jax.devices())"
"$PY" -m pipeline fit --config configs/gpt2-124m.yaml model.compute_dtype=bfloat16 train.batch_size=16
"$PY" -m pipeline bench train --cases gpt2-124m --steps 10 --json \
  model.compute_dtype=bfloat16 train.batch_size=16
"$PY" -m pipeline bench train --cases gpt2-124m --steps 10 --json \
  model.compute_dtype=bfloat16 train.batch_size=16 model.remat=dots
"$PY" -m pipeline bench generate --config configs/gpt2-124m.yaml --cases b1,b32 --json
