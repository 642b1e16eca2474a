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
# Usage: lab-up.sh N        (1 <= N <= 9)
# Exit status 0: the lab is up; 77: cannot run here (not root, no ip/nsenter), with the
# reason; 2: usage.
set -euo pipefail

skip() { echo "lab-up: skipped: $*" >&2; exit 77; }
usage() { echo "usage: lab-up.sh N [--slurm]   (N nodes, 1..9)" >&2; exit 2; }

n="${1:-}"
case "$n" in [1-9]) ;; *) usage ;; esac
shift
for arg in "$@"; do
  case "$arg" in
    --slurm) skip "--slurm is not implemented yet (see ../shared/notes/cluster-lab.md)" ;;
    *) usage ;;
  esac
done

[ "$(id -u)" = 0 ] || skip "needs root (network namespaces, veth pairs and a bridge need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
for tool in ip nsenter unshare; do
  command -v "$tool" >/dev/null || skip "$tool is not installed"
done
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
