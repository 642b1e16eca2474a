#!/usr/bin/env bash
# Remove the cluster lab that scripts/lab-up.sh made: end every process in the node
# namespaces (SIGTERM, then SIGKILL after 5 s), delete the namespaces node1..node9,
# their veth pairs vnK and the bridge brpf. Idempotent: does nothing for what is gone.
# Exit status 0: the lab is gone; 77: cannot run here (not root), with the reason.
set -uo pipefail

[ "$(id -u)" = 0 ] || { echo "lab-down: skipped: needs root" >&2; exit 77; }

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
