#!/usr/bin/env bash
# Stop the one-node test cluster started by .ci/slurm-up.sh: cancel all jobs, then stop slurmd,
# slurmctld and munged (each by the PID in its pid file; nothing else is touched).
# Configuration, munge key and Slurm state stay; `.ci/slurm-up.sh` starts it all again.
# Every wait is bounded; exits 0 when nothing is left running.
set -euo pipefail

export SLURM_CONF=/etc/slurm/slurm.conf
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm-down: $*" >&2; }

[[ $(id -u) -eq 0 ]] || { log "must run as root"; exit 1; }

# shellcheck source=.ci/slurm-lib.sh
source "$(dirname "$0")/slurm-lib.sh"

# Cancel every job while the controller can still do it, and give the jobs up to 15 s to end.
if alive $CTLD_PID slurmctld && command -v scancel >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086
        timeout 10 scancel --quiet $jobs || true
    fi
    for ((i = 0; i < 30; i++)); do
        [[ -z $(timeout 10 squeue -h -t PD,R,CG,S -o %i 2>/dev/null || true) ]] && break
        sleep 0.5
    done
fi

stop_daemon $SLURMD_PID slurmd
stop_daemon $CTLD_PID slurmctld
stop_daemon $MUNGE_PID munged
log "stopped"
