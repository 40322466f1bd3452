#!/usr/bin/env bash
# A single-node Slurm on this machine, for tests/test_slurm.py and CI (.ci/run): installs the Debian packages
# (slurmctld, slurmd, slurm-client, munge) when apt is there and they are missing, writes a localhost slurm.conf
# (no cgroups: proctrack/linuxproc, task/none; state, spool and logs under $SLURM_TEST_DIR), starts munged,
# slurmctld and slurmd as root, and waits until the node is idle. Idempotent: a second call finds it running.
# Exit 0 when `sinfo` shows the node up; 3 when it cannot be installed here, 4 when a daemon does not come up,
# each with the evidence (logs) on stderr. The daemons keep running afterwards (pid files in $SLURM_TEST_DIR).
set -uo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/harness-slurm}
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)

say() { echo "setup_slurm: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "needs root (slurmd runs as root here); skipping"
  exit 3
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    say "slurm is not installed and there is no apt-get"
    exit 3
  fi
  start=$(date +%s)
  # The four packages the daemons and clients need; `slurm-wlm` would also pull some 30 plugin packages.
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge) >"$DIR.apt.log" 2>&1; then
    say "apt-get install failed:"; tail -20 "$DIR.apt.log" >&2
    exit 3
  fi
  say "installed slurmctld slurmd slurm-client munge in $(( $(date +%s) - start )) s"
fi

if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && sinfo -h -o %T 2>/dev/null | grep -Eqx 'idle|mixed|allocated'; then
  say "already running: $(sinfo -h -o '%N %T %c CPUs')"
  exit 0
fi

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge

# munge: a key, then the daemon (as root: --force accepts root-owned files)
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  # a munged this script started earlier but without its socket now (e.g. after a package reinstall)
  [ -s "$DIR/munged.pid" ] && kill "$(cat "$DIR/munged.pid")" 2>/dev/null && sleep 1
  munged --force --pid-file="$DIR/munged.pid" >"$DIR/log/munged.out" 2>&1 || { say "munged failed to start:"; cat "$DIR/log/munged.out" /var/log/munge/munged.log 2>/dev/null >&2; exit 4; }
fi

cat >/etc/slurm/slurm.conf <<CONF
# written by tests/slurm/setup_slurm.sh: one node, this machine, root daemons, no cgroups
ClusterName=harness-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# a requeued job may start again after cred_expire seconds (default 120: the tests would wait two minutes)
AuthInfo=cred_expire=10
KillWait=30
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld -c >"$DIR/log/slurmctld.out" 2>&1 || { say "slurmctld failed:"; cat "$DIR/log/slurmctld.out" "$DIR/log/slurmctld.log" >&2; exit 4; }
pgrep -x slurmd >/dev/null || slurmd -c >"$DIR/log/slurmd.out" 2>&1 || { say "slurmd failed:"; cat "$DIR/log/slurmd.out" "$DIR/log/slurmd.log" >&2; exit 4; }

for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    say "running: $(sinfo -h -o '%N %T %c CPUs')"
    exit 0
  fi
  sleep 1
done
say "the node did not become idle within 60 s:"
sinfo >&2 2>&1
tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2
exit 4
