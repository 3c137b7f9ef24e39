#!/usr/bin/env bash
# Compares the gateway's CPU per request with nginx's, both proxying to the same fake GitHub on
# loopback. Measures CPU time from /proc (utime+stime) around fixed-length wrk runs and divides it
# by the number of requests wrk completed. See bench/README.md.
#
#   bash bench/compare-nginx.sh
#
# Knobs (environment): DURATION=10 (seconds per run), WARMUP=2 (seconds, unmeasured, per
# workload), THREADS=1, CONNECTIONS=32 (wrk), REPEATS=2 (runs per workload), INFO_RUNS=1
# (also run the rewritten check with the gateway at log level "info"; 0 skips it),
# GATEWAY_WORKERS= (sets server.worker_threads for the gateway; unset: its default, one per core),
# STRICT=0 (1: exit 3 when the CPU or RSS goal is not met), KEEP_TMP=0 (1: keep the temp dir),
# DISTURBED=10 (a run where more than this % of the machine went to other jobs is flagged "!" and
# left out of the means when an unflagged run of the same workload exists).
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-32}
REPEATS=${REPEATS:-2}
INFO_RUNS=${INFO_RUNS:-1}
STRICT=${STRICT:-0}
DISTURBED=${DISTURBED:-10}
KEEP_TMP=${KEEP_TMP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

CLIENT_ID=Iv1.bench00000000000
CLIENT_SECRET=bench-secret-0000
TOKEN=gho_bench0000000000000000000000000000000 # 40 characters, like GitHub's

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# ---------------------------------------------------------------------------------------------
# Prerequisites: every tool and the Debian package that provides it.

command -v cargo >/dev/null 2>&1 ||
    die "'cargo' not found: install the Rust toolchain (rustup; Debian's 'cargo' package is too old for edition 2024)"
need nginx nginx
need wrk wrk
need curl curl
need ss iproute2
need ps procps
need awk mawk
need base64 coreutils
need getconf libc-bin
need timeout coreutils
[[ -r /proc/self/stat ]] || die "/proc is not mounted; this script reads CPU times from /proc"

CLK_TCK=$(getconf CLK_TCK)
MIB=1048576

# ---------------------------------------------------------------------------------------------
# Cleanup: stop everything this script started, by pid.

TMP=$(mktemp -d /tmp/compare-nginx.XXXXXX)
PIDS=() # started processes, stopped in reverse order
WRK_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_started # lib.sh: the wrk run in flight, then PIDS in reverse order
    if [[ $KEEP_TMP == 1 ]]; then
        echo "temp dir kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Helpers

# cpu_ticks, mem_kib, machine_jiffies: lib.sh.

nginx_pids() { # master, then its workers
    echo "$NGINX_PID"
    ps -o pid= --ppid "$NGINX_PID" | tr -d ' '
}

# ---------------------------------------------------------------------------------------------
# 1. Build (release, locked).

# Two builds: built together, the example's dev-dependencies would switch tokio's `test-util` on
# in the gateway too (a mutex on every clock read: about 3 % more instructions per call).
echo "== building (cargo build --release --locked --bin oauth-apps-gateway, then --example fake-github)"
(cd "$ROOT" && cargo build --release --locked --bin oauth-apps-gateway &&
    cargo build --release --locked --example fake-github) \
    >"$TMP/build.log" 2>&1 || {
    tail -n 30 "$TMP/build.log" >&2
    die "cargo build failed"
}
[[ -x $TARGET_DIR/release/examples/fake-github && -x $TARGET_DIR/release/oauth-apps-gateway ]] ||
    die "release binaries not found under $TARGET_DIR/release"
# Run copies: a concurrent build in the same target dir must not swap the binary mid-benchmark.
mkdir -p "$TMP/bin"
cp "$TARGET_DIR/release/examples/fake-github" "$TARGET_DIR/release/oauth-apps-gateway" "$TMP/bin/"
FAKE_BIN=$TMP/bin/fake-github
GATEWAY_BIN=$TMP/bin/oauth-apps-gateway
# GATEWAY=path measures another gateway build (an older commit's) under the same conditions.
if [[ -n ${GATEWAY:-} ]]; then
    cp "$GATEWAY" "$GATEWAY_BIN" || die "cannot copy GATEWAY=$GATEWAY"
    echo "== gateway binary: $GATEWAY (GATEWAY=)"
fi
BUILT_FROM=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
if [[ -n $(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    BUILT_FROM+=" + uncommitted changes in src/"
fi
echo "== gateway built from $BUILT_FROM"

# The machine should be otherwise idle: CPU per request depends on how busy it is.
read -r b0 t0 < <(machine_jiffies)
sleep 1
read -r b1 t1 < <(machine_jiffies)
IDLE_BUSY=$(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN {printf "%.0f", (t > 0 ? 100 * b / t : 0)}')
if ((IDLE_BUSY > 10)); then
    echo "warning: the machine is already ${IDLE_BUSY}% busy before the benchmark starts;" \
        "results will be disturbed (see the 'other %' column)" >&2
fi

# ---------------------------------------------------------------------------------------------
# 2. The fake GitHub upstream.

# It keeps every request it received in memory (it is the test suite's fake), so it gets slower
# and bigger as a run goes on: restart_fake gives each measured run a fresh one on the same port.
FAKE_PORT=$(free_port)
FAKE_PID=
FAKE_STARTS=0

start_fake() {
    FAKE_STARTS=$((FAKE_STARTS + 1))
    "$FAKE_BIN" --listen "127.0.0.1:$FAKE_PORT" --client-id "$CLIENT_ID" \
        --client-secret "$CLIENT_SECRET" --token "$TOKEN" >"$TMP/fake-$FAKE_STARTS.log" 2>&1 &
    FAKE_PID=$!
    PIDS+=("$FAKE_PID")
    wait_http "fake GitHub" "$FAKE_PID" "http://127.0.0.1:$FAKE_PORT/headers"
}

restart_fake() {
    stop_pid "$FAKE_PID" "fake GitHub"
    start_fake
}

start_fake

# ---------------------------------------------------------------------------------------------
# 3. The gateway (started by start_gateway LEVEL; stopped by stop_gateway).

GATEWAY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
GATEWAY_PID=

start_gateway() { # log level
    local level=$1 conf=$TMP/gateway-$1.toml
    cat >"$conf" <<EOF
# Written by bench/compare-nginx.sh. Everything not set here takes its default.
[server]
listen = "127.0.0.1:$GATEWAY_PORT"
${GATEWAY_WORKERS:+worker_threads = $GATEWAY_WORKERS}

[upstream]
url = "http://127.0.0.1:$FAKE_PORT"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
level = "$level"
EOF
    "$GATEWAY_BIN" --config "$conf" --check-config >/dev/null || die "gateway rejected $conf"
    # RUST_LOG would override log.level.
    env -u RUST_LOG \
        "$GATEWAY_BIN" --config "$conf" >"$TMP/gateway-$level.log" 2>&1 &
    GATEWAY_PID=$!
    PIDS+=("$GATEWAY_PID")
    wait_http "gateway" "$GATEWAY_PID" "http://127.0.0.1:$ADMIN_PORT/readyz"
}

stop_gateway() {
    stop_pid "$GATEWAY_PID" gateway
}

start_gateway warn

# ---------------------------------------------------------------------------------------------
# 4. nginx: a plain reverse proxy to the same fake.

NGINX_PORT=$(free_port)
NGINX_DIR=$TMP/nginx
mkdir -p "$NGINX_DIR"
# nginx's workers run as "nobody" when started by root: let them reach the temp paths.
chmod 755 "$TMP" "$NGINX_DIR"
cat >"$NGINX_DIR/nginx.conf" <<EOF
# Written by bench/compare-nginx.sh: nginx as a plain reverse proxy, nothing else.
worker_processes 1;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;

events {
    worker_connections 1024;
}

http {
    access_log off;
    client_body_temp_path $NGINX_DIR/client_body;
    proxy_temp_path $NGINX_DIR/proxy;
    fastcgi_temp_path $NGINX_DIR/fastcgi;
    uwsgi_temp_path $NGINX_DIR/uwsgi;
    scgi_temp_path $NGINX_DIR/scgi;

    upstream fake_github {
        server 127.0.0.1:$FAKE_PORT;
        keepalive 32;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://fake_github;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
nginx -t -q -p "$NGINX_DIR/" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log" \
    -g 'daemon off;' || die "nginx rejected $NGINX_DIR/nginx.conf"
nginx -p "$NGINX_DIR/" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log" \
    -g 'daemon off;' >"$NGINX_DIR/stdout.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_http "nginx" "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/headers"

# ---------------------------------------------------------------------------------------------
# 5. Workloads.

BASIC="Authorization: Basic $(printf '%s:%s' "$CLIENT_ID" "$CLIENT_SECRET" | base64 -w0)"
LEGACY_PATH=/applications/$CLIENT_ID/tokens/$TOKEN
NEW_PATH=/applications/$CLIENT_ID/token
# wrk sends the same request every time when a script sets only wrk.method/body/headers.
cat >"$TMP/new-check.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"access_token":"$TOKEN"}'
wrk.headers["Content-Type"] = "application/json"
EOF

# Each workload: name|proxy|port|path|wrk script ("" for plain GET)|with Basic auth (1/0)
WORKLOADS=(
    "nginx GET /headers|nginx|$NGINX_PORT|/headers||0"
    "gateway GET /headers (pass-through)|gateway|$GATEWAY_PORT|/headers||0"
    "gateway GET legacy check (rewrite)|gateway|$GATEWAY_PORT|$LEGACY_PATH||1"
    "nginx POST new-form check|nginx|$NGINX_PORT|$NEW_PATH|$TMP/new-check.lua|1"
    "gateway POST new-form check (token_api)|gateway|$GATEWAY_PORT|$NEW_PATH|$TMP/new-check.lua|1"
)

# Preflight: every workload's request answers 200 through its proxy.
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r name proxy port path script auth <<<"$w"
    args=(-s -o /dev/null -w '%{http_code}' --max-time 5)
    [[ $auth == 1 ]] && args+=(-H "$BASIC")
    [[ -n $script ]] && args+=(-X POST -H 'Content-Type: application/json'
        --data "{\"access_token\":\"$TOKEN\"}")
    code=$(curl "${args[@]}" "http://127.0.0.1:$port$path" || true)
    [[ $code == 200 ]] || die "preflight: $name answered $code, expected 200"
done

# Gateway responses with a status other than 2xx so far, from its own metrics. 499 is left out:
# wrk closes its connections with calls still in flight when a run ends, and the gateway records
# each of those (status 499, outcome client_gone) rather than losing them.
gateway_non_2xx() {
    curl -sf --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk '/^oauth_apps_gateway_responses_total\{/ && !/status="(2[0-9][0-9]|499)"/ {n += $NF}
             END {printf "%d\n", n}'
}

RESULTS=$TMP/results.tsv # workload, run, req/s, proxy us/req, its user/sys split, upstream us/req, wrk us/req,
#                          machine busy %, other processes' share %, proxy RSS MiB
: >"$RESULTS"

# Runs wrk once against a workload. measure=1 records a result row labelled with $run.
run_wrk() { # workload-spec seconds measure run-label
    local spec=$1 secs=$2 measure=$3 label=$4
    local name proxy port path script auth
    IFS='|' read -r name proxy port path script auth <<<"$spec"
    local args=(-t"$THREADS" -c"$CONNECTIONS" -d"${secs}s" --timeout 5s)
    [[ $auth == 1 ]] && args+=(-H "$BASIC")
    [[ -n $script ]] && args+=(-s "$script")

    local proxy_pids
    if [[ $proxy == nginx ]]; then
        mapfile -t proxy_pids < <(nginx_pids)
    else
        proxy_pids=("$GATEWAY_PID")
    fi
    local non2xx_before=0
    [[ $proxy == gateway ]] && non2xx_before=$(gateway_non_2xx)

    local pu0 ps0 fu0 fs0
    read -r pu0 ps0 < <(cpu_ticks "${proxy_pids[@]}")
    read -r fu0 fs0 < <(cpu_ticks "$FAKE_PID")
    read -r mb0 mt0 < <(machine_jiffies)
    local out=$TMP/wrk.out timing=$TMP/wrk.time
    # bash's `time` gives wrk's own CPU; `timeout` bounds the run whatever wrk does.
    (
        TIMEFORMAT='%3U %3S'
        time timeout $((secs + 30)) wrk "${args[@]}" "http://127.0.0.1:$port$path" >"$out" 2>&1
    ) 2>"$timing" &
    WRK_PID=$!
    wait "$WRK_PID" || {
        cat "$out" >&2
        die "wrk failed or timed out on '$name'"
    }
    WRK_PID=
    local pu1 ps1 fu1 fs1
    read -r pu1 ps1 < <(cpu_ticks "${proxy_pids[@]}")
    read -r fu1 fs1 < <(cpu_ticks "$FAKE_PID")
    read -r mb1 mt1 < <(machine_jiffies)

    # Failures: wrk prints these lines only when the count is not zero.
    if grep -q 'Non-2xx or 3xx responses' "$out"; then
        cat "$out" >&2
        die "'$name' ($label): responses other than 2xx/3xx"
    fi
    if grep -q 'Socket errors' "$out"; then
        cat "$out" >&2
        die "'$name' ($label): socket errors"
    fi
    if [[ $proxy == gateway ]]; then
        local non2xx_after
        non2xx_after=$(gateway_non_2xx)
        [[ $non2xx_after == "$non2xx_before" ]] ||
            die "'$name' ($label): the gateway answered $((non2xx_after - non2xx_before)) non-2xx"
    fi
    [[ $measure == 1 ]] || return 0

    local requests rps wrk_cpu
    requests=$(awk '/requests in/ {print $1}' "$out")
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    [[ -n $requests && $requests -gt 0 ]] || {
        cat "$out" >&2
        die "'$name' ($label): wrk completed no request"
    }
    wrk_cpu=$(tail -n 1 "$timing" | awk '{print $1 + $2}')
    local rss_kib=0 pid
    for pid in "${proxy_pids[@]}"; do rss_kib=$((rss_kib + $(mem_kib "$pid" VmRSS))); done
    awk -v n="$name" -v r="$label" -v rps="$rps" -v req="$requests" -v hz="$CLK_TCK" \
        -v pu=$((pu1 - pu0)) -v ps=$((ps1 - ps0)) -v u=$((fu1 + fs1 - fu0 - fs0)) -v w="$wrk_cpu" \
        -v mb=$((mb1 - mb0)) -v mt=$((mt1 - mt0)) -v rss="$rss_kib" 'BEGIN {
            p = pu + ps
            other = mb - p - u - w * hz
            if (other < 0) other = 0
            printf "%s\t%s\t%.0f\t%.1f\t%.1f/%.1f\t%.1f\t%.1f\t%.0f\t%.0f\t%.1f\n", n, r, rps,
                p / hz / req * 1e6, pu / hz / req * 1e6, ps / hz / req * 1e6,
                u / hz / req * 1e6, w / req * 1e6,
                (mt > 0 ? 100 * mb / mt : 0), (mt > 0 ? 100 * other / mt : 0), rss / 1024
        }' >>"$RESULTS"
    tail -n 1 "$RESULTS" | awk -F'\t' '{printf "   %-42s %-8s %8s req/s  proxy %6s us/req\n", $1, $2, $3, $4}'
}

echo "== fake GitHub on 127.0.0.1:$FAKE_PORT, gateway on 127.0.0.1:$GATEWAY_PORT" \
    "(pid $GATEWAY_PID, admin $ADMIN_PORT), nginx on 127.0.0.1:$NGINX_PORT (master pid $NGINX_PID," \
    "workers $(ps -o pid= --ppid "$NGINX_PID" | tr -d ' ' | paste -sd, -))"
echo "== gateway server.worker_threads: ${GATEWAY_WORKERS:-default (one per core)}; nginx worker_processes 1"
echo "== wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $REPEATS measured run(s) per workload," \
    "interleaved; before each: a fresh fake and ${WARMUP}s of unmeasured warm-up"
# One measured run: a fresh fake, an unmeasured warm-up (opens the keep-alive pools), the run.
measure() { # workload-spec run-label
    restart_fake
    ((WARMUP > 0)) && run_wrk "$1" "$WARMUP" 0 warmup
    run_wrk "$1" "$DURATION" 1 "$2"
}
for ((rep = 1; rep <= REPEATS; rep++)); do
    for w in "${WORKLOADS[@]}"; do measure "$w" "run $rep"; done
done

# 6. Gateway memory after the runs (log level warn).
GW_RSS_KIB=$(mem_kib "$GATEWAY_PID" VmRSS)
GW_HWM_KIB=$(mem_kib "$GATEWAY_PID" VmHWM)
NGINX_RSS_KIB=0
for pid in $(nginx_pids); do NGINX_RSS_KIB=$((NGINX_RSS_KIB + $(mem_kib "$pid" VmRSS))); done

if [[ $INFO_RUNS == 1 ]]; then
    echo "== gateway restarted at log level info (access log to a file)"
    stop_gateway
    start_gateway info
    INFO_W="gateway GET legacy check (rewrite), info|gateway|$GATEWAY_PORT|$LEGACY_PATH||1"
    for ((rep = 1; rep <= REPEATS; rep++)); do measure "$INFO_W" "run $rep"; done
fi

# ---------------------------------------------------------------------------------------------
# 7. The table and the verdict.

echo
echo "CPU per request = process utime+stime (/proc/<pid>/stat) over the run / requests wrk completed."
echo "nginx = master + worker; gateway = all its threads. Proxy RSS = VmRSS after the run."
echo "busy % = whole machine (2 cores = 100 %); other % = CPU not charged to proxy, fake or wrk"
echo "(kernel softirq work for loopback TCP, plus any other job on the machine: check it stays low)."
echo
{
    printf 'workload\trun\treq/s\tproxy CPU us/req\tuser/sys\tupstream CPU us/req\twrk CPU us/req\tbusy %%\tother %%\tproxy RSS MiB\n'
    cat "$RESULTS"
} | awk -F'\t' -v d="$DISTURBED" '{
    mark = (NR > 1 && $9 > d) ? "!" : " "
    printf "%-42s %-5s %6s %16s %10s %19s %14s %6s %7s%s %13s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, mark, $10
}'
echo "(! = disturbed: 'other %' above $DISTURBED, another job was using the CPU)"
echo
printf 'gateway memory after the warn-level runs: VmRSS %.1f MiB, VmHWM (peak) %.1f MiB\n' \
    "$(awk -v k="$GW_RSS_KIB" 'BEGIN {print k / 1024}')" "$(awk -v k="$GW_HWM_KIB" 'BEGIN {print k / 1024}')"
printf 'nginx memory (master + worker) at the same time: VmRSS %.1f MiB\n' \
    "$(awk -v k="$NGINX_RSS_KIB" 'BEGIN {print k / 1024}')"

# A run is "disturbed" when more than DISTURBED % of the machine went to something other than the
# proxy, the fake and wrk (another job): its numbers are not comparable.
DISTURBED_RUNS=$(awk -F'\t' -v d="$DISTURBED" '$9 > d' "$RESULTS" | wc -l)
if ((DISTURBED_RUNS > 0)); then
    echo "warning: $DISTURBED_RUNS run(s) had 'other %' above $DISTURBED (another job was using the" \
        "CPU); the means below leave them out where an undisturbed run of the same workload exists"
fi
CLEAN=$TMP/results-clean.tsv
awk -F'\t' -v d="$DISTURBED" 'NR == FNR {if ($9 <= d) ok[$1] = 1; next}
    $9 <= d || !($1 in ok)' "$RESULTS" "$RESULTS" >"$CLEAN"
mean_cpu() { # workload name -> mean proxy us/req over its (undisturbed) runs
    awk -F'\t' -v n="$1" '$1 == n {s += $4; c++} END {if (c) printf "%.1f", s / c}' "$CLEAN"
}
NGINX_CPU=$(mean_cpu "nginx GET /headers")
echo
echo "mean proxy CPU per request, relative to nginx GET /headers:"
awk -F'\t' '!($1 in c) {order[++k] = $1} {s[$1] += $4; c[$1]++}
    END {for (i = 1; i <= k; i++) printf "  %-44s %6.1f us/req  x%.2f\n", order[i],
        s[order[i]] / c[order[i]], (s[order[i]] / c[order[i]]) / (s[order[1]] / c[order[1]])}' "$CLEAN"
REWRITE_CPU=$(mean_cpu "gateway GET legacy check (rewrite)")
echo
CPU_OK=$(awk -v g="$REWRITE_CPU" -v n="$NGINX_CPU" 'BEGIN {print (g <= n) ? 1 : 0}')
RATIO=$(awk -v g="$REWRITE_CPU" -v n="$NGINX_CPU" 'BEGIN {printf "%.2f", g / n}')
RSS_OK=$(awk -v k="$GW_HWM_KIB" -v m="$MIB" 'BEGIN {print (k * 1024 < 100 * m) ? 1 : 0}')
if [[ $CPU_OK == 1 ]]; then verdict=MET; else verdict="NOT MET"; fi
echo "goal 'CPU per rewritten call <= nginx per plain proxied call': $verdict" \
    "(gateway rewrite ${REWRITE_CPU} us/req vs nginx GET ${NGINX_CPU} us/req, ratio $RATIO)"
if [[ $RSS_OK == 1 ]]; then verdict=MET; else verdict="NOT MET"; fi
echo "goal 'RSS in tens of MiB' (peak VmHWM < 100 MiB): $verdict"
if [[ $STRICT == 1 && ($CPU_OK != 1 || $RSS_OK != 1) ]]; then
    exit 3
fi
