# Helpers shared by slurm-up.sh and slurm-down.sh (sourced; the caller defines log()).

# alive PIDFILE NAME: the process recorded in PIDFILE is running and is NAME.
alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    # A zombie (killed, not yet reaped by PID 1) counts as stopped.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# stop_daemon PIDFILE NAME: SIGTERM the recorded process, wait up to 15 s, then SIGKILL.
stop_daemon() {
    local pid i
    alive "$1" "$2" || { rm -f "$1"; return 0; }
    pid=$(cat "$1")
    log "stopping $2 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do alive "$1" "$2" || break; sleep 0.5; done
    if alive "$1" "$2"; then
        log "$2 ignored SIGTERM for 15 s: SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}
