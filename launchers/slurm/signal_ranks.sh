#!/usr/bin/env bash
# Send a signal to the training ranks of one DeepSpeed-launched job on this node.
#
#   signal_ranks.sh SIGNAL MASTER_PORT
#
# The ranks are the children of the job's per-node launcher (`python -m deepspeed.launcher.launch ...
# --master_port=PORT`; the port identifies the job). The launcher itself must not get the signal: on
# SIGTERM it terminates the ranks and SIGKILLs them 30 s later, possibly mid-checkpoint, and SIGUSR1
# would simply kill it.
set -euo pipefail
sig=${1:?usage: signal_ranks.sh SIGNAL MASTER_PORT}
port=${2:?usage: signal_ranks.sh SIGNAL MASTER_PORT}
sent=0
for launcher in $(pgrep -f -- "deepspeed[.]launcher[.]launch .*--master_port=${port}"'( |$)' || true); do
  for rank in $(pgrep -P "$launcher" || true); do
    if kill -s "$sig" "$rank" 2>/dev/null; then
      sent=$((sent + 1))
    fi
  done
done
echo "[sdt-slurm] $(hostname): sent SIG${sig} to ${sent} rank(s)" >&2
