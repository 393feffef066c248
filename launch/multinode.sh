#!/usr/bin/env bash
# Usage: launch/multinode.sh [--config] CONFIG [section.key=value ...]
# Several machines started by hand: run the same line on every node, each with its NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 launch/multinode.sh configs/wikitext103.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example MASTER_PORT=29500 launch/multinode.sh configs/wikitext103.yaml
# NPROC_PER_NODE (processes per node; NPROC, its old name, still works) defaults to the node's GPU count.
# Node 0 listens on MASTER_ADDR:MASTER_PORT (default 29500) and every node waits there until all NNODES
# have joined; global ranks follow NODE_RANK. Two jobs on one node need two ports: where MASTER_PORT is in
# use on node 0, it says so in one line (`error: port 29500 (MASTER_PORT) is in use ...`) and exits 2, and
# the job that holds the port goes on. Exit status and signals as in launch/torchrun.sh (a stop sent to
# one node reaches every rank).
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "$0")/_common.sh"
parse_args "$@"
for var in NNODES NODE_RANK MASTER_ADDR; do
  if [[ -z "${!var:-}" ]]; then
    echo "error: $var is not set; set NNODES, NODE_RANK and MASTER_ADDR (see launch/multinode.sh --help)" >&2
    exit 2
  fi
done
require_config "$config"
default_nproc
port=${MASTER_PORT:-29500}
require_port "$port"
# torchrun itself, through lstm_dist.rendezvous: where node 0 cannot listen on the port, that is one line
# and status 2 rather than torchrun's traceback (said by the process that binds, so no other job can take
# the port between a check and the bind).
cmd=(python3 -m lstm_dist.rendezvous torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK"
     --master_addr="$MASTER_ADDR" --master_port="$port" "$TORCHRUN_SIGNALS"
     -m lstm_dist.train --config "$config" "${overrides[@]}")
run_with_status "${cmd[@]}"
