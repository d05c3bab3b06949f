#!/usr/bin/env bash
# Fresh machine -> a small real SelfDistil-T training run (launchers/configs/tiny.yaml: 60 steps on
# OpenWebText-1000 from ../shared/data when present, else the hub's stas/openwebtext-10k).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export SDT_SHARED_DATA=${SDT_SHARED_DATA:-$(cd .. && pwd)/shared/data}
args=(--config launchers/configs/tiny.yaml)
if [ ! -f "$SDT_SHARED_DATA/openwebtext-1000/openwebtext-1000.jsonl.gz" ]; then
  args+=(--set data.source=stas/openwebtext-10k --set data.prepared=[runs/data/owt10k-sp4096])
fi
if python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  deepspeed --num_gpus "${NGPUS:-1}" launchers/pretrain_owt.py "${args[@]}" "$@"
else
  DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launchers/pretrain_owt.py "${args[@]}" "$@"
fi
echo "metrics: runs/tiny/metrics.jsonl  tensorboard: tensorboard --logdir runs/tiny/tensorboard"
