#!/usr/bin/env bash
# Run a command "on" node K of the lab made by scripts/lab-up.sh: in the network
# namespace nodeK (its address 10.77.0.1K) and a UTS namespace of its own whose hostname
# is nodeK, so socket.gethostname() in it and in every child says nodeK. The command
# replaces this script (exec): its pid is the one to signal. The filesystem, users and
# pids are the host's (a shared filesystem, as on a cluster).
# nsenter, not `ip netns exec`: the latter remounts /sys (slurmd then finds no cgroup fs).
# Usage: lab-run.sh K CMD [ARG...]
# Exit status: CMD's; 77: cannot run here (not root, node K not made), with the reason.
set -euo pipefail

skip() { echo "lab-run: skipped: $*" >&2; exit 77; }
[ $# -ge 2 ] || { echo "usage: lab-run.sh K CMD [ARG...]" >&2; exit 2; }
k=$1; shift
case "$k" in [1-9]) ;; *) echo "lab-run: node number 1..9, not '$k'" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || skip "needs root (nsenter into a network namespace)"
[ -e "/run/netns/node$k" ] || skip "node$k does not exist: run scripts/lab-up.sh first"
exec nsenter --net="/run/netns/node$k" unshare --uts sh -c 'hostname "$0"; exec "$@"' "node$k" "$@"
