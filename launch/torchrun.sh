#!/usr/bin/env bash
# Usage: launch/torchrun.sh [--config] CONFIG [section.key=value ...]
# One machine, all of its GPUs (or NPROC_PER_NODE processes on the CPU): torchrun --standalone running
# lstm_dist.train with the config and the overrides (every key: docs/configuration.md).
#   launch/torchrun.sh configs/wikitext103.yaml train.steps=1000
#   NPROC_PER_NODE=2 launch/torchrun.sh configs/smoke.yaml
# NPROC_PER_NODE (torchrun's --nproc_per_node) defaults to the number of visible GPUs, or 2 on a machine
# without one; NPROC, its old name, still works. SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) sent to this script:
# every training process checkpoints at its next step and exits with 75 (torchrun is kept out of it: no
# deadline, no traceback); a second Ctrl-C stops at once, without a checkpoint (exit 130). Exit status:
# 0 done, 2 user error, 3 non-finite stop, 75 preempted or stopped (run the same command to resume).
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "$0")/_common.sh"
parse_args "$@"
require_config "$config"
default_nproc
cmd=(torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" "$TORCHRUN_SIGNALS" -m lstm_dist.train
     --config "$config" "${overrides[@]}")
run_with_status "${cmd[@]}"
