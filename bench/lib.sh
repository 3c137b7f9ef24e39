# shellcheck shell=bash
# Shell helpers shared by the bench scripts: sourced, never run. The caller sets TMP (its temp
# dir) and PIDS (an array of the pids it started) before using stop_pid or stop_started, and
# WRK_PID (the load generator in flight, or empty) for stop_started. Only 127.0.0.1 is probed.

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

# Stops the command when it is missing, naming the Debian package that provides it.
need() { # command package
    command -v "$1" >/dev/null 2>&1 ||
        die "'$1' not found: install it with 'apt-get update && apt-get install -y $2'"
}

# Signals a process and its descendants, children first, by pid.
kill_tree() { # signal pid
    local child
    for child in $(ps -o pid= --ppid "$2" 2>/dev/null); do kill_tree "$1" "$child"; done
    kill "-$1" "$2" 2>/dev/null || true
}

# Stops everything the caller started, by pid: the wrk run in flight ($WRK_PID, if set, with its
# children), then $PIDS in reverse order, each with SIGTERM and up to 5 s (the gateway drains,
# nginx stops its workers) before SIGKILL. For the caller's EXIT trap.
stop_started() {
    local i pid
    if [[ -n ${WRK_PID:-} ]]; then
        kill_tree TERM "$WRK_PID"
        wait "$WRK_PID" 2>/dev/null || true
        WRK_PID=
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        wait "$pid" 2>/dev/null || true
    done
}

# "utime stime" of one process (all its threads), in clock ticks (getconf CLK_TCK).
cpu_ticks_of() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || die "process $1 is gone"
    # Fields after "pid (comm) ": state is $1, utime is $12, stime is $13.
    awk '{print $12, $13}' <<<"${stat##*) }"
}

# "utime stime" summed over several pids, in clock ticks.
cpu_ticks() {
    local u=0 s=0 pid pu ps
    for pid in "$@"; do
        read -r pu ps < <(cpu_ticks_of "$pid")
        [[ -n $pu && -n $ps ]] || die "cannot read the CPU time of process $pid"
        u=$((u + pu))
        s=$((s + ps))
    done
    echo "$u $s"
}

# A field of /proc/<pid>/status in KiB: VmRSS, VmHWM (peak since start or since the last
# `echo 5 > /proc/<pid>/clear_refs`).
mem_kib() { # pid field
    awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"
}

# "busy total" jiffies of the whole machine (all cores), from /proc/stat.
machine_jiffies() {
    awk '$1 == "cpu" {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat
}

# "busy total" jiffies of the CPUs named (numbers), summed, from /proc/stat.
cpu_jiffies() { # cpu...
    awk -v want=" $(printf 'cpu%s ' "$@")" 'index(want, " " $1 " ") {
        t = 0; for (i = 2; i <= NF; i++) t += $i
        busy += t - $5 - $6; total += t
    } END {print busy + 0, total + 0}' /proc/stat
}
