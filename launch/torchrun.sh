#!/usr/bin/env bash
# One machine, all of its GPUs (or NPROC processes on the CPU).
#   launch/torchrun.sh configs/wikitext103.yaml train.steps=1000
#   NPROC=2 launch/torchrun.sh configs/smoke.yaml
# NPROC defaults to the number of visible GPUs, or 2 on a machine without one. SIGTERM or SIGUSR1
# sent to this script checkpoint the run at the next step; the script then exits with the run's
# status: 0 done, 2 user error, 3 non-finite stop, 75 preempted (run the same command to resume).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config=$1; shift
# shellcheck source=launch/_common.sh
source "$(dirname "$0")/_common.sh"
require_config "$config"
default_nproc
cmd=(torchrun --standalone --nproc_per_node="$NPROC" -m lstm_dist.train --config "$config" "$@")
run_with_status "${cmd[@]}"
