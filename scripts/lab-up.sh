#!/usr/bin/env bash
# A cluster lab on one machine for pilotfish's multi-node tests (issue 24): N "nodes",
# each a network namespace nodeK with its own address 10.77.0.1K/24 on a veth pair whose
# host end vnK is on the bridge brpf (10.77.0.1/24, fixed MAC 02:77:00:00:00:01: without
# it the bridge takes a port's MAC and a remade node cannot reach the host for a minute).
# A node's hostname exists per process (a UTS namespace): start processes "on" node K
# with scripts/lab-run.sh K CMD... Facts behind each step: ../shared/notes/cluster-lab.md.
# Idempotent: what exists and is right is kept, a half-made node is remade, nodes above
# N are left alone (scripts/lab-down.sh removes everything). Traffic stays on the
# bridge's own subnet: no route, NAT or forwarding to anywhere else is set up.
# --slurm: then a SLURM of N nodes on it: munged (shared with scripts/slurm-up.sh's
# single-node SLURM), slurmctld on the host at 10.77.0.1 port 6917, one slurmd per node
# in the node's namespaces (hostname nodeK, port 6918), all conf, state, pid and log
# files in /run/pilotfish-lab/slurm (nothing of /etc/slurm or /run/slurm*.pid is
# touched); ready when sinfo shows the N nodes idle (or running jobs, when it was up).
# Batch jobs are not requeued when their node fails (JobRequeue=0). Client commands
# need SLURM_CONF=/run/pilotfish-lab/slurm/slurm.conf (partition "lab").
# Usage: lab-up.sh N [--slurm]   (1 <= N <= 9)
# Exit status 0: the lab is up; 77: cannot run here (not root, no ip/nsenter, no SLURM),
# with the reason; 2: usage.
set -euo pipefail

skip() { echo "lab-up: skipped: $*" >&2; exit 77; }
usage() { echo "usage: lab-up.sh N [--slurm]   (N nodes, 1..9)" >&2; exit 2; }

n="${1:-}"
case "$n" in [1-9]) ;; *) usage ;; esac
shift
want_slurm=0
for arg in "$@"; do
  case "$arg" in
    --slurm) want_slurm=1 ;;
    *) usage ;;
  esac
done

[ "$(id -u)" = 0 ] || skip "needs root (network namespaces, veth pairs and a bridge need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
for tool in ip nsenter unshare; do
  command -v "$tool" >/dev/null || skip "$tool is not installed"
done
if [ "$want_slurm" = 1 ]; then  # checked before anything is made
  for tool in slurmctld slurmd sinfo scontrol munged munge unmunge; do
    command -v "$tool" >/dev/null \
      || skip "--slurm: $tool is not installed (scripts/slurm-up.sh installs SLURM and munge)"
  done
fi
ip netns list >/dev/null 2>&1 || skip "ip netns does not work here (no network namespaces?)"

BR=brpf
BRMAC=02:77:00:00:00:01
HOSTIP=10.77.0.1
made=()

# the bridge: fixed MAC, the host's address, up
if ! ip link show "$BR" >/dev/null 2>&1; then
  ip link add "$BR" address "$BRMAC" type bridge
  made+=("bridge $BR")
fi
if [ "$(cat "/sys/class/net/$BR/address")" != "$BRMAC" ]; then
  ip link set "$BR" address "$BRMAC"
  made+=("bridge MAC $BRMAC")
fi
if ! ip -4 addr show dev "$BR" | grep -q "inet $HOSTIP/24"; then
  ip addr add "$HOSTIP/24" dev "$BR"
  made+=("address $HOSTIP/24 on $BR")
fi
ip link set "$BR" up
# what could block traffic on the bridge: only the bridge's own settings are touched
# (reverse-path filtering off on it; no global forwarding: host<->node is local
# delivery and node<->node is bridged, neither is routed)
sysctl -qw "net.ipv4.conf.$BR.rp_filter=0" 2>/dev/null || true

node_ok() {  # K: the namespace, its veth pair and addresses are all there and up
  local k=$1 ns=node$1 vn=vn$1
  [ -e "/run/netns/$ns" ] || return 1
  ip link show "$vn" 2>/dev/null | grep -q "master $BR" || return 1
  ip link show "$vn" 2>/dev/null | grep -q "state UP\|,UP" || return 1
  ip -n "$ns" -4 addr show dev eth0 2>/dev/null | grep -q "inet 10.77.0.1$k/24" || return 1
  ip -n "$ns" link show lo 2>/dev/null | grep -q ",UP" || return 1
  ip -n "$ns" link show eth0 2>/dev/null | grep -q ",UP" || return 1
}

for k in $(seq 1 "$n"); do
  ns=node$k vn=vn$k
  if node_ok "$k"; then
    continue
  fi
  # half-made (or absent): remake it from scratch
  if [ -e "/run/netns/$ns" ]; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  fi
  ip link del "$vn" 2>/dev/null || true
  ip netns add "$ns"
  ip link add "$vn" type veth peer name eth0 netns "$ns"
  ip link set "$vn" master "$BR"
  ip link set "$vn" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "10.77.0.1$k/24" dev eth0
  ip -n "$ns" link set eth0 up
  made+=("$ns (10.77.0.1$k, host end $vn)")
done

# ready when every node answers the host and node 1 (no ping here: a TCP connect to a
# port nobody listens on is answered "refused" by a reachable node, at once)
answers() {  # [node K to run from, or ""] IP
  local out
  if [ -n "$1" ]; then
    out=$(nsenter --net="/run/netns/node$1" timeout 1 bash -c "echo >/dev/tcp/$2/9" 2>&1) && return 0
  else
    out=$(timeout 1 bash -c "echo >/dev/tcp/$2/9" 2>&1) && return 0
  fi
  case "$out" in *refused*) return 0 ;; *) return 1 ;; esac
}
wait_answer() {  # from IP what
  for _ in $(seq 50); do answers "$1" "$2" && return 0; sleep 0.1; done
  echo "lab-up: $3" >&2; exit 1
}
for k in $(seq 1 "$n"); do
  wait_answer "" "10.77.0.1$k" "node$k (10.77.0.1$k) does not answer the host"
  wait_answer "$k" "$HOSTIP" "the host ($HOSTIP) does not answer node$k"
  [ "$k" = 1 ] || wait_answer "$k" 10.77.0.11 "node1 (10.77.0.11) does not answer node$k"
done

if [ "${#made[@]}" = 0 ]; then
  echo "lab-up: the lab was up already: $BR $HOSTIP, nodes 1..$n"
else
  printf 'lab-up: made %s\n' "${made[@]}"
  echo "lab-up: the lab is up: $BR $HOSTIP, nodes 1..$n at 10.77.0.11..10.77.0.1$n"
fi
[ "$want_slurm" = 1 ] || exit 0

# --------------------------------------------------------------------------- SLURM
SD=/run/pilotfish-lab/slurm
CONF=$SD/slurm.conf
export SLURM_CONF=$CONF
made=()
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
ctld_host=$(hostname -s)

# munge, as scripts/slurm-up.sh starts it (a marker says the lab started it: lab-down.sh
# stops it then, unless the single-node SLURM runs)
[ -f /etc/munge/munge.key ] || { mungekey -c -f -k /etc/munge/munge.key \
    && chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key; }
install -d -m 0755 "$SD"
install -d -o munge -g munge -m 0755 /run/munge
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
  touch "$SD/munged-started-by-lab"
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { echo "lab-up: munged does not answer" >&2; exit 1; }

want=$(cat <<CONF
# written by pilotfish scripts/lab-up.sh --slurm (the cluster lab's SLURM)
ClusterName=pflab
SlurmctldHost=${ctld_host}(${HOSTIP})
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$SD/state
SlurmctldPidFile=$SD/slurmctld.pid
SlurmctldLogFile=$SD/slurmctld.log
SlurmdSpoolDir=$SD/spool-%n
SlurmdPidFile=$SD/slurmd-%n.pid
SlurmdLogFile=$SD/slurmd-%n.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=10
JobRequeue=0
MailProg=/bin/true
KillWait=5
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
NodeName=node[1-$n] NodeAddr=10.77.0.[11-1$n] CPUs=1 RealMemory=2000 State=UNKNOWN
PartitionName=lab Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
if [ -f "$CONF" ] && [ "$(cat "$CONF")" != "$want" ]; then
  echo "lab-up: $CONF changed: restarting the lab's SLURM"
  "$(dirname "$0")/lab-down.sh" --slurm-only
  rm -f "$CONF"
fi
[ -f "$CONF" ] || { printf '%s\n' "$want" >"$CONF"; made+=("$CONF"); }
install -d -m 0755 "$SD/state"

if ! alive "$SD/slurmctld.pid"; then
  slurmctld -f "$CONF" -c -i </dev/null >/dev/null 2>&1  # daemons keep no pipe of the caller
  made+=("slurmctld on $HOSTIP:6917")
fi
for k in $(seq 1 "$n"); do
  if ! alive "$SD/slurmd-node$k.pid"; then
    install -d -m 0755 "$SD/spool-node$k"
    "$(dirname "$0")/lab-run.sh" "$k" slurmd -f "$CONF" </dev/null >/dev/null 2>&1
    made+=("slurmd on node$k")
  fi
done

state_of() { sinfo -h -N -n "node$1" -o %T 2>/dev/null | head -n1 || true; }
ok=0
for _ in $(seq 300); do  # up to 30 s
  ok=1
  for k in $(seq 1 "$n"); do
    st=$(state_of "$k")
    case "$st" in
      idle|mixed|allocated|completing) ;;  # up (jobs of a lab already in use)
      down*|drain*|*fail*) ok=0; scontrol update NodeName="node$k" State=RESUME 2>/dev/null || true ;;
      *) ok=0 ;;
    esac
  done
  [ "$ok" = 1 ] && break
  sleep 0.1
done
if [ "$ok" != 1 ]; then
  sinfo -N >&2 || true
  echo "lab-up: the lab's SLURM nodes did not all become idle; see $SD/slurmctld.log" \
       "and $SD/slurmd-nodeK.log" >&2
  exit 1
fi
if [ "${#made[@]}" = 0 ]; then
  echo "lab-up: the lab's SLURM was up already: nodes node[1-$n] idle (SLURM_CONF=$CONF)"
else
  echo "lab-up: the lab's SLURM is up: nodes node[1-$n] idle, slurmctld $HOSTIP:6917" \
       "(SLURM_CONF=$CONF)"
fi
