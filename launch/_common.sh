# Sourced by the launch scripts.
# shellcheck shell=bash

# require_config FILE: the config must exist.
require_config() {
  if [[ ! -f "$1" ]]; then
    echo "error: config file $1 not found; pass one of configs/*.yaml" >&2
    exit 2
  fi
}

# NPROC defaults to the number of visible GPUs, or 2 on a machine without one. A value given must be a
# positive integer (or one of torchrun's own words gpu, cpu, auto), checked here rather than by torchrun's traceback.
default_nproc() {
  if [[ -z "${NPROC:-}" ]]; then
    local gpus
    gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NPROC=$(( gpus > 0 ? gpus : 2 ))
  fi
  if [[ ! "$NPROC" =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]]; then
    echo "error: NPROC=$NPROC is not a number of processes per node; set NPROC to a positive integer (e.g. NPROC=2) or leave it unset for one per GPU" >&2
    exit 2
  fi
}

# run_with_status CMD...: run a torchrun line, forward SIGTERM/SIGUSR1 to it as SIGTERM (torchrun passes
# it to every worker, which checkpoints at the next step boundary), and exit with the status that the
# training wrote to LSTM_DIST_EXIT_FILE: with that file set, the workers exit 0 after a run that ended in
# order (done 0, user error 2, non-finite stop 3, preempted 75), so torchrun ends without a traceback of
# its own, and only a crash reaches torchrun, which reports it as 1.
run_with_status() {
  echo "+ $*" >&2
  export LSTM_DIST_EXIT_FILE
  LSTM_DIST_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/lstm_dist_exit.XXXXXX")
  trap 'rm -f "$LSTM_DIST_EXIT_FILE"' EXIT
  "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM USR1 INT
  set +e
  while true; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break   # wait returns early when a trapped signal arrives
  done
  set -e
  if [[ -s "$LSTM_DIST_EXIT_FILE" ]]; then
    status=$(<"$LSTM_DIST_EXIT_FILE")
  fi
  exit "$status"
}
