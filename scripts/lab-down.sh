#!/usr/bin/env bash
# Remove the cluster lab that scripts/lab-up.sh made: end every process in the node
# namespaces (SIGTERM, then SIGKILL after 5 s), delete the namespaces node1..node9,
# their veth pairs vnK and the bridge brpf. Idempotent: does nothing for what is gone.
# The lab's SLURM (lab-up.sh N --slurm) goes first: its jobs cancelled (their processes
# end with them), its slurmd's and its slurmctld stopped by their pid files in
# /run/pilotfish-lab/slurm, munged too if the lab started it and the single-node SLURM
# (scripts/slurm-up.sh) does not run.
# Usage: lab-down.sh [--slurm-only]   (--slurm-only: stop the lab's slurmctld and slurmd's,
#                                     keep the nodes and munged)
# Exit status 0: the lab is gone; 77: cannot run here (not root), with the reason.
set -uo pipefail

slurm_only=0
for a in "$@"; do
  case "$a" in
    --slurm-only) slurm_only=1 ;;
    *) echo "usage: lab-down.sh [--slurm-only]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "lab-down: skipped: needs root" >&2; exit 77; }

SD=/run/pilotfish-lab/slurm
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # pid file, name: SIGTERM, SIGKILL after 10 s
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "lab-down: $2 (pid $pid) ignored SIGTERM for 10 s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$1"
  echo "lab-down: stopped $2"
}
if [ -d "$SD" ]; then
  export SLURM_CONF=$SD/slurm.conf
  if alive "$SD/slurmctld.pid" && command -v squeue >/dev/null; then
    for _ in $(seq 100); do  # up to 10 s: a job whose node is down stays until its slurmd is gone
      jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
      [ -z "${jobs// /}" ] && break
      scancel --quiet $jobs 2>/dev/null
      sleep 0.1
    done
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [ -z "${jobs// /}" ] || echo "lab-down: jobs still in the lab's queue: $jobs" >&2
  fi
  # all at once (each takes 2-5 s to shut down)
  for f in "$SD"/slurmd-node*.pid; do
    [ -e "$f" ] && stop "$f" "slurmd of $(basename "$f" .pid | sed 's/^slurmd-//')" &
  done
  stop "$SD/slurmctld.pid" "the lab's slurmctld" &
  wait
  if [ -e "$SD/munged-started-by-lab" ] && [ "$slurm_only" = 0 ]; then
    if alive /run/slurmctld.pid || alive /run/slurmd.pid; then
      echo "lab-down: munged left running (the single-node SLURM uses it)"
    else
      stop /run/munge/munged.pid munged
    fi
    rm -f "$SD/munged-started-by-lab"
  fi
fi
[ "$slurm_only" = 1 ] && exit 0

nodes=()
for f in /run/netns/node[1-9]; do [ -e "$f" ] && nodes+=("$(basename "$f")"); done

pids() { for ns in "${nodes[@]}"; do ip netns pids "$ns" 2>/dev/null; done; }
if [ "${#nodes[@]}" -gt 0 ]; then
  left=$(pids)
  if [ -n "$left" ]; then
    echo "lab-down: ending $(echo $left | wc -w) process(es) in ${nodes[*]}"
    kill -TERM $left 2>/dev/null
    for _ in $(seq 50); do [ -z "$(pids)" ] && break; sleep 0.1; done
    left=$(pids)
    if [ -n "$left" ]; then
      echo "lab-down: still running after SIGTERM for 5 s: SIGKILL $left" >&2
      kill -KILL $left 2>/dev/null
      for _ in $(seq 50); do [ -z "$(pids)" ] && break; sleep 0.1; done
    fi
  fi
fi
for ns in "${nodes[@]}"; do ip netns del "$ns" && echo "lab-down: deleted $ns"; done
for k in 1 2 3 4 5 6 7 8 9; do
  ip link show "vn$k" >/dev/null 2>&1 && ip link del "vn$k" && echo "lab-down: deleted vn$k"
done
if ip link show brpf >/dev/null 2>&1; then
  ip link del brpf && echo "lab-down: deleted bridge brpf"
fi
left=$(pids)
[ -z "$left" ] || { echo "lab-down: processes survived: $left" >&2; exit 1; }
echo "lab-down: the lab is gone"
