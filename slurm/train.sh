#!/bin/bash
# lstm_dist on a Slurm cluster: one torchrun per node of the allocation, preemption-safe, requeues itself.
#
#   sbatch slurm/train.sh configs/wikitext103.yaml                              # 2 nodes × 8 GPUs (defaults below)
#   sbatch --nodes=1 slurm/train.sh configs/wikitext103.yaml                    # 1 node × 8 GPUs
#   sbatch --nodes=4 slurm/train.sh configs/wikitext103.yaml train.batch_size=64 # 4 nodes × 8 GPUs, any overrides
#   NPROC_PER_NODE=2 sbatch --nodes=1 --gpus-per-node=0 slurm/train.sh configs/smoke.yaml   # CPU-only nodes (gloo)
#
# Arguments as lstm_dist.train and launch/torchrun.sh take them: CONFIG (or --config CONFIG), then
# section.key=value overrides (every key: docs/configuration.md). NPROC_PER_NODE is
# torchrun's --nproc_per_node, the name launch/ uses too.
#
# Submit from the checkout: the config path, run.dir and the log are relative to the directory you submit
# from. Every #SBATCH line below is a default; the same option on the sbatch command line overrides it.
#
# What a user may need to set for their cluster:
# - GPUs: `--gpus-per-node=8` needs select/cons_tres; where a cluster asks for GPUs with GRES instead,
#   change that header line to `#SBATCH --gres=gpu:8`. Processes per node follow the GPUs allocated
#   (SLURM_GPUS_ON_NODE); NPROC_PER_NODE overrides that, and is required on nodes without GPUs, where
#   `sbatch --gpus-per-node=0` drops the header's request.
# - Network: NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME) name the interface between nodes where the host
#   name resolves to another one (export it before sbatch: the job inherits your environment). The
#   rendezvous runs on the allocation's first node, at its host name when that resolves, else at the
#   NodeAddr that Slurm knows; MASTER_PORT overrides its port (default 29500 + job id % 10000, so that jobs
#   sharing a node use different ports). Where the port is taken on that node, the job ends at once with one
#   line, `error: port P (MASTER_PORT) is in use on this node ...`, status 2, and is not requeued.
# - File system: the run directory (run.dir/run.name) must be on a file system that every node shares:
#   rank 0 writes the checkpoints there and every rank reads the one it names when the job resumes.
# - MAX_REQUEUES (default 20) caps how often the job requeues itself.
#
# Preemption and time limit: `--signal=B:USR1@300` makes Slurm send SIGUSR1 to this batch shell 5 minutes
# (Slurm may add up to a minute) before the time limit; `scancel --batch --signal=USR1 JOBID` does the same
# by hand. This shell relays it with `scancel --signal=USR1` to every process of the training step on every
# node. SIGUSR1 because it is the signal neither torchrun nor NCCL acts on: torchrun turns SIGTERM, SIGINT,
# SIGHUP and SIGQUIT into a shutdown of its workers that kills them after 30 s, whatever they are doing.
# Each node's torchrun ignores SIGUSR1 (and SIGTERM) and so stays up; the training processes set a flag,
# agree at the next log step (within log.every steps), write one checkpoint, and exit with status 75 (launch/torchrun.sh and
# launch/multinode.sh do the same without Slurm, sending the signal to torchrun's children themselves).
# This script then requeues the job (`scontrol requeue`), which starts again from that checkpoint in the
# same run directory, the same W&B run and the same log file (`--open-mode=append`). A requeued job waits
# in the queue about two minutes before it may start (Slurm's requeue delay); an operator makes it eligible
# at once with `scontrol update JobId=JOBID StartTime=now` (a second or more after the requeue: slurmd
# refuses a job launched within the same second, "Job credential revoked").
# SIGTERM (scancel, preemption by another job, the time limit itself) also checkpoints every rank at the
# next step, but this script does not requeue then: scancel means stop, and a preempting Slurm requeues a
# job itself where the partition's PreemptMode is REQUEUE.
# Training's exit status decides: 0 done, 2 a user error (one line in the log), 3 stopped after
# non-finite steps: none of them is requeued, since running again cannot fix them.
#
#SBATCH --job-name=lstm_dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

say() { echo "[slurm/train.sh] $*"; }
fail() { echo "error: $*" >&2; exit 2; }

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then   # the comment block above, up to the #SBATCH lines
  awk 'NR == 1 { next } /^#SBATCH/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
  exit 0
fi
# The config as lstm_dist.train takes it too: --config FILE or --config=FILE, first.
if [[ "${1:-}" == --config && $# -ge 2 ]]; then
  shift
elif [[ "${1:-}" == --config=* ]]; then
  set -- "${1#--config=}" "${@:2}"
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  fail "not inside a Slurm job; submit it: sbatch slurm/train.sh CONFIG [section.key=value ...]"
fi
if [[ $# -lt 1 ]]; then
  fail "no config file; submit: sbatch slurm/train.sh configs/wikitext103.yaml [section.key=value ...]"
fi
cd "${SLURM_SUBMIT_DIR:-.}"
config=$1
if [[ ! -f "$config" ]]; then
  fail "config file $config not found in $PWD; pass one of configs/*.yaml, relative to the directory you submit from"
fi
max_requeues=${MAX_REQUEUES:-20}
[[ "$max_requeues" =~ ^[0-9]+$ ]] || fail "MAX_REQUEUES=$max_requeues is not a number; set a count such as 20"

if [[ -n "${NPROC_PER_NODE:-}" ]]; then
  nproc=$NPROC_PER_NODE
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || fail "NPROC_PER_NODE=$nproc is not a positive number; set the processes per node, e.g. NPROC_PER_NODE=8"
elif [[ "${SLURM_GPUS_ON_NODE:-0}" =~ ^[1-9][0-9]*$ ]]; then
  nproc=$SLURM_GPUS_ON_NODE
else
  fail "no GPUs were allocated to this job; ask for them (--gpus-per-node=8 or --gres=gpu:8), or set NPROC_PER_NODE for CPU-only nodes"
fi

# A node's address for the others: its host name where that resolves, else the NodeAddr Slurm knows.
node_addr() {
  if getent hosts "$1" >/dev/null; then
    echo "$1"
  else
    scontrol show node "$1" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2
  fi
}
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
nnodes=${#nodes[@]}
head_addr=$(node_addr "${SLURMD_NODENAME:-${nodes[0]}}")   # this shell runs on the allocation's first node
port=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
if [[ ! "$port" =~ ^[1-9][0-9]{0,4}$ ]] || (( port > 65535 )); then
  fail "MASTER_PORT=$port is not a TCP port number; export a free port from 1024 to 65535 before sbatch, or unset it for the default (29500 + job id % 10000)"
fi
restarts=${SLURM_RESTART_COUNT:-0}
say "job $SLURM_JOB_ID, start $((restarts + 1)) (requeued $restarts time(s)): $nnodes node(s) (${nodes[*]}) × $nproc process(es); rendezvous at $head_addr:$port"

# Each node's local rank 0 writes the run's exit status here (its own node's /tmp); this shell reads the
# one of the first node, where it runs. torchrun would report any status but 0 as 1.
LSTM_DIST_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/lstm_dist_exit.XXXXXX")
export LSTM_DIST_EXIT_FILE
trap 'rm -f "$LSTM_DIST_EXIT_FILE"' EXIT

# One task per node. The task ignores SIGUSR1 and SIGTERM and hands that on to torchrun (which handles
# neither when told to handle only SIGINT, SIGHUP and SIGQUIT): the training processes install their own
# handlers for both, and torchrun stays up until they have checkpointed and exited.
# shellcheck disable=SC2016  # expanded by the task's shell on each node, not here
node_task='
trap "" USR1 TERM
self=$(getent hosts "$SLURMD_NODENAME" >/dev/null && echo "$SLURMD_NODENAME" ||
       scontrol show node "$SLURMD_NODENAME" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)
exec torchrun --nnodes="$LSTM_DIST_NNODES" --nproc-per-node="$LSTM_DIST_NPROC" --max-restarts=0 \
  --rdzv-backend=c10d --rdzv-endpoint="$LSTM_DIST_RDZV" --rdzv-id="$LSTM_DIST_RDZV_ID" \
  --rdzv-conf=is_host=0 --local-addr="$self" --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
  -m lstm_dist.train --config "$@"
'
export LSTM_DIST_NNODES=$nnodes LSTM_DIST_NPROC=$nproc LSTM_DIST_RDZV="$head_addr:$port" \
       LSTM_DIST_RDZV_ID="$SLURM_JOB_ID-$restarts"

asked=""
relay_usr1() {
  asked=${asked:-warning}
  say "SIGUSR1 (time limit near or preemption warning): every training process checkpoints at its next step"
  scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
note_term() {
  asked=terminate
  say "SIGTERM from Slurm: every training process checkpoints at its next step; this job is not requeued by this script"
}
trap relay_usr1 USR1
trap note_term TERM

# The rendezvous store lives in its own process here, for the whole step: hosted inside the first node's
# torchrun, it would vanish when that torchrun exits and leave the others' shutdown in a traceback.
# Nothing starts before it listens: where the port is taken on this node (another job sharing the node, or
# another program), the store says so in one line and the job ends with 2, not requeued, its torchruns
# never started (they would have joined whatever holds the port). The store binding the port is the check
# itself, so no other job can take the port between a check and its use.
store_out=$(mktemp "${TMPDIR:-/tmp}/lstm_dist_store.XXXXXX")
trap 'rm -f "$LSTM_DIST_EXIT_FILE" "$store_out"' EXIT
python -m lstm_dist.rendezvous "$head_addr" "$port" >"$store_out" &
store=$!
until grep -q "listening" "$store_out"; do
  if ! kill -0 "$store" 2>/dev/null; then
    set +e; wait "$store"; code=$?; set -e
    exit $(( code ? code : 1 ))   # its one line (error: port ... (MASTER_PORT) is in use ...) is in the log
  fi
  sleep 0.1
done
cat "$store_out"

echo "+ srun torchrun --nnodes=$nnodes --nproc-per-node=$nproc --rdzv-backend=c10d --rdzv-endpoint=$head_addr:$port -m lstm_dist.train --config $*"
srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$node_task" lstm_dist_node "$@" &
step=$!
set +e
while true; do
  wait "$step"
  code=$?
  kill -0 "$step" 2>/dev/null || break   # wait returns early when a trapped signal arrives
done
kill -INT "$store" 2>/dev/null
wait "$store" 2>/dev/null
set -e
status=$code
if [[ -s "$LSTM_DIST_EXIT_FILE" ]]; then
  status=$(<"$LSTM_DIST_EXIT_FILE")
fi

case "$status" in
  0) say "training finished"; exit 0 ;;
  2|3) exit "$status" ;;   # the training's own one line says what to change; requeueing cannot fix it
  75) ;;
  *) say "training failed (status $status) without a checkpointed stop; not requeued: see the messages above, then resubmit the same command to resume from the last checkpoint"
     exit "$status" ;;
esac
if [[ "$asked" == terminate ]]; then
  say "stopped by SIGTERM after writing a checkpoint; not requeued by this script (Slurm requeues preempted jobs itself where PreemptMode=REQUEUE); resubmit the same command to continue"
  exit 75
fi
if (( restarts >= max_requeues )); then
  say "stopped after writing a checkpoint; not requeued: this job was already requeued $restarts time(s) (MAX_REQUEUES=$max_requeues); resubmit the same command to continue"
  exit 75
fi
say "checkpoint written; requeueing job $SLURM_JOB_ID ($((restarts + 1)) of at most $max_requeues): it resumes from that checkpoint when it starts again, after Slurm's requeue delay of about 2 minutes (scontrol update JobId=$SLURM_JOB_ID StartTime=now starts it sooner)"
trap '' TERM USR1   # requeueing a running job signals this shell; nothing is left to do
scontrol requeue "$SLURM_JOB_ID"
