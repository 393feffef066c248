# Sourced by the launch scripts.
# shellcheck shell=bash

me="launch/$(basename "$0")"   # how this script names itself in its own lines

# usage: this script's header comment (line 2 to the first line that is not a comment), on stdout.
usage() {
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}

two_configs() {
  echo "error: two config files, $1 and $2; pass one (its settings can be overridden with section.key=value)" >&2
  exit 2
}

# parse_args ARGS...: a launch script's command line, `[--config] CONFIG [section.key=value ...]`, as
# lstm_dist.train takes it: the config first on its own, or as --config FILE / --config=FILE anywhere. Sets
# `config` and the array `overrides` (everything else, handed to lstm_dist.train as given). -h or --help:
# the usage on stdout and exit 0; no config: one line and exit 2.
parse_args() {
  config=""
  overrides=()
  while (( $# )); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --config)
        if [[ $# -lt 2 ]]; then
          echo "error: --config needs a file; run $me --config configs/smoke.yaml (see $me --help)" >&2
          exit 2
        fi
        [[ -z "$config" ]] || two_configs "$config" "$2"
        config=$2; shift ;;
      --config=*)
        [[ -z "$config" ]] || two_configs "$config" "${1#--config=}"
        config=${1#--config=} ;;
      *)
        if [[ -z "$config" && ${#overrides[@]} -eq 0 && "$1" != -* && "$1" != *=* ]]; then
          config=$1
        else
          overrides+=("$1")
        fi ;;
    esac
    shift
  done
  if [[ -z "$config" ]]; then
    echo "error: no config file; run $me CONFIG [section.key=value ...], e.g. $me configs/smoke.yaml (see $me --help)" >&2
    exit 2
  fi
}

# require_config FILE: the config must exist.
require_config() {
  if [[ ! -f "$1" ]]; then
    echo "error: config file $1 not found; pass one of configs/*.yaml" >&2
    exit 2
  fi
}

# NPROC_PER_NODE (torchrun's --nproc_per_node; slurm/train.sh reads the same name) defaults to the number of
# visible GPUs, or 2 on a machine without one. NPROC, its old name, is still read (both set: they must agree).
# A value given must be a positive integer (or one of torchrun's own words gpu, cpu, auto), checked here
# rather than by torchrun's traceback.
default_nproc() {
  local name=NPROC_PER_NODE
  if [[ -n "${NPROC:-}" ]]; then
    if [[ -n "${NPROC_PER_NODE:-}" && "$NPROC_PER_NODE" != "$NPROC" ]]; then
      echo "error: NPROC=$NPROC and NPROC_PER_NODE=$NPROC_PER_NODE disagree; set NPROC_PER_NODE only (NPROC is its old name)" >&2
      exit 2
    fi
    NPROC_PER_NODE=$NPROC
    name=NPROC
  fi
  if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    local gpus
    gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NPROC_PER_NODE=$(( gpus > 0 ? gpus : 2 ))
  fi
  if [[ ! "$NPROC_PER_NODE" =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]]; then
    echo "error: $name=$NPROC_PER_NODE is not a number of processes per node; set NPROC_PER_NODE to a positive integer (e.g. NPROC_PER_NODE=2) or leave it unset for one per GPU" >&2
    exit 2
  fi
}

# require_port VALUE: MASTER_PORT, when given, must be a TCP port number.
require_port() {
  if [[ ! "$1" =~ ^[1-9][0-9]{0,4}$ ]] || (( $1 > 65535 )); then
    echo "error: MASTER_PORT=$1 is not a TCP port number; set MASTER_PORT to a free port from 1024 to 65535, the same on every node" >&2
    exit 2
  fi
}

# Stopping a run. torchrun turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into a shutdown of its workers that kills
# them 30 s later whatever they are doing (a checkpoint that takes longer is lost) and ends in a SignalException
# traceback. So, as slurm/train.sh does on a cluster, these scripts keep torchrun out of it and hand a stop to
# the training processes themselves:
# - torchrun starts with SIGTERM, SIGUSR1 and SIGINT ignored and with TORCHRUN_SIGNALS (it handles SIGHUP and
#   SIGQUIT only), so it stays up; its workers inherit the ignored signals until lstm_dist.train installs its
#   own handlers for SIGTERM and SIGUSR1.
# - SIGTERM or SIGUSR1 to this script: it says so in one line and sends the same signal to every process that
#   torchrun started (its children, each in a session of its own). They set a flag, agree at the next log
#   step (within log.every steps), write one checkpoint and exit with 75 (see run_with_status); the script exits 75.
# - SIGINT (Ctrl-C) is the same stop, handed on as SIGTERM. A second SIGINT kills torchrun and the training
#   processes at once, without a checkpoint (the last one written is untouched, as after any crash), and the
#   script exits 130.
# - SIGHUP and SIGQUIT stay torchrun's: it stops the workers with SIGTERM, kills them 30 s later, and exits 1.
# A stop is handed on again every second until torchrun exits, so that one asked for before the workers
# could take it (torchrun still starting them, multinode.sh waiting for the other nodes, a worker still
# importing) is not lost; a worker that already has it only sees its flag set again.
# shellcheck disable=SC2034  # used by the scripts that source this file
TORCHRUN_SIGNALS=--signals-to-handle=SIGHUP,SIGQUIT
stop=""    # the signal handed to the training processes, once a stop was asked for
killed=""  # set when a second SIGINT killed them

# torchrun_children: the pids of the processes that torchrun ($child) started, one a line.
torchrun_children() {
  if command -v pgrep >/dev/null; then
    pgrep -P "$child" || true
  else   # no procps (slim container images): the kernel's own lists, one per thread of torchrun
    cat /proc/"$child"/task/*/children 2>/dev/null | tr ' ' '\n' | grep . || true
  fi
}

# signal_workers SIG: send SIG to every process that torchrun started.
signal_workers() {
  local -a pids
  mapfile -t pids < <(torchrun_children)
  (( ${#pids[@]} == 0 )) || kill -s "$1" "${pids[@]}" 2>/dev/null || true
}

# ask_stop SIG: the trap for SIGTERM, SIGUSR1 and SIGINT.
ask_stop() {
  if [[ "$1" == INT && -n "$stop" ]]; then
    local -a pids
    mapfile -t pids < <(torchrun_children)
    kill -KILL "$child" 2>/dev/null || true   # torchrun first: it must not report (or restart) the workers
    disown "$child" 2>/dev/null || true       # and bash not note its death ("Killed") on stderr
    (( ${#pids[@]} == 0 )) || kill -KILL "${pids[@]}" 2>/dev/null || true
    killed=1
    echo "[$me] SIGINT again: training processes killed without a checkpoint; the last checkpoint written is untouched (run the same command to resume from it)" >&2
    return
  fi
  [[ -z "$stop" ]] || return 0   # already handed on, and again every second
  if [[ "$1" == INT ]]; then
    stop=TERM
    echo "[$me] SIGINT: every training process checkpoints at its next step and exits with 75; Ctrl-C again stops them at once, without a checkpoint" >&2
  else
    stop=$1
    echo "[$me] SIG$1: every training process checkpoints at its next step and exits with 75" >&2
  fi
}

# run_with_status CMD...: run a torchrun line (it must carry $TORCHRUN_SIGNALS) as described above, and exit
# with the status that the training wrote to LSTM_DIST_EXIT_FILE: with that file set, the workers exit 0 after
# a run that ended in order (done 0, user error 2, non-finite stop 3, preempted 75), so torchrun ends without a
# traceback of its own, and only a crash reaches torchrun, which reports it as 1.
run_with_status() {
  echo "+ $*" >&2
  export LSTM_DIST_EXIT_FILE
  LSTM_DIST_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/lstm_dist_exit.XXXXXX")
  trap 'rm -f "$LSTM_DIST_EXIT_FILE"' EXIT
  trap 'ask_stop TERM' TERM
  trap 'ask_stop USR1' USR1
  trap 'ask_stop INT' INT
  (trap '' TERM USR1 INT; exec "$@") &
  child=$!
  set +e
  local tick=0
  while kill -0 "$child" 2>/dev/null; do
    if [[ -n "$killed" ]]; then
      exit 130
    elif [[ -n "$stop" ]]; then
      (( tick++ % 5 )) || signal_workers "$stop"   # every second; torchrun's exit is seen within 0.2 s
      sleep 0.2
    else
      wait "$child"   # returns early when a trapped signal arrives
    fi
  done
  [[ -z "$killed" ]] || exit 130
  wait "$child"
  status=$?
  set -e
  if [[ -s "$LSTM_DIST_EXIT_FILE" ]]; then
    status=$(<"$LSTM_DIST_EXIT_FILE")
  fi
  exit "$status"
}
