#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on loopback (for CI and for trying the slurm profile locally).
#
#   .ci/slurm/start.sh     # as root; seconds when SLURM is installed, plus the apt install otherwise
#   sinfo; make test       # tests/workflow/test_slurm.py now runs instead of skipping
#   .ci/slurm/stop.sh      # stops the daemons it started, by pid file
#
# What it does (idempotent: a second call finds the cluster up and only checks it):
#   1. installs slurmctld, slurmd, slurm-client and munge with apt when they are missing;
#   2. starts munged as the munge user (the key comes with the Debian package);
#   3. creates fake GPU devices /dev/fakegpu0, /dev/fakegpu1 (mknod c 1 3, i.e. /dev/null) so that the
#      node offers two `gpu:fake` gres and jobs asking for `--gpus=1` or `--gpus=fake:1` are scheduled
#      (two at a time, one per CPU; the jobs still compute on the CPU);
#   4. writes slurm.conf + gres.conf into the state directory, with no accounting database (use
#      `--slurm-status-command squeue`) and MinJobAge=600 so finished jobs stay visible to
#      `scontrol show job` for 10 minutes, and links them from /etc/slurm/ (the default location).
#      SLURM_CONF alone is not enough: the plugin's job step drops SLURM_* variables before its
#      nested `srun`, which then finds no configuration. An /etc/slurm/slurm.conf that is not
#      such a link (a real cluster's) is never replaced: the script stops with an error instead;
#   5. starts slurmctld and slurmd (pid files in the state directory), resumes the node and waits
#      until `srun hostname` answers.
#
# Environment: DFML_SLURM_DIR (state directory, default /tmp/dfml-slurm),
#              DFML_SLURM_GPUS (fake GPUs on the node, default 2),
#              DFML_SLURM_TIMEOUT (seconds to wait for the cluster, default 180).
set -euo pipefail

STATE=${DFML_SLURM_DIR:-/tmp/dfml-slurm}
TIMEOUT=${DFML_SLURM_TIMEOUT:-180}
CONF=$STATE/slurm.conf
NODE=$(hostname -s)
PARTITION=debug
GPUS=${DFML_SLURM_GPUS:-2}
START=$(date +%s)

say() { echo "[slurm-start] $*"; }
die() {
    echo "[slurm-start] ERROR: $*" >&2
    for f in "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log"; do
        if [ -s "$f" ]; then echo "[slurm-start] last lines of $f:" >&2; tail -n 15 "$f" >&2; fi
    done
    exit 1
}
elapsed() { echo $(($(date +%s) - START)); }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "run as root: it installs packages, creates /dev/fakegpu* and starts the daemons"
mkdir -p "$STATE"/{state,spool,log}

# 1. Packages -----------------------------------------------------------------------------------
missing=()
for cmd in slurmctld slurmd sinfo srun munged; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM and munge by hand"
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$STATE/log/apt.log" 2>&1 || { cat "$STATE/log/apt.log" >&2; die "apt-get update failed"; }
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$STATE/log/apt.log" 2>&1 \
        || { tail -n 30 "$STATE/log/apt.log" >&2; die "apt-get install failed (log: $STATE/log/apt.log)"; }
    say "installed in $(elapsed)s"
fi

export SLURM_CONF=$CONF
# Never replace a real cluster's configuration.
for name in slurm.conf gres.conf; do
    target=/etc/slurm/$name
    if [ -e "$target" ] || [ -L "$target" ]; then
        [ -L "$target" ] && [ "$(readlink "$target")" = "$STATE/$name" ] \
            || die "$target exists and is not start.sh's link to $STATE/$name: this machine has its own SLURM
configuration; use that cluster (or move the file away to run the test cluster)"
    fi
done

# Already up (second call)? Check and leave.
if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && timeout 20 srun -N1 -t 1 hostname >/dev/null 2>&1; then
    for name in slurm.conf gres.conf; do ln -sfn "$STATE/$name" "/etc/slurm/$name"; done
    say "already running (state in $STATE)"
    sinfo -N -o "%N %P %T %c %m %G"
    exit 0
fi

# 2. munge ----------------------------------------------------------------------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --force; else create-munge-key -f; fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || die "munge does not answer after starting munged"
    touch "$STATE/started-munged"   # stop.sh only stops a munged that this script started
    say "started munged (pid $(cat /run/munge/munged.pid 2>/dev/null || echo ?))"
fi

# 3. Fake GPU -------------------------------------------------------------------------------------
for i in $(seq 0 $((GPUS - 1))); do
    if [ ! -e "/dev/fakegpu$i" ]; then
        mknod "/dev/fakegpu$i" c 1 3 || die "cannot mknod /dev/fakegpu$i (the container needs CAP_MKNOD)"
        say "created /dev/fakegpu$i (a char device like /dev/null) for the fake GPU gres"
    fi
done

# 4. Configuration --------------------------------------------------------------------------------
# The node's real CPUs/memory as slurmd sees them, e.g. "NodeName=vm CPUs=2 ... RealMemory=24105".
hw=$(slurmd -C | head -n 1)
[[ $hw == NodeName=* ]] || die "slurmd -C printed '$hw'"
cat >"$CONF" <<EOF
# Written by .ci/slurm/start.sh: one-node test cluster on loopback. Not for production.
ClusterName=dfml
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# No accounting database: sacct does not work, use squeue (snakemake --slurm-status-command squeue).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Finished jobs stay visible in squeue / scontrol show job for 10 minutes (tests read them).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL on scancel / time limit (time for a final checkpoint).
KillWait=30
ReturnToService=2
SlurmdTimeout=60
GresTypes=gpu
$hw NodeAddr=127.0.0.1 Gres=gpu:fake:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
sed -i 's/ UpTime=[^ ]*//' "$CONF"
cat >"$STATE/gres.conf" <<EOF
# Fake GPU: without File= the node drains.
AutoDetect=off
Name=gpu Type=fake File=/dev/fakegpu[0-$((GPUS - 1))]
EOF
say "wrote $CONF and $STATE/gres.conf (node: $hw)"
mkdir -p /etc/slurm
for name in slurm.conf gres.conf; do
    ln -sfn "$STATE/$name" "/etc/slurm/$name"
done
say "linked /etc/slurm/slurm.conf and gres.conf to them"

# 5. Daemons --------------------------------------------------------------------------------------
if alive "$STATE/slurmctld.pid"; then
    say "slurmctld already running (pid $(cat "$STATE/slurmctld.pid")): reconfiguring"
    scontrol reconfigure || true
else
    # -c: start from a clean state (no jobs or node states from an earlier test cluster).
    [ -f "$STATE/log/slurmctld.log" ] && mv "$STATE/log/slurmctld.log" "$STATE/log/slurmctld.log.old"
    slurmctld -c || die "slurmctld did not start"
    say "started slurmctld"
fi
for _ in $(seq 100); do [ -s "$STATE/slurmctld.pid" ] && break; sleep 0.1; done
until scontrol ping 2>/dev/null | grep -q UP; do
    alive "$STATE/slurmctld.pid" || die "slurmctld exited (see its log below)"
    [ "$(elapsed)" -lt "$TIMEOUT" ] || die "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s"
    sleep 1
done
if alive "$STATE/slurmd.pid"; then
    say "slurmd already running (pid $(cat "$STATE/slurmd.pid"))"
else
    [ -f "$STATE/log/slurmd.log" ] && mv "$STATE/log/slurmd.log" "$STATE/log/slurmd.log.old"
    slurmd || die "slurmd did not start"
    say "started slurmd"
fi

# The node registers as UNKNOWN/IDLE; resume it if an earlier run left it DOWN or DRAINED.
until sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    fi
    [ "$(elapsed)" -lt "$TIMEOUT" ] || die "node $NODE is '$state' after ${TIMEOUT}s: $(sinfo -h -R 2>/dev/null)"
    sleep 1
done
until timeout 20 srun -N1 -t 1 hostname >/dev/null 2>&1; do
    [ "$(elapsed)" -lt "$TIMEOUT" ] || die "'srun hostname' does not work after ${TIMEOUT}s"
    sleep 1
done
gpu_ok=$(timeout 20 srun -N1 -t 1 --gpus=1 sh -c 'echo "$CUDA_VISIBLE_DEVICES"' 2>&1) \
    || die "a --gpus=1 job does not run: $gpu_ok"

say "cluster up in $(elapsed)s: partition $PARTITION, node $NODE, gres gpu:fake:$GPUS (a --gpus=1 job sees CUDA_VISIBLE_DEVICES=$gpu_ok)"
sinfo -N -o "%N %P %T %c %m %G"
