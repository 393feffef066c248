#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the tests and for trying slurm/train.sh by hand.
#
#   sudo tests/slurm_cluster.sh up       # bring it up; prints the line that points Slurm's clients at it
#   export SLURM_CONF=/tmp/lstm_dist_slurm/slurm.conf
#   NPROC_PER_NODE=1 sbatch --nodes=2 --gpus-per-node=0 slurm/train.sh configs/smoke.yaml train.steps=60
#   squeue; sinfo
#   sudo tests/slurm_cluster.sh down     # stop everything and remove every trace
#   tests/slurm_cluster.sh status        # exit 0 when a cluster made by this script is up
#
# Each node is a network namespace with its own address on a bridge, and its own host name (slurmd runs in
# a UTS namespace of its own, so `hostname -s` is node1 or node2). slurmctld runs in the root namespace on
# the bridge's address under the host name lsdctl. The node names are added to /etc/hosts, as on a real
# cluster where every node's name resolves, and removed again on `down`. munge and Slurm come from Debian's
# packages (slurmctld slurmd slurm-client munge); all of their state lives in LSTM_DIST_SLURM_STATE.
# `up` clears what a killed earlier run left behind, and refuses, naming it, a cluster that is still running.
# Exit status: 0 done, 1 failed, 3 this machine cannot host the cluster (not root, a package or namespaces missing).
set -euo pipefail

STATE=${LSTM_DIST_SLURM_STATE:-/tmp/lstm_dist_slurm}
SUBNET=${LSTM_DIST_SLURM_SUBNET:-10.213.7}   # a /24 of the test's own; `up` checks that no interface uses it
BRIDGE=lsdbr0
NODES=(node1 node2)
CTL_NAME=lsdctl
MARK="# lstm_dist test cluster"

say() { echo "slurm_cluster: $*" >&2; }
die() { say "$1"; exit "${2:-1}"; }

node_addr() { echo "$SUBNET.$((10 + $1))"; }   # node index 1.. -> address
netns_of() { echo "lsd-$1"; }

pid_alive() { [[ -s "$1" ]] && kill -0 "$(<"$1")" 2>/dev/null; }

stop_pidfile() {
  local file=$1 pid i
  [[ -s "$file" ]] || return 0
  pid=$(<"$file")
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

check_machine() {
  [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, /etc/hosts, the daemons): run it with sudo" 3
  local missing=() cmd
  for cmd in slurmctld slurmd munged sinfo scontrol ip nsenter unshare runuser ss; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  if (( ${#missing[@]} )); then
    die "missing ${missing[*]}: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge iproute2" 3
  fi
  if ! ip netns add lsd-probe 2>/dev/null; then
    die "cannot create a network namespace here (ip netns add failed)" 3
  fi
  ip netns del lsd-probe
}

write_conf() {
  local i
  cat >"$STATE/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh: two nodes in network namespaces, all state in $STATE.
ClusterName=lstmdist
SlurmctldHost=$CTL_NAME($SUBNET.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# Test every pending job each second (the default is every 60 s), so that a requeued job made eligible
# with StartTime=now starts at once.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=$(node_addr $((i + 1))) CPUs=2 RealMemory=1000 State=UNKNOWN" >>"$STATE/slurm.conf"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$STATE/slurm.conf"
}

start_munge() {
  mkdir -p "$STATE/munge"
  chown munge:munge "$STATE/munge"
  chmod 0755 "$STATE/munge"   # munged refuses a socket directory with any other mode
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$STATE/munge/munge.key"
  chmod 0400 "$STATE/munge/munge.key"
  runuser -u munge -- munged --socket="$STATE/munge/munge.socket.2" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
}

hosts_add() {
  local i
  {
    echo "$SUBNET.1 $CTL_NAME $MARK"
    for i in "${!NODES[@]}"; do echo "$(node_addr $((i + 1))) ${NODES[$i]} $MARK"; done
    # torch's TCPStore listens on IPv6 and looks its IPv4 clients up by their mapped address; without
    # a DNS server here, those names come from this file too (else every connection logs a warning).
    echo "::ffff:$SUBNET.1 $CTL_NAME $MARK"
    for i in "${!NODES[@]}"; do echo "::ffff:$(node_addr $((i + 1))) ${NODES[$i]} $MARK"; done
  } >>/etc/hosts
}

hosts_remove() {
  # Rewritten in place (not renamed over): /etc/hosts is often a bind mount.
  if grep -qF "$MARK" /etc/hosts 2>/dev/null; then
    local kept
    kept=$(grep -vF "$MARK" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
  fi
}

network_up() {
  local i ns
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in "${!NODES[@]}"; do
    ns=$(netns_of "${NODES[$i]}")
    ip netns add "$ns"
    ip link add "lsd-v$((i + 1))" type veth peer name lsd-eth0
    ip link set lsd-eth0 netns "$ns"
    ip link set "lsd-v$((i + 1))" master "$BRIDGE"
    ip link set "lsd-v$((i + 1))" up
    ip -n "$ns" addr add "$(node_addr $((i + 1)))/24" dev lsd-eth0
    ip -n "$ns" link set lsd-eth0 up
    ip -n "$ns" link set lo up
  done
}

wait_idle() {
  local i state
  for i in $(seq 150); do
    state=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | awk '{print $2}' | sort -u | tr '\n' ' ')
    [[ "$state" == "idle " ]] && return 0
    if [[ "$state" == *down* || "$state" == *drain* ]] && (( i % 10 == 0 )); then
      scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME 2>/dev/null || true
    fi
    sleep 0.2
  done
  sinfo -N >&2 || true
  die "the nodes did not become idle in 30 s; logs in $STATE/*.log"
}

up() {
  check_machine
  if pid_alive "$STATE/slurmctld.pid"; then
    die "a cluster made by this script is already running (slurmctld pid $(<"$STATE/slurmctld.pid"), state in $STATE): use it (export SLURM_CONF=$STATE/slurm.conf) or stop it with tests/slurm_cluster.sh down"
  fi
  down 2>/dev/null   # whatever a killed earlier run left behind
  local holder
  holder=$(ss -Hltnp 'sport = :6817' 2>/dev/null | head -1 || true)
  if [[ -n "$holder" ]]; then
    die "port 6817 is already taken on this machine ($holder): another Slurm controller is running; stop it before bringing up the test cluster"
  fi
  if ip -4 -o addr | awk '{print $4}' | grep -q "^${SUBNET//./\\.}\."; then
    die "an interface already uses $SUBNET.0/24; choose another with LSTM_DIST_SLURM_SUBNET=a.b.c"
  fi
  mkdir -p "$STATE/ctld" "$STATE/spool"
  chmod 0755 "$STATE"
  if ! runuser -u munge -- test -x "$STATE"; then
    rm -rf "$STATE"
    die "the munge user cannot enter $STATE: set LSTM_DIST_SLURM_STATE to a directory under one every user may enter, such as /tmp"
  fi
  write_conf
  start_munge
  network_up
  hosts_add
  export SLURM_CONF="$STATE/slurm.conf"
  # slurmctld must believe it is the host named in SlurmctldHost: give it that name in a UTS namespace.
  unshare --uts sh -c "hostname $CTL_NAME && exec slurmctld -f '$SLURM_CONF'"
  local i
  for i in "${!NODES[@]}"; do
    # nsenter, not `ip netns exec`: the latter remounts /sys, and slurmd then finds no cgroup file system.
    nsenter --net="/run/netns/$(netns_of "${NODES[$i]}")" unshare --uts \
      sh -c "hostname ${NODES[$i]} && exec slurmd -f '$SLURM_CONF'"
  done
  wait_idle
  say "up: ${NODES[*]} at $(node_addr 1)..$(node_addr ${#NODES[@]}), controller $CTL_NAME at $SUBNET.1"
  echo "export SLURM_CONF=$STATE/slurm.conf"
}

down() {
  local i ns
  local -a pids
  if [[ -f "$STATE/slurm.conf" ]] && pid_alive "$STATE/slurmctld.pid"; then
    SLURM_CONF="$STATE/slurm.conf" scancel --full --signal=KILL --state=RUNNING --user=root 2>/dev/null || true
  fi
  for i in "${!NODES[@]}"; do
    stop_pidfile "$STATE/slurmd.${NODES[$i]}.pid"
  done
  stop_pidfile "$STATE/slurmctld.pid"
  # Whatever still runs inside a node (a job step, its torchrun and workers) goes with the node.
  for i in "${!NODES[@]}"; do
    ns=$(netns_of "${NODES[$i]}")
    if ip netns list | grep -qw "$ns"; then
      mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
      (( ${#pids[@]} == 0 )) || kill -KILL "${pids[@]}" 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "lsd-v$((i + 1))" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if [[ -s "$STATE/munge/munged.pid" ]]; then
    stop_pidfile "$STATE/munge/munged.pid"
  fi
  hosts_remove
  if [[ "${KEEP_STATE:-0}" != 1 ]]; then
    rm -rf "$STATE"
  fi
}

status() {
  pid_alive "$STATE/slurmctld.pid" || { say "no cluster of this script is running"; exit 1; }
  SLURM_CONF="$STATE/slurm.conf" sinfo -N
}

case "${1:-}" in
  up) up ;;
  down) down; say "down" ;;
  status) status ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
