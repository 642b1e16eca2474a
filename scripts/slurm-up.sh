#!/usr/bin/env bash
# Start a single-node SLURM on this machine (munge, slurmctld, slurmd) for pilotfish's
# SLURM tests and examples, as root and without systemd. Idempotent: installs Debian's
# packages if missing, writes /etc/slurm/slurm.conf only if it is not ours already,
# starts only the daemons that are not running, and waits until the node is idle.
# Facts behind each step: ../shared/notes/slurm.md. Stop with scripts/slurm-down.sh.
# Exit status 0: SLURM is up; 77: cannot run here (not root, no apt), with the reason.
set -euo pipefail

skip() { echo "slurm-up: skipped: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (it installs packages and starts munged, slurmctld, slurmd)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || skip "SLURM is not installed and apt-get is not available"
  echo "slurm-up: installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
           slurmctld slurmd slurm-client munge >/dev/null; }
fi

node=$(hostname -s)
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: a key (the package makes one), its run directory, the daemon
[ -f /etc/munge/munge.key ] || { mungekey -c -f -k /etc/munge/munge.key \
    && chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { echo "slurm-up: munged does not answer" >&2; exit 1; }

# slurm.conf: one node on 127.0.0.1 (CPUs=4 on any core count: config_overrides)
mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.8)}')
conf=/etc/slurm/slurm.conf
want=$(cat <<CONF
# written by pilotfish scripts/slurm-up.sh (single-node SLURM for tests)
ClusterName=ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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
MailProg=/bin/true
KillWait=5
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
NodeName=${node} NodeAddr=127.0.0.1 CPUs=4 RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
if [ -f "$conf" ] && ! grep -q 'pilotfish scripts/slurm-up.sh' "$conf"; then
  if ! { alive /run/slurmctld.pid && alive /run/slurmd.pid; }; then
    cp -p "$conf" "$conf.before-pilotfish"
    echo "slurm-up: kept the previous $conf as $conf.before-pilotfish"
  fi
fi
changed=0
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
  if grep -q 'pilotfish scripts/slurm-up.sh' "$conf" 2>/dev/null || [ ! -f "$conf" ] \
      || [ -f "$conf.before-pilotfish" ]; then
    install -d /etc/slurm
    printf '%s\n' "$want" >"$conf"
    changed=1
  else
    echo "slurm-up: using the existing $conf (not written by this script)"
  fi
fi
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
install -d /var/lib/slurm/slurmd
chown slurm:slurm /var/log/slurm

if [ "$changed" = 1 ] && { alive /run/slurmctld.pid || alive /run/slurmd.pid; }; then
  echo "slurm-up: slurm.conf changed: restarting the daemons"
  "$(dirname "$0")/slurm-down.sh"
fi
alive /run/slurmctld.pid || slurmctld -c -i
alive /run/slurmd.pid || slurmd

state=""
for _ in $(seq 100); do
  state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|*fail*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.1
done
case "$state" in
  idle|mixed|allocated|completing) echo "slurm-up: SLURM is up (node $node: $state)" ;;
  *) echo "slurm-up: node $node did not become idle (state: ${state:-none});" \
          "see /var/log/slurm/slurmctld.log and slurmd.log" >&2; exit 1 ;;
esac
