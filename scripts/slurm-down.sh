#!/usr/bin/env bash
# Stop the single-node SLURM that scripts/slurm-up.sh started: cancel every job and wait
# for an empty queue (job processes outlive slurmd), then stop slurmd, slurmctld and
# munged by their pid files. Idempotent: does nothing for daemons that are not running.
# munged is left running while the cluster lab's SLURM (scripts/lab-up.sh N --slurm)
# uses it; scripts/lab-down.sh stops it then.
set -uo pipefail

[ "$(id -u)" = 0 ] || { echo "slurm-down: skipped: needs root" >&2; exit 77; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive /run/slurmctld.pid && command -v squeue >/dev/null; then
  scancel --full --quiet --user=root 2>/dev/null
  scancel --quiet "$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')" 2>/dev/null
  for _ in $(seq 150); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
    scancel --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null
    sleep 0.1
  done
  left=$(squeue -h -o %i 2>/dev/null)
  [ -z "$left" ] || echo "slurm-down: jobs still in the queue: $left" >&2
fi

stop() {  # pid file, name
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "slurm-down: $2 (pid $pid) ignored SIGTERM for 10 s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$1"
}
stop /run/slurmd.pid slurmd
stop /run/slurmctld.pid slurmctld
LAB=/run/pilotfish-lab/slurm
if alive "$LAB/slurmctld.pid"; then
  echo "slurm-down: munged left running (the cluster lab's SLURM uses it; lab-down.sh stops it)"
  touch "$LAB/munged-started-by-lab"
else
  stop /run/munge/munged.pid munged
fi
echo "slurm-down: SLURM is stopped"
