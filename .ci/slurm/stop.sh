#!/usr/bin/env bash
# Stop the test cluster that .ci/slurm/start.sh brought up: slurmd, slurmctld and (only when
# start.sh started it) munged, each by its pid file. Idempotent; jobs still queued or running
# are cancelled first; the /etc/slurm links to the state directory are removed. The state directory
# stays (logs for debugging); remove it by hand if wanted.
set -uo pipefail

STATE=${DFML_SLURM_DIR:-/tmp/dfml-slurm}
say() { echo "[slurm-stop] $*"; }

stop_pidfile() {   # name pidfile
    local name=$1 pidfile=$2 pid
    if [ ! -s "$pidfile" ]; then say "$name: no pid file ($pidfile)"; return 0; fi
    pid=$(cat "$pidfile")
    if ! kill -0 "$pid" 2>/dev/null; then say "$name: pid $pid not running"; rm -f "$pidfile"; return 0; fi
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "$name: pid $pid ignored SIGTERM for 10s, sending SIGKILL"; kill -KILL "$pid"; fi
    rm -f "$pidfile"
    say "$name: stopped pid $pid"
}

if [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -t PENDING,RUNNING,SUSPENDED -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel $jobs
        sleep 2
    fi
fi
stop_pidfile slurmd "$STATE/slurmd.pid"
stop_pidfile slurmctld "$STATE/slurmctld.pid"
if [ -e "$STATE/started-munged" ]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$STATE/started-munged"
else
    say "munged: not started by start.sh, left alone"
fi
for name in slurm.conf gres.conf; do
    if [ -L "/etc/slurm/$name" ] && [ "$(readlink "/etc/slurm/$name")" = "$STATE/$name" ]; then
        rm -f "/etc/slurm/$name"
        say "removed the link /etc/slurm/$name"
    fi
done
