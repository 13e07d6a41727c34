#!/usr/bin/env bash
# The accelerator check (a GPU, or a TPU VM), unattended, in minutes: one JSON line per figure on stdout (and in
# $GPU_CHECK_OUT, default gpu_check.jsonl), each section in its own process under a time limit,
# so one failure does not hide the other figures.
#
#   env        versions, device, memory
#   matmul     measured bf16 / f32 matmul peak (8192^3) and the card's data-sheet peak
#   attention  cuDNN / XLA attention against a float32 einsum reference; forward+backward time
#   train      gpt2-124m bf16 training tokens/s, MFU (measured and nominal peak), remat none and
#              dots, and with XLA's attention instead of cuDNN's
#   levers     the training step's levers one at a time against the same step (bf16 logits into
#              the loss, the chunked loss, a vocabulary padded to 256, optax.flatten, XLA flags),
#              each in a process of its own with its allocator's peak; then those that paid
#              together, compiled cold and again from the persistent compilation cache
#   fit        per-device bytes of that step (parameters, optimizer, XLA's temporaries)
#   generate   decode tokens/s at batch 1 and 32
#   serve      the OpenAI server's throughput at concurrency 1 and 32 (real HTTP on loopback)
#   engine     the serving engine alone (no HTTP) and its decode step against generate's, batch 32
#   torch      the same training step in PyTorch (HF GPT-2, fused AdamW, bf16 autocast), eager
#              and torch.compile'd, when torch is importable
#   peer_generate  decode against transformers' `generate` (bench generate --peer torch), b1 and b32,
#              eager with its dynamic cache and with a static cache + torch.compile
#   grpo       make grpo's chain (byte-level base, supervised start, GRPO): time per stage and
#              GRPO's held-out exact match before and after
#
# Uses the Python and JAX already installed (PYTHON, default python3): nothing is downloaded.
# Where that Python lacks a dependency, `make install JAX=system` makes .venv-gpu, which keeps
# the installed JAX and takes the rest from the wheels in scripts/wheels (made with
# `make gpu-wheels` on a machine with a network). Refuses to run without a GPU unless
# GPU_CHECK_ALLOW_CPU=1, which also shrinks every case to a toy model (the CI rehearsal).
#
# Usage: bash scripts/gpu_check.sh [SECTION ...]     (default: all, in the order above)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_FILE=${GPU_CHECK_OUT:-gpu_check.jsonl}
WHEELS=${GPU_CHECK_WHEELS:-scripts/wheels}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Does $PY have this package's dependencies, in the versions pyproject.toml asks for?
unmet=$("$PY" - <<'EOF' 2>&1
import tomllib
from importlib import metadata

from packaging.requirements import Requirement

unmet = []
for line in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(line)
    try:
        if metadata.version(req.name) not in req.specifier:
            unmet.append(f"{req.name} {metadata.version(req.name)} (wants {req.specifier})")
    except metadata.PackageNotFoundError:
        unmet.append(f"{req.name} (missing)")
print(", ".join(unmet))
EOF
)
if [ -n "$unmet" ]; then
  # `make install JAX=system`, offline: an environment that sees $PY's packages (its JAX, CUDA
  # plugin, torch) and takes what is missing from the wheels that `make gpu-wheels` put here.
  [ -d "$WHEELS" ] || {
    echo "[gpu_check] $PY lacks: $unmet; and there is no $WHEELS (make gpu-wheels, then copy it here)" >&2
    exit 1
  }
  echo "[gpu_check] $PY lacks: $unmet; installing from $WHEELS" >&2
  if PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/$WHEELS" PYTHON="$PY" VENV=.venv-gpu JAX=system \
    EXTRAS=none bash scripts/install.sh >&2; then
    PY=.venv-gpu/bin/python
  else # no virtual environment here (no venv module, say): the missing wheels beside $PY
    echo "[gpu_check] make install JAX=system failed; adding the missing wheels to PYTHONPATH" >&2
    missing=$("$PY" - "$WHEELS" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
print(" ".join(str(w) for w in wheels if norm(w.name.split("-")[0]) not in have))
EOF
)
    site=$(mktemp -d)
    # shellcheck disable=SC2086
    [ -z "$missing" ] || "$PY" -m pip install -q --no-index --no-deps --target "$site" $missing >&2
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
fi

backend=$("$PY" -c "import jax; print(jax.default_backend())") || {
  echo "[gpu_check] JAX does not import with $PY" >&2
  exit 1
}
# A TPU VM runs the same sections (the PyTorch ones report themselves skipped there).
if [ "$backend" != gpu ] && [ "$backend" != tpu ]; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "[gpu_check] no GPU or TPU: JAX's backend is $backend (GPU_CHECK_ALLOW_CPU=1 rehearses on toy sizes)" >&2
    exit 2
  fi
  export GPU_CHECK_SIZE=tiny
fi

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(env matmul attention train levers fit generate serve engine torch peer_generate grpo)
declare -A limit=([levers]=1500 [train]=240 [torch]=300 [peer_generate]=600 [grpo]=180 [serve]=300 [engine]=240 [generate]=90 [fit]=90 [attention]=60 [env]=60 [matmul]=60)
: >"$OUT_FILE"
# every JSON line carries this run's stamp (with its overrides and XLA_FLAGS): see gpu_check.py
GPU_CHECK_RUN="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
export GPU_CHECK_RUN
failed=0
for section in "${sections[@]}"; do
  start=$(date +%s)
  echo "[gpu_check] $section" >&2
  timeout "${limit[$section]:-150}" "$PY" scripts/gpu_check.py "$section" | tee -a "$OUT_FILE"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    failed=1
    [ "$rc" -eq 124 ] && echo "{\"check\": \"$section\", \"error\": \"timed out\"}" | tee -a "$OUT_FILE"
  fi
  echo "[gpu_check] $section: $(($(date +%s) - start)) s, exit $rc" >&2
done
exit $failed
