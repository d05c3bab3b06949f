# shellcheck shell=bash
# Shared by the Slurm batch scripts in this folder (sourced, not run): repository and environment, the
# rendezvous address, a config/layout check before anything is launched, a wait that survives trapped
# signals, and the requeue after a SIGUSR1 stop.

sdt_log() { echo "[sdt-slurm] $*" >&2; }
sdt_die() { sdt_log "error: $*"; exit 2; }

# sdt_init REPO: cd into the checkout, activate its virtualenv, set MASTER_ADDR/MASTER_PORT and HOSTS.
sdt_init() {
  local repo=$1
  [[ -n ${SLURM_JOB_ID:-} ]] || sdt_die "SLURM_JOB_ID is not set: submit this script with sbatch"
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || sdt_die "SLURM_JOB_NODELIST is not set: submit this script with sbatch"
  [[ -f $repo/launchers/pretrain_owt.py ]] ||
    sdt_die "$repo is not an sdt-dist checkout: run sbatch from the repository root or set SDT_REPO"
  cd "$repo" || sdt_die "cannot cd to $repo"
  local venv=${SDT_VENV:-$repo/.venv}
  if [[ -f $venv/bin/activate ]]; then
    # shellcheck source=/dev/null
    source "$venv/bin/activate"
  fi
  command -v python >/dev/null || sdt_die "no python on PATH (set SDT_VENV to the virtualenv)"
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  ((${#HOSTS[@]} > 0)) || sdt_die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
  # The first node hosts the rendezvous. The port is a function of the job id: the same after a requeue
  # (same job id), different for two jobs sharing a node.
  export MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  sdt_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${#HOSTS[@]} node(s): ${HOSTS[*]};" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; repo $repo"
}

# sdt_precheck WORLD ARGS...: validate the config and the layout for WORLD ranks before anything starts
# (the CLI exits 2 with the reason); the ranks print the resolved config and layout themselves.
sdt_precheck() {
  local world=$1
  shift
  [[ $* == *--config* ]] || sdt_die "pass the training arguments, e.g. --config launchers/configs/tiny.yaml"
  WORLD_SIZE=$world python launchers/pretrain_owt.py "$@" --print-config >/dev/null ||
    sdt_die "the config or the layout for $world ranks is invalid (message above); nothing was launched"
}

# sdt_trap_signals: on SIGUSR1/SIGTERM call forward_to_ranks SIGNAL (defined by the batch script). A
# SIGUSR1 stays recorded when a SIGTERM follows, so the job is still requeued.
SDT_SIGNAL=""
SDT_TRAPS=0
sdt_on_signal() {
  SDT_TRAPS=$((SDT_TRAPS + 1))
  [[ $SDT_SIGNAL == USR1 ]] || SDT_SIGNAL=$1
  sdt_log "received SIG$1: forwarding it to the ranks (they agree on a step, checkpoint and exit 0)"
  forward_to_ranks "$1" || sdt_log "warning: forwarding SIG$1 failed"
}
sdt_trap_signals() {
  trap 'sdt_on_signal USR1' USR1
  trap 'sdt_on_signal TERM' TERM
}

# sdt_wait PID: wait for PID and set SDT_RC to its exit status. A trapped signal makes `wait` return
# early (status > 128) while the process still runs: wait again until it has really ended.
sdt_wait() {
  local pid=$1 before status rounds=0
  SDT_RC=0
  while :; do
    before=$SDT_TRAPS
    status=0
    wait "$pid" || status=$?
    # 127 after a first round: the process was already reaped, its status is the previous one
    ((status == 127 && rounds > 0)) && break
    SDT_RC=$status
    rounds=$((rounds + 1))
    ((status > 128 && SDT_TRAPS != before)) || break
  done
}

# sdt_finish: after SIGUSR1 (Slurm's warning before the time limit) the ranks have checkpointed;
# requeue the job: it keeps its job id, and train.resume=auto continues from the newest checkpoint.
sdt_finish() {
  trap - USR1 TERM
  if [[ $SDT_SIGNAL == USR1 ]]; then
    ((SDT_RC == 0)) || sdt_log "warning: the launcher exited $SDT_RC after SIGUSR1; requeueing anyway" \
      "(the newest complete checkpoint is kept)"
    sdt_log "requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  sdt_log "launcher exited $SDT_RC${SDT_SIGNAL:+ after SIG$SDT_SIGNAL (not requeued)}"
  exit "$SDT_RC"
}
