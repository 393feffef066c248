#!/usr/bin/env bash
# One machine, all of its GPUs (or NPROC processes on the CPU).
#   launch/torchrun.sh configs/wikitext103.yaml train.steps=1000
#   NPROC=2 launch/torchrun.sh configs/smoke.yaml
# NPROC defaults to the number of visible GPUs, or 2 on a machine without one. SIGTERM, SIGUSR1 or
# SIGINT (Ctrl-C) sent to this script: every training process checkpoints at its next step and exits
# with 75 (torchrun is kept out of it: no deadline, no traceback); a second Ctrl-C stops at once,
# without a checkpoint (exit 130). Exit status: 0 done, 2 user error, 3 non-finite stop, 75 preempted
# or stopped (run the same command to resume).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config=$1; shift
# shellcheck source=launch/_common.sh
source "$(dirname "$0")/_common.sh"
require_config "$config"
default_nproc
cmd=(torchrun --standalone --nproc_per_node="$NPROC" "$TORCHRUN_SIGNALS" -m lstm_dist.train --config "$config" "$@")
run_with_status "${cmd[@]}"
