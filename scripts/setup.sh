#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with torch (CUDA build where a GPU is present, the CPU
# build otherwise), DeepSpeed, megatron-core and sdt-dist with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH=torch==2.13.0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -q "$TORCH"                        # CUDA build from PyPI
elif pip install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
  pip install -q "$TORCH"                        # a local wheel (find-links) is a CPU build; now its deps
else
  # never pull the multi-GB CUDA build onto a CPU machine
  pip install -q "$TORCH" --index-url https://download.pytorch.org/whl/cpu
fi
# dev: pytest, hypothesis, ruff, hadolint. mpi: mpirun launches find their ranks through mpi4py, whose wheel
# loads the system's MPI library at run time, so it is added only where an MPI is installed.
extras=dev
if command -v mpirun >/dev/null 2>&1; then
  extras=dev,mpi
fi
pip install -q -e ".[$extras]"
python - <<'PY'
import deepspeed, megatron.core, torch
print(f"sdt-dist environment ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"megatron-core {megatron.core.__version__}, cuda={torch.cuda.is_available()}")
PY
