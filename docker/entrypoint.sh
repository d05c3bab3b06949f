#!/usr/bin/env bash
# Container entrypoint: the documented launcher,
#   deepspeed $DS_LAUNCHER_ARGS launchers/pretrain_owt.py ARGS
# supervised so that `docker stop` (SIGTERM), SIGUSR1 and Ctrl-C reach the training ranks themselves: they
# agree on a step, write a checkpoint and exit 0. Signalled directly, DeepSpeed's launcher would kill the
# ranks 30 s later, and as PID 1 without a handler it would ignore SIGTERM altogether.
#   docker run IMAGE --config launchers/configs/tiny.yaml --set train.max_steps=100   # train
#   docker run -e DS_LAUNCHER_ARGS="--num_gpus 4" IMAGE --config ...                  # launcher options
#   docker run IMAGE bash                                                            # anything else
set -euo pipefail
if [[ $# -gt 0 && $1 != -* ]]; then
  exec "$@"
fi
read -r -a launcher_args <<<"${DS_LAUNCHER_ARGS:-}"

traps=0
# shellcheck disable=SC2317  # called from the traps below
forward() { # the ranks are the children of DeepSpeed's per-node launcher (the only one in this container)
  traps=$((traps + 1))
  echo "[sdt-docker] SIG$1: passing SIG$2 to the ranks (they checkpoint and exit)" >&2
  local launcher
  for launcher in $(pgrep -f 'deepspeed[.]launcher[.]launch' || true); do
    pkill "-$2" -P "$launcher" || true
  done
}
trap 'forward TERM TERM' TERM
trap 'forward USR1 USR1' USR1
trap 'forward INT TERM' INT # Ctrl-C: the same clean stop (a rank would die on KeyboardInterrupt)

deepspeed "${launcher_args[@]}" launchers/pretrain_owt.py "$@" &
pid=$!
rc=0
rounds=0
while :; do # a trapped signal ends `wait` early (status > 128) while the launcher still runs: wait again
  before=$traps
  status=0
  wait "$pid" || status=$?
  ((status == 127 && rounds > 0)) && break # reaped in the previous round: keep its status
  rc=$status
  rounds=$((rounds + 1))
  ((status > 128 && traps != before)) || break
done
exit "$rc"
