#!/usr/bin/env bash
# Start (or reuse) a real one-node Slurm cluster on this machine, for tests that submit real
# sbatch jobs through Parsl's SlurmProvider.
#
#   * munge for authentication, slurmctld + slurmd talking over loopback;
#   * no systemd needed (daemons are started directly), no cgroups, no accounting;
#   * idempotent: a healthy cluster with an unchanged config is reused as it is, otherwise
#     the daemons are (re)started cleanly; every wait is bounded.
#
# Must run as root (CI runs it as root on a fresh Debian 12 machine). Ends with a smoke test:
# a job runs python3 from the submitter's PATH and connects back to a TCP port opened by this
# script on 127.0.0.1; squeue --job and scancel are exercised too.
# Prints one summary line and exits 0; on failure prints the daemons' log tails and exits 1.
# Stop it all with .ci/slurm-down.sh.
set -euo pipefail

START=$SECONDS
PARTITION=debug
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET=/run/munge/munge.socket.2
MUNGE_PID=/run/munge/munged.pid
NODE=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "slurm-up: $*" >&2; }

# On any failure: show what the daemons said, then exit non-zero.
dump_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 30 "$f" >&2 || true
    done
    if alive $CTLD_PID slurmctld; then
        echo "----- sinfo -----" >&2
        timeout 5 sinfo -N -l >&2 || true
    fi
}
fail() { log "FAILED: $*"; dump_logs; exit 1; }
trap 'fail "command failed at line $LINENO: $BASH_COMMAND"' ERR

[[ $(id -u) -eq 0 ]] || fail "must run as root"

# shellcheck source=.ci/slurm-lib.sh
source "$(dirname "$0")/slurm-lib.sh"

# ---------------------------------------------------------------- 1. packages (only when missing)
if ! command -v sbatch slurmctld slurmd munged >/dev/null 2>&1 \
    || [[ $(command -v sbatch slurmctld slurmd munged | wc -l) -ne 4 ]]; then
    log "installing slurm-wlm + munge ..."
    # Keep the packages' init scripts from starting daemons during install: we start them below.
    policy_added=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        timeout 600 apt-get install -y -q -o DPkg::Lock::Timeout=120 --no-install-recommends slurm-wlm slurm-client munge >/dev/null
    }
    # Refresh the package lists first only if they lack slurm-wlm (fresh images often ship
    # without lists); if the install fails on stale lists, refresh them and try once more.
    install_rc=0
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
        timeout 300 apt-get update -q -o DPkg::Lock::Timeout=120 >/dev/null || install_rc=$?
    fi
    if ((install_rc == 0)) && ! apt_install; then
        timeout 300 apt-get update -q -o DPkg::Lock::Timeout=120 >/dev/null && apt_install || install_rc=$?
    fi
    if [[ -n $policy_added ]]; then rm -f /usr/sbin/policy-rc.d; fi
    ((install_rc == 0)) || fail "apt-get update/install failed (rc=$install_rc)"
fi
VERSION=$(slurmd -V | awk '{print $2}')

# ---------------------------------------------------------------- 2. munge
install -d -m 0700 -o munge -g munge /etc/munge /var/lib/munge /var/log/munge
install -d -m 0755 -o munge -g munge /run/munge
if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    dd if=/dev/urandom of=$MUNGE_KEY bs=1024 count=1 status=none
fi
chown munge:munge $MUNGE_KEY
chmod 0400 $MUNGE_KEY

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    stop_daemon $MUNGE_PID munged
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"    # stale socket from a dead munged
    log "starting munged"
    runuser -u munge -- munged    # daemonizes itself
    for ((i = 0; i < 20; i++)); do munge_ok && break; sleep 0.5; done
    munge_ok || fail "munged does not answer"
fi

# ---------------------------------------------------------------- 3. slurm.conf
# `slurmd -C` prints this machine's node line, e.g.
#   NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24036
# We keep its hardware fields and address the node on loopback, so name resolution does not matter.
NODE_HW=$(slurmd -C | awk '/^NodeName=/ { sub(/^NodeName=[^ ]+ /, ""); print; exit }')
[[ -n $NODE_HW ]] || fail "slurmd -C printed no node line"
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_HW")

install -d -m 0755 $CONF_DIR $LOG_DIR /var/spool/slurmctld /var/spool/slurmd
NEW_CONF=$(
    cat <<EOF
# Written by gptlab .ci/slurm-up.sh: one-node test cluster on loopback. Edits are overwritten.
ClusterName=gptlab-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start submitted batch jobs right away (defaults: batched every 3 s, main loop at most every 2 s).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No accounting, no cgroups (containers here have no cgroup delegation).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# Finished jobs leave squeue after 60 s; nodes are not marked down during short hiccups.
MinJobAge=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 $NODE_HW State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
CONF_CHANGED=
if [[ ! -f $CONF ]] || [[ $(cat $CONF) != "$NEW_CONF" ]]; then
    printf '%s\n' "$NEW_CONF" >$CONF
    CONF_CHANGED=1
fi
# slurmd 22.05 always parses cgroup.conf (an unknown key there is fatal) even though nothing in
# this config uses a cgroup plugin; write a minimal one with everything off.
# (`CgroupPlugin=disabled` only exists in newer Slurm releases.)
NEW_CGROUP_CONF='# Written by gptlab .ci/slurm-up.sh: cgroups are not used by this cluster.
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no'
if [[ ! -f $CONF_DIR/cgroup.conf ]] || [[ $(cat $CONF_DIR/cgroup.conf) != "$NEW_CGROUP_CONF" ]]; then
    printf '%s\n' "$NEW_CGROUP_CONF" >$CONF_DIR/cgroup.conf
    CONF_CHANGED=1
fi

# ---------------------------------------------------------------- 4. daemons
ctld_ok() { alive $CTLD_PID slurmctld && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
REUSED=1
if [[ -n $CONF_CHANGED ]] || ! ctld_ok || ! alive $SLURMD_PID slurmd; then
    REUSED=
    if alive $CTLD_PID slurmctld || alive $SLURMD_PID slurmd; then
        log "restarting slurmctld and slurmd ($([[ -n $CONF_CHANGED ]] && echo "config changed" || echo "unhealthy"))"
    fi
    stop_daemon $SLURMD_PID slurmd
    stop_daemon $CTLD_PID slurmctld
    log "starting slurmctld and slurmd"
    slurmctld                 # daemonizes itself; recovers saved state, if any
    for ((i = 0; i < 40; i++)); do
        ctld_ok && break
        # slurmctld exits soon after daemonizing on a fatal error: fail fast instead of waiting.
        ((i < 6)) || alive $CTLD_PID slurmctld || fail "slurmctld is not running"
        sleep 0.5
    done
    ctld_ok || fail "slurmctld did not come up within 20 s"
    slurmd -N "$NODE"         # daemonizes itself
fi

# Wait (at most 60 s) until the node is idle (or busy with jobs), resuming it if it is down/drained.
state=
for ((i = 0; i < 120; i++)); do
    # slurmd exits soon after daemonizing on a fatal error: fail fast instead of waiting 60 s.
    ((i < 6)) || alive $SLURMD_PID slurmd || fail "slurmd is not running"
    state=$(timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 | tr -d '*~#$@^-' || true)
    case $state in
        idle | mix | alloc | comp) break ;;
        down | drain | drng | fail | failg)
            timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
[[ $state =~ ^(idle|mix|alloc|comp)$ ]] || fail "node $NODE is '$state', not idle, after 60 s"

# ---------------------------------------------------------------- 5. smoke test
WORK=$(mktemp -d /tmp/slurm-up.XXXXXX)
LISTENER=
cleanup() { [[ -n $LISTENER ]] && kill "$LISTENER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

# (a) squeue --job and scancel, on a job that would otherwise sleep for 5 minutes.
sleeper=$(timeout 20 sbatch --parsable -J slurm-up-sleep -o /dev/null --wrap 'sleep 300')
sleeper=${sleeper%%;*}
st=
for ((i = 0; i < 120; i++)); do    # at most 30 s for it to start running
    st=$(timeout 10 squeue -h --job "$sleeper" -o '%i %t' 2>/dev/null || true)
    [[ $st == "$sleeper R" ]] && break
    sleep 0.25
done
[[ $st == "$sleeper R" ]] || fail "squeue --job $sleeper says '$st', not running, after 30 s"
timeout 10 scancel "$sleeper"
for ((i = 0; i < 40; i++)); do
    st=$(timeout 10 squeue -h --job "$sleeper" -o %t 2>/dev/null || true)
    [[ -z $st || $st == CA ]] && break
    sleep 0.5
done
[[ -z $st || $st == CA ]] || fail "scancel: job $sleeper is still '$st' after 20 s"

# (b) a job runs python3 (from this PATH, exported by sbatch) and reports back over loopback TCP,
#     as Parsl's workers do. The listener below accepts one connection and records the message.
timeout 90 python3 - "$WORK" <<'EOF' &
import socket, sys, pathlib
work = pathlib.Path(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 0))
srv.settimeout(85)
(work / "port").write_text(str(srv.getsockname()[1]))
conn, _ = srv.accept()
conn.settimeout(10)
data = b""
while chunk := conn.recv(4096):
    data += chunk
(work / "received").write_bytes(data)
EOF
LISTENER=$!
for ((i = 0; i < 40; i++)); do [[ -s $WORK/port ]] && break; sleep 0.25; done
[[ -s $WORK/port ]] || fail "local TCP listener did not start"
PORT=$(cat "$WORK/port")

# (Polled here rather than with `sbatch --wait`, which re-checks only every 2 s, then 10 s.)
jobid=$(timeout 20 sbatch --parsable -J slurm-up-smoke -o "$WORK/job.out" -e "$WORK/job.err" \
    --wrap "hostname; python3 -c 'import socket, sys; print(sys.version.split()[0], sys.executable); s = socket.create_connection((\"127.0.0.1\", $PORT), timeout=10); s.sendall(b\"hello from job\"); s.close()'")
jobid=${jobid%%;*}
job=
for ((i = 0; i < 240; i++)); do    # at most 60 s
    job=$(timeout 10 scontrol -o show job "$jobid" 2>/dev/null || true)
    [[ $job =~ JobState=(PENDING|CONFIGURING|RUNNING|COMPLETING) ]] || break
    sleep 0.25
done
[[ $job == *"JobState=COMPLETED "*"ExitCode=0:0"* ]] \
    || fail "smoke job $jobid did not complete with exit 0: ${job:0:300} / $(cat "$WORK/job.out" "$WORK/job.err" 2>/dev/null)"
wait "$LISTENER" || fail "listener got no connection from the job"
LISTENER=
[[ $(cat "$WORK/received") == "hello from job" ]] || fail "listener got '$(cat "$WORK/received")'"
read -r job_host < "$WORK/job.out"
job_py=$(sed -n 2p "$WORK/job.out")
[[ $job_host == "$NODE" && $job_py == [0-9]* ]] || fail "unexpected job output: $(cat "$WORK/job.out")"

echo "slurm-up: OK slurm $VERSION, node $NODE (CPUs=$CPUS RealMemory=${MEM}MB) partition $PARTITION;" \
    "$([[ -n $REUSED ]] && echo reused running daemons || echo started daemons);" \
    "smoke job $jobid ran python $job_py and reached 127.0.0.1:$PORT; $((SECONDS - START)) s"
