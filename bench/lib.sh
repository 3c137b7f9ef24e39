# Shell helpers shared by the bench scripts: sourced, never run. The caller sets TMP (its temp
# dir) and PIDS (an array of the pids it started) before using stop_pid. Only 127.0.0.1 is probed.

die() {
    echo "error: $*" >&2
    exit 1
}

PICKED_PORTS=" "
# A loopback TCP port nothing uses, outside the ephemeral range (32768-60999) so the load
# generator's and the proxies' own outgoing connections cannot take it between picking and
# binding.
free_port() {
    local p
    for _ in $(seq 500); do
        p=$((20000 + RANDOM % 12000))
        [[ $PICKED_PORTS == *" $p "* ]] && continue
        if [[ -z $(ss -Htan "( sport = :$p or dport = :$p )") ]]; then
            PICKED_PORTS+="$p "
            echo "$p"
            return 0
        fi
    done
    die "no free port found in 20000-31999"
}

# Waits (at most 10 s) until `curl URL [args]` answers with status 2xx.
wait_http() { # name pid url [curl args...]
    local name=$1 pid=$2 url=$3
    shift 3
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || die "$name exited during start-up (logs in $TMP)"
        local code
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" || true)
        [[ $code == 2* ]] && return 0
        sleep 0.1
    done
    die "$name did not answer 2xx on $url within 10 s"
}

# Stops one process started here (SIGTERM, at most 10 s) and forgets its pid.
stop_pid() { # pid name
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && die "${2:-process} (pid $pid) did not stop within 10 s of SIGTERM"
    wait "$pid" 2>/dev/null || true
    for i in "${!PIDS[@]}"; do
        [[ ${PIDS[i]} == "$pid" ]] && unset 'PIDS[i]'
    done
    PIDS=("${PIDS[@]}")
}
