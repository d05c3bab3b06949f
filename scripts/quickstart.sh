#!/usr/bin/env bash
# Fresh machine -> a small real SelfDistil-T training run (launchers/configs/tiny.yaml: 60 steps on the
# OpenWebText-1000 sample shipped in data/openwebtext-1000/; no network needed after setup). With network,
# a hub corpus works too: bash scripts/quickstart.sh --set data.source=stas/openwebtext-10k \
#   --set data.prepared=[runs/data/owt10k-sp4096]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
args=(--config launchers/configs/tiny.yaml)
if python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  deepspeed --num_gpus "${NGPUS:-1}" launchers/pretrain_owt.py "${args[@]}" "$@"
else
  DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launchers/pretrain_owt.py "${args[@]}" "$@"
fi
echo "metrics: runs/tiny/metrics.jsonl  tensorboard: tensorboard --logdir runs/tiny/tensorboard"
