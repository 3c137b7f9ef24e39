#!/usr/bin/env bash
# Side-by-side benchmark (issue 9): the gateway and nginx, each a keep-alive reverse proxy in front
# of the same stub upstream (an nginx answering every request with a fixed 1,232-byte GitHub-shaped
# JSON body), on pinned cores, same requests, interleaved rounds. Per run: req/s, p50/p99, proxy CPU
# per request, upstream connections opened per 1,000 requests, peak RSS, errors; then the memory
# with IDLE_CONNECTIONS idle keep-alive client connections; then a verdict per issue-9 target.
# Prints the tables and writes bench/RESULTS.md. See bench/README.md.
#
#   bash bench/side-by-side.sh                                   # about 4 minutes after the build
#   ROUNDS=1 DURATION=2 IDLE_CONNECTIONS=2000 bash bench/side-by-side.sh     # a quick look
#   GATEWAY=/path/to/oauth-apps-gateway bash bench/side-by-side.sh           # no build
#
# Knobs (environment): DURATION=5 (seconds per measured run), WARMUP=1 (seconds, unmeasured, before
# each run), ROUNDS=3, CONNECTIONS=64, THREADS=1 (wrk), WRK_CPU=0, PROXY_CPU=1 (taskset cores: wrk
# and the idle client; the proxies and the stub), WORKLOADS= (short names, default all: direct nginx
# legacy pass new nginx-new churn-nginx churn-legacy tls-nginx tls-legacy tls-pass), CHURN_EVERY=25,
# IDLE_CONNECTIONS=10000 (0 skips), IDLE_CONCURRENCY=256, GATEWAY= (a binary: no build),
# GATEWAY_ENV= (VAR=value words for the gateway's environment, e.g. RUST_BACKTRACE=1),
# GATEWAY_SERVER_EXTRA=, GATEWAY_UPSTREAM_EXTRA= (TOML lines added to [server] / [upstream]),
# TLS_UPSTREAM_HOST=127.0.0.1 (host in the TLS gateway's upstream url; the test certificate also
# names localhost), RESULTS=bench/RESULTS.md (empty: not written), DISTURBED=10, STRICT=0 (1: exit
# 3 when a target is missed), KEEP_TMP=0, BUILD_TIMEOUT=1800.
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit; every wait is
# bounded. Missing tools are installed with apt-get when run as root.
set -euo pipefail
export LC_ALL=C

DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WRK_CPU=${WRK_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
ALL_KEYS="direct nginx legacy pass new nginx-new churn-nginx churn-legacy tls-nginx tls-legacy tls-pass"
WORKLOADS=${WORKLOADS:-$ALL_KEYS}
CHURN_EVERY=${CHURN_EVERY:-25}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
IDLE_CONCURRENCY=${IDLE_CONCURRENCY:-256}
GATEWAY_ENV=${GATEWAY_ENV:-}
GATEWAY_SERVER_EXTRA=${GATEWAY_SERVER_EXTRA:-}
GATEWAY_UPSTREAM_EXTRA=${GATEWAY_UPSTREAM_EXTRA:-}
TLS_UPSTREAM_HOST=${TLS_UPSTREAM_HOST:-127.0.0.1}
DISTURBED=${DISTURBED:-10}
STRICT=${STRICT:-0}
KEEP_TMP=${KEEP_TMP:-0}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1800}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RESULTS=${RESULTS-$ROOT/bench/RESULTS.md}

CLIENT_ID=Iv1.bench00000000000
CLIENT_SECRET=bench-secret-0000
TOKEN=gho_bench0000000000000000000000000000000 # gho_ + 36 characters, like GitHub's
BODY_BYTES=1232

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

for v in DURATION WARMUP ROUNDS CONNECTIONS THREADS WRK_CPU PROXY_CPU CHURN_EVERY IDLE_CONNECTIONS \
    IDLE_CONCURRENCY DISTURBED BUILD_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
((DURATION > 0 && ROUNDS > 0 && CONNECTIONS > 0 && THREADS > 0 && CHURN_EVERY > 1)) ||
    die "DURATION, ROUNDS, CONNECTIONS and THREADS must be at least 1, CHURN_EVERY at least 2"
for k in $WORKLOADS; do
    [[ " $ALL_KEYS " == *" $k "* ]] || die "unknown workload '$k' in WORKLOADS (known: $ALL_KEYS)"
done
read -ra GW_ENV <<<"$GATEWAY_ENV"
for kv in "${GW_ENV[@]}"; do
    [[ $kv == [A-Za-z_]*=* ]] || die "GATEWAY_ENV takes VAR=value words, not '$kv'"
done

# ---------------------------------------------------------------------------------------------
# Cleanup: stop everything this script started, by pid (lib.sh stop_started).

TMP=$(mktemp -d /tmp/side-by-side.XXXXXX)
PIDS=() # started processes, stopped in reverse order
WRK_PID=
POLICY_RC_D= # set while a temporary /usr/sbin/policy-rc.d of ours exists

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_started
    [[ -n $POLICY_RC_D ]] && rm -f "$POLICY_RC_D"
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
# 1. Prerequisites: installed with apt-get when missing (root), else named.

TOOLS=(wrk:wrk nginx:nginx openssl:openssl python3:python3 curl:curl ss:iproute2 ps:procps
    taskset:util-linux timeout:coreutils base64:coreutils sha256sum:coreutils awk:mawk
    getconf:libc-bin)
MISSING_CMDS=()
MISSING_PKGS=()
for t in "${TOOLS[@]}"; do
    command -v "${t%%:*}" >/dev/null 2>&1 && continue
    MISSING_CMDS+=("${t%%:*}")
    [[ " ${MISSING_PKGS[*]} " == *" ${t#*:} "* ]] || MISSING_PKGS+=("${t#*:}")
done
if ((${#MISSING_PKGS[@]})); then
    INSTALL="apt-get update && apt-get install -y ${MISSING_PKGS[*]}"
    ((EUID == 0)) || die "missing ${MISSING_CMDS[*]}: run '$INSTALL' as root, then run this again"
    command -v apt-get >/dev/null 2>&1 || die "missing ${MISSING_CMDS[*]} and no apt-get: install them"
    echo "== installing ${MISSING_CMDS[*]}: $INSTALL"
    # Debian's nginx package starts the system nginx (port 80) on install; a policy-rc.d that
    # refuses service starts keeps it stopped. Only ours is removed afterwards.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        POLICY_RC_D=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\n# Temporary, written by bench/side-by-side.sh: no service starts.\nexit 101\n' \
            >"$POLICY_RC_D"
        chmod 755 "$POLICY_RC_D"
    fi
    { timeout 600 apt-get update && DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y --no-install-recommends "${MISSING_PKGS[@]}"; } >"$TMP/apt.log" 2>&1 || {
        tail -n 20 "$TMP/apt.log" >&2
        die "'$INSTALL' failed"
    }
    if [[ -n $POLICY_RC_D ]]; then
        rm -f "$POLICY_RC_D"
        POLICY_RC_D=
    fi
    for t in "${TOOLS[@]}"; do need "${t%%:*}" "${t#*:}"; done
fi
python3 -c 'import asyncio, statistics' 2>/dev/null || die "python3 lacks asyncio/statistics"
nginx -V 2>&1 | grep -q -- --with-http_stub_status_module ||
    die "this nginx has no stub_status module (Debian's nginx package has it)"
nginx -V 2>&1 | grep -q -- --with-http_v2_module || die "this nginx has no HTTP/2 module"
[[ -r /proc/self/stat ]] || die "/proc is not mounted; this script reads CPU times from /proc"
taskset -c "$WRK_CPU" true 2>/dev/null || die "cannot pin to CPU $WRK_CPU (WRK_CPU); nproc is $(nproc)"
taskset -c "$PROXY_CPU" true 2>/dev/null || die "cannot pin to CPU $PROXY_CPU (PROXY_CPU); nproc is $(nproc)"
((WRK_CPU != PROXY_CPU)) || die "WRK_CPU and PROXY_CPU must differ"

CLK_TCK=$(getconf CLK_TCK)

# Open files: the idle-connection test holds IDLE_CONNECTIONS sockets in the client and in the
# proxy (inherited by the proxies started below, and nginx's worker_rlimit_nofile).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=65536
if ((NOFILE < IDLE_CONNECTIONS + 2048)); then
    die "the open-file limit is $NOFILE (hard limit $(ulimit -Hn)); IDLE_CONNECTIONS=$IDLE_CONNECTIONS" \
        "needs $((IDLE_CONNECTIONS + 2048)): raise it or lower IDLE_CONNECTIONS"
fi

# ---------------------------------------------------------------------------------------------
# 2. The gateway binary: built (release, locked) unless GATEWAY= names one; run from a copy.

mkdir -p "$TMP/bin"
GATEWAY_BIN=$TMP/bin/oauth-apps-gateway
if [[ -n ${GATEWAY:-} ]]; then
    [[ -x $GATEWAY ]] || die "GATEWAY=$GATEWAY is not an executable file"
    cp "$GATEWAY" "$GATEWAY_BIN"
    GATEWAY_FROM="GATEWAY=$GATEWAY"
else
    command -v cargo >/dev/null 2>&1 ||
        die "'cargo' not found: install the Rust toolchain (rustup), or pass GATEWAY=/path/to/binary"
    GATEWAY_FROM="commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [[ -n $(git -C "$ROOT" --no-optional-locks status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
        GATEWAY_FROM+=" dirty (uncommitted changes in src/)"
    fi
    echo "== building: cargo build --release --locked --bin oauth-apps-gateway (target dir $TARGET_DIR)"
    (cd "$ROOT" && timeout "$BUILD_TIMEOUT" cargo build --release --locked --bin oauth-apps-gateway) \
        >"$TMP/build.log" 2>&1 || {
        tail -n 30 "$TMP/build.log" >&2
        die "cargo build failed (log above)"
    }
    [[ -x $TARGET_DIR/release/oauth-apps-gateway ]] ||
        die "$TARGET_DIR/release/oauth-apps-gateway not found after the build"
    # A copy: a concurrent build in the same target dir must not swap the binary mid-run.
    cp "$TARGET_DIR/release/oauth-apps-gateway" "$GATEWAY_BIN"
fi
echo "== gateway: $GATEWAY_FROM"

# ---------------------------------------------------------------------------------------------
# 3. Test CA and a leaf for localhost / 127.0.0.1 (the stub's HTTPS listener).

TLS=$TMP/tls
mkdir -p "$TLS"
{
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout "$TLS/ca.key" -out "$TLS/ca.pem" -subj "/CN=side-by-side bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$TLS/leaf.key" -out "$TLS/leaf.csr" -subj "/CN=localhost"
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$TLS/leaf.ext"
    openssl x509 -req -in "$TLS/leaf.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -days 2 \
        -set_serial "0x$(openssl rand -hex 8)" -extfile "$TLS/leaf.ext" -out "$TLS/leaf.pem"
} >"$TLS/openssl.log" 2>&1 || {
    cat "$TLS/openssl.log" >&2
    die "openssl could not make the test CA"
}
openssl verify -CAfile "$TLS/ca.pem" "$TLS/leaf.pem" >/dev/null || die "test leaf does not verify"

# ---------------------------------------------------------------------------------------------
# 4. The upstream stub: nginx answering everything 200 with a 1,232-byte "Check a token" answer.

HASHED=$(printf '%s' "$TOKEN" | sha256sum | awk '{print $1}')
stub_body() { # note: the padded field
    printf '%s' '{"id":1,"url":"https://api.github.com/authorizations/1","scopes":["public_repo","user"],' \
        "\"token\":\"$TOKEN\",\"token_last_eight\":\"${TOKEN: -8}\",\"hashed_token\":\"$HASHED\"," \
        "\"app\":{\"client_id\":\"$CLIENT_ID\",\"name\":\"Side-by-side bench app\"," \
        '"url":"https://example.com/bench-app"},' "\"note\":\"$1\"," \
        '"note_url":"https://example.com/bench-app/notes","updated_at":"2011-09-06T20:39:23Z",' \
        '"created_at":"2011-09-06T17:26:27Z","fingerprint":"jklmnop12345678",' \
        '"expires_at":"2011-10-06T17:26:27Z","user":{"login":"octocat","id":1,' \
        '"node_id":"MDQ6VXNlcjE=","avatar_url":"https://github.com/images/error/octocat_happy.gif",' \
        '"gravatar_id":"","url":"https://api.github.com/users/octocat",' \
        '"html_url":"https://github.com/octocat","followers_url":"https://api.github.com/users/octocat/followers",' \
        '"following_url":"https://api.github.com/users/octocat/following{/other_user}",' \
        '"gists_url":"https://api.github.com/users/octocat/gists{/gist_id}",' \
        '"organizations_url":"https://api.github.com/users/octocat/orgs",' \
        '"repos_url":"https://api.github.com/users/octocat/repos",' \
        '"type":"User","site_admin":false}}'
}
BASE=$(stub_body "")
NOTE="padding to $BODY_BYTES bytes "
PAD=$((BODY_BYTES - ${#BASE} - ${#NOTE}))
((PAD >= 0)) || die "the stub body is already longer than $BODY_BYTES bytes without padding"
BODY=$(stub_body "$NOTE$(printf '%*s' "$PAD" '' | tr ' ' '.')")
((${#BODY} == BODY_BYTES)) || die "stub body is ${#BODY} bytes, not $BODY_BYTES"
[[ $BODY != *[\$\'\\]* ]] || die "the stub body must not hold \$, ' or \\ (nginx string)"
python3 -c 'import json, sys; json.loads(sys.argv[1])' "$BODY" || die "the stub body is not JSON"

STUB_PORT=$(free_port)
STUB_TLS_PORT=$(free_port)
STUB_STATUS_PORT=$(free_port)
STUB_DIR=$TMP/stub
mkdir -p "$STUB_DIR"
# nginx's workers run as "nobody" when started by root: let them reach the temp paths.
chmod 755 "$TMP" "$STUB_DIR" "$TLS"
chmod 644 "$TLS/ca.pem" "$TLS/leaf.pem"

# Common http{} lines for both nginx instances: no access log, temp paths in the prefix dir.
nginx_common() { # prefix dir
    cat <<EOF
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}

cat >"$STUB_DIR/nginx.conf" <<EOF
# Written by bench/side-by-side.sh: the upstream stub. Every request, any method and path: 200
# with the same $BODY_BYTES-byte JSON body. stub_status on its own port (accepts = connections).
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $STUB_DIR/nginx.pid;
error_log $STUB_DIR/error.log warn;
events {
    worker_connections 8192;
}
http {
$(nginx_common "$STUB_DIR")
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    types { }
    default_type application/json;
    server {
        listen 127.0.0.1:$STUB_PORT;
        listen 127.0.0.1:$STUB_TLS_PORT ssl http2;
        ssl_certificate $TLS/leaf.pem;
        ssl_certificate_key $TLS/leaf.key;
        location / {
            return 200 '$BODY';
        }
    }
    server {
        listen 127.0.0.1:$STUB_STATUS_PORT;
        location / {
            stub_status;
        }
    }
}
EOF

# Starts nginx pinned to PROXY_CPU, in the foreground of a background job; sets NGINX_STARTED.
start_nginx() { # name prefix-dir
    local name=$1 dir=$2
    nginx -t -q -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' ||
        die "nginx rejected $dir/nginx.conf ($name)"
    taskset -c "$PROXY_CPU" nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" \
        -g 'daemon off;' >"$dir/stdout.log" 2>&1 &
    NGINX_STARTED=$!
    PIDS+=("$NGINX_STARTED")
}

nginx_pids() { # master, then its workers
    echo "$1"
    ps -o pid= --ppid "$1" | tr -d ' '
}

start_nginx stub "$STUB_DIR"
STUB_PID=$NGINX_STARTED
wait_http "stub" "$STUB_PID" "http://127.0.0.1:$STUB_PORT/rate_limit"
mapfile -t STUB_PIDS < <(nginx_pids "$STUB_PID") # master and worker
wait_http "stub status" "$STUB_PID" "http://127.0.0.1:$STUB_STATUS_PORT/"
# --resolve: curl checks the certificate for "localhost" but never looks the name up.
TLS_CURL=(--cacert "$TLS/ca.pem" --resolve "localhost:$STUB_TLS_PORT:127.0.0.1")
wait_http "stub (TLS)" "$STUB_PID" "https://localhost:$STUB_TLS_PORT/rate_limit" "${TLS_CURL[@]}"
for v in 2 1.1; do
    got=$(curl -s -o /dev/null -w '%{http_version}' --max-time 5 "--http$v" "${TLS_CURL[@]}" \
        "https://localhost:$STUB_TLS_PORT/rate_limit" || true)
    [[ $got == "$v" ]] || die "the stub's TLS listener did not negotiate HTTP/$v by ALPN (got '$got')"
done

# "accepts requests": connections the stub has accepted and requests it has read so far, all
# listeners (this request and its connection included).
stub_counters() {
    curl -sf --max-time 5 "http://127.0.0.1:$STUB_STATUS_PORT/" | awk 'NR == 3 {print $1, $3}'
}

# ---------------------------------------------------------------------------------------------
# 5. nginx as the reference proxy: plain upstream and TLS upstream, keep-alive pools.

NGINX_PORT=$(free_port)
NGINX_TLS_PORT=$(free_port)
NGINX_DIR=$TMP/nginx
mkdir -p "$NGINX_DIR"
chmod 755 "$NGINX_DIR"
# Room for the idle-connection test (nginx preallocates ~0.5 KiB per worker_connections slot).
NGINX_WORKER_CONNECTIONS=$((IDLE_CONNECTIONS + 1024))
cat >"$NGINX_DIR/nginx.conf" <<EOF
# Written by bench/side-by-side.sh: nginx as a plain keep-alive reverse proxy to the stub.
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
events {
    worker_connections $NGINX_WORKER_CONNECTIONS;
}
http {
$(nginx_common "$NGINX_DIR")
    keepalive_requests 1000000;
    upstream stub {
        server 127.0.0.1:$STUB_PORT;
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    upstream stub_tls {
        server 127.0.0.1:$STUB_TLS_PORT;
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://stub;
        }
    }
    server {
        listen 127.0.0.1:$NGINX_TLS_PORT;
        location / {
            proxy_pass https://stub_tls;
            proxy_ssl_trusted_certificate $TLS/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF
start_nginx "nginx proxy" "$NGINX_DIR"
NGINX_PID=$NGINX_STARTED
wait_http "nginx" "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/rate_limit"
wait_http "nginx (TLS upstream)" "$NGINX_PID" "http://127.0.0.1:$NGINX_TLS_PORT/rate_limit"

# ---------------------------------------------------------------------------------------------
# 6. The gateway, twice: plain upstream, and TLS upstream (ca_file = the test CA).

GW_PORT=$(free_port)
GW_ADMIN=$(free_port)
GWT_PORT=$(free_port)
GWT_ADMIN=$(free_port)

# The idle-connection test opens IDLE_CONNECTIONS connections from 127.0.0.1 alone: the
# gateway's connection limits (server.max_connections 2048, max_connections_per_ip 256) would
# refuse most of them, so they are raised to fit (unless GATEWAY_SERVER_EXTRA sets them, or the
# binary predates them: an older gateway rejects unknown keys, so its --check-config decides).
GATEWAY_LIMIT_LINES=
if ((IDLE_CONNECTIONS > 0)) && [[ $GATEWAY_SERVER_EXTRA != *max_connections* ]]; then
    GATEWAY_LIMIT_LINES=$(printf 'max_connections = %d\nmax_connections_per_ip = %d' \
        $((IDLE_CONNECTIONS + 1024)) $((IDLE_CONNECTIONS + 1024)))
    printf '[server]\n%s\n[upstream]\nurl = "http://127.0.0.1:1"\n' "$GATEWAY_LIMIT_LINES" \
        >"$TMP/limits-probe.toml"
    if ! "$GATEWAY_BIN" --config "$TMP/limits-probe.toml" --check-config >/dev/null 2>&1; then
        GATEWAY_LIMIT_LINES=
    fi
fi

start_gateway() { # name listen-port admin-port upstream-url [upstream line...]
    local name=$1 port=$2 admin=$3 url=$4 conf=$TMP/$1.toml
    shift 4
    {
        echo "# Written by bench/side-by-side.sh. Everything not set here takes its default."
        echo "[server]"
        echo "listen = \"127.0.0.1:$port\""
        [[ -n $GATEWAY_SERVER_EXTRA ]] && printf '%s\n' "$GATEWAY_SERVER_EXTRA"
        [[ -n $GATEWAY_LIMIT_LINES ]] && printf '%s\n' "$GATEWAY_LIMIT_LINES"
        echo
        echo "[admin]"
        echo "listen = \"127.0.0.1:$admin\""
        echo
        echo "[upstream]"
        echo "url = \"$url\""
        (($#)) && printf '%s\n' "$@"
        [[ -n $GATEWAY_UPSTREAM_EXTRA ]] && printf '%s\n' "$GATEWAY_UPSTREAM_EXTRA"
        echo
        echo "[log]"
        echo 'level = "warn"'
    } >"$conf"
    "$GATEWAY_BIN" --config "$conf" --check-config >/dev/null || die "the gateway rejected $conf"
    # RUST_LOG would override log.level.
    env -u RUST_LOG "${GW_ENV[@]}" taskset -c "$PROXY_CPU" "$GATEWAY_BIN" --config "$conf" \
        >"$TMP/$name.log" 2>&1 &
    GATEWAY_STARTED=$!
    PIDS+=("$GATEWAY_STARTED")
    wait_http "$name" "$GATEWAY_STARTED" "http://127.0.0.1:$admin/readyz"
}

start_gateway gateway "$GW_PORT" "$GW_ADMIN" "http://127.0.0.1:$STUB_PORT"
GW_PID=$GATEWAY_STARTED
start_gateway gateway-tls "$GWT_PORT" "$GWT_ADMIN" "https://$TLS_UPSTREAM_HOST:$STUB_TLS_PORT" \
    "ca_file = \"$TLS/ca.pem\""
GWT_PID=$GATEWAY_STARTED

# Gateway answers with a status other than 2xx so far, from its own metrics: "non-2xx 499s".
# 499 (client_gone) is counted apart: wrk closes its connections with calls in flight when a run
# ends, and the gateway records each of those.
gateway_non_2xx() { # admin port
    curl -sf --max-time 5 "http://127.0.0.1:$1/metrics" |
        awk '/^oauth_apps_gateway_responses_total\{/ {
                 if ($0 ~ /status="499"/) c += $NF; else if ($0 !~ /status="2[0-9][0-9]"/) n += $NF
             } END {printf "%d %d\n", n, c}'
}
gateway_non_2xx "$GW_ADMIN" | grep -q . || die "cannot read the gateway's /metrics"

# ---------------------------------------------------------------------------------------------
# 7. Workloads: key|name|proxy|port|method|path|Basic auth|churn

BASIC="Basic $(printf '%s:%s' "$CLIENT_ID" "$CLIENT_SECRET" | base64 -w0)"
LEGACY_PATH=/applications/$CLIENT_ID/tokens/$TOKEN
NEW_PATH=/applications/$CLIENT_ID/token
NEW_BODY="{\"access_token\":\"$TOKEN\"}"
ALL_WORKLOADS=(
    "direct|direct (wrk to stub)|stub|$STUB_PORT|GET|/rate_limit|0|0"
    "nginx|nginx plain GET|nginx|$NGINX_PORT|GET|/rate_limit|0|0"
    "legacy|gateway legacy check|gateway|$GW_PORT|GET|$LEGACY_PATH|1|0"
    "pass|gateway pass-through GET|gateway|$GW_PORT|GET|/rate_limit|0|0"
    "new|gateway new-form check|gateway|$GW_PORT|POST|$NEW_PATH|1|0"
    "nginx-new|nginx new-form check|nginx|$NGINX_PORT|POST|$NEW_PATH|1|0"
    "churn-nginx|nginx plain GET, churn|nginx|$NGINX_PORT|GET|/rate_limit|0|1"
    "churn-legacy|gateway legacy check, churn|gateway|$GW_PORT|GET|$LEGACY_PATH|1|1"
    "tls-nginx|nginx plain GET, TLS upstream|nginx|$NGINX_TLS_PORT|GET|/rate_limit|0|0"
    "tls-legacy|gateway legacy check, TLS upstream|gateway-tls|$GWT_PORT|GET|$LEGACY_PATH|1|0"
    "tls-pass|gateway pass-through GET, TLS upstream|gateway-tls|$GWT_PORT|GET|/rate_limit|0|0"
)
SELECTED=()
for w in "${ALL_WORKLOADS[@]}"; do
    [[ " $WORKLOADS " == *" ${w%%|*} "* ]] && SELECTED+=("$w")
done
((${#SELECTED[@]})) || die "WORKLOADS selects nothing"

# One wrk script per workload. Without churn it only sets method, headers and body (wrk then
# sends one prepared request over and over). Churn: wrk's Lua hooks see no connection (request()
# and response() get none), so a counter per wrk thread adds "Connection: close" to every
# CHURN_EVERY-th request: with one thread, one connection closed (and reopened) per CHURN_EVERY
# requests, though not each connection after exactly CHURN_EVERY.
mkdir -p "$TMP/lua"
for w in "${SELECTED[@]}"; do
    IFS='|' read -r key _ _ _ method _ auth churn <<<"$w"
    {
        echo "-- Written by bench/side-by-side.sh for workload '$key'."
        echo "wrk.method = \"$method\""
        [[ $auth == 1 ]] && echo "wrk.headers[\"Authorization\"] = \"$BASIC\""
        if [[ $method == POST ]]; then
            echo "wrk.body = '$NEW_BODY'"
            echo 'wrk.headers["Content-Type"] = "application/json"'
        fi
        if [[ $churn == 1 ]]; then
            cat <<EOF
local n, keep, close = 0, nil, nil
-- Built in init(): wrk sets the Host header just before calling it.
function init(args)
    keep = wrk.format()
    local h = {}
    for k, v in pairs(wrk.headers) do h[k] = v end
    h["Connection"] = "close"
    close = wrk.format(nil, nil, h)
end
function request()
    n = n + 1
    if n % $CHURN_EVERY == 0 then return close end
    return keep
end
EOF
        fi
    } >"$TMP/lua/$key.lua"
done

# Preflight: every selected workload answers 200 with the stub's body, through its proxy.
for w in "${SELECTED[@]}"; do
    IFS='|' read -r key name _ port method path auth churn <<<"$w"
    args=(-s -o "$TMP/preflight.body" -w '%{http_code} %{size_download}' --max-time 5 -X "$method")
    [[ $auth == 1 ]] && args+=(-H "Authorization: $BASIC")
    [[ $method == POST ]] && args+=(-H 'Content-Type: application/json' --data "$NEW_BODY")
    [[ $churn == 1 ]] && args+=(-H 'Connection: close')
    got=$(curl "${args[@]}" "http://127.0.0.1:$port$path" || true)
    [[ $got == "200 $BODY_BYTES" ]] ||
        die "preflight: '$name' answered '$got' (status, bytes), expected '200 $BODY_BYTES'"
    cmp -s "$TMP/preflight.body" <(printf '%s' "$BODY") || die "preflight: '$name' changed the body"
done
echo "== preflight: ${#SELECTED[@]} workload(s) answer 200 with the $BODY_BYTES-byte body"

# ---------------------------------------------------------------------------------------------
# 8. Runs.

# Upstream connections are counted from this many seconds into each run to its end ("steady"): a
# proxy closes an upstream connection whose call was cut off when the warm-up's wrk stopped, and
# opens it again as the run starts; that is the warm-up's boundary, not keep-alive load.
STEADY_AFTER=$(awk -v d="$DURATION" 'BEGIN {print (d >= 4 ? 1 : d / 4)}')

# Resets a process's peak RSS (VmHWM) to its current RSS.
PEAK_RESET=1
reset_peak() {
    local pid
    for pid in "$@"; do
        { echo 5 >"/proc/$pid/clear_refs"; } 2>/dev/null || PEAK_RESET=0
    done
}
mem_sum_kib() { # field pid...
    local f=$1 pid sum=0
    shift
    for pid in "$@"; do sum=$((sum + $(mem_kib "$pid" "$f"))); done
    echo "$sum"
}

# Parses a wrk output: requests req/s p50-ms p99-ms socket-errors non-2xx.
parse_wrk() {
    awk 'function ms(s) {
             if (s ~ /us$/) return s / 1000; if (s ~ /ms$/) return s + 0
             if (s ~ /m$/) return s * 60000; if (s ~ /s$/) return s * 1000; return s + 0
         }
         / requests in / {req = $1}
         /^Requests\/sec:/ {rps = $2}
         $1 == "50%" {p50 = ms($2)}
         $1 == "99%" {p99 = ms($2)}
         /Socket errors:/ {for (i = 3; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) sock += $i + 0}
         /Non-2xx or 3xx responses:/ {non = $NF}
         END {printf "%d %s %.3f %.3f %d %d\n", req, (rps == "" ? 0 : rps), p50, p99, sock, non}' "$1"
}

# Runs wrk once (pinned to WRK_CPU, bounded by timeout); leaves its output in $TMP/wrk.out and its
# own CPU seconds (user+sys) in WRK_CPU_S. With steady-after, reads the stub's counters that many
# seconds into the run, into $TMP/steady.
run_wrk() { # key port path seconds [steady-after]
    local args=(-t"$THREADS" -c"$CONNECTIONS" -d"${4}s" --timeout 5s --latency -s "$TMP/lua/$1.lua")
    (
        TIMEFORMAT='%3U %3S'
        time taskset -c "$WRK_CPU" timeout $(($4 + 30)) wrk "${args[@]}" "http://127.0.0.1:$2$3" \
            >"$TMP/wrk.out" 2>&1
    ) 2>"$TMP/wrk.time" &
    WRK_PID=$!
    if [[ -n ${5:-} ]]; then
        sleep "$5"
        stub_counters >"$TMP/steady" || die "cannot read the stub's stub_status"
    fi
    wait "$WRK_PID" || {
        cat "$TMP/wrk.out" >&2
        die "wrk failed or timed out on '$1'"
    }
    WRK_PID=
    WRK_CPU_S=$(tail -n 1 "$TMP/wrk.time" | awk '{print $1 + $2}')
}

RAW=$TMP/raw.tsv
RAW_COLUMNS=(round key name proxy rps requests p50_ms p99_ms proxy_cpu_us proxy_user_us proxy_sys_us
    stub_cpu_us wrk_cpu_us upstream_conns upstream_per_1000 peak_rss_mib sock_errors non2xx gw_non2xx
    gw_499 errors busy_pct other_pct steady_conns steady_upstream_requests)
(IFS=$'\t' && echo "${RAW_COLUMNS[*]}") >"$RAW"

# One measured run of a workload: warm-up, then the run, with every counter read around it.
measure() { # round workload-spec
    local round=$1 key name proxy port method path auth churn
    IFS='|' read -r key name proxy port method path auth churn <<<"$2"
    local pids=() admin=
    case $proxy in
    nginx) mapfile -t pids < <(nginx_pids "$NGINX_PID") ;;
    gateway) pids=("$GW_PID") admin=$GW_ADMIN ;;
    gateway-tls) pids=("$GWT_PID") admin=$GWT_ADMIN ;;
    stub) ;;
    esac
    local gw0="0 0" gw1="0 0"
    [[ -n $admin ]] && gw0=$(gateway_non_2xx "$admin")
    [[ $gw0 =~ ^[0-9]+\ [0-9]+$ ]] || die "cannot read the gateway's /metrics (admin port $admin)"

    local w_sock=0 w_non=0
    if ((WARMUP > 0)); then
        run_wrk "$key" "$port" "$path" "$WARMUP"
        read -r _ _ _ _ w_sock w_non < <(parse_wrk "$TMP/wrk.out")
    fi
    ((${#pids[@]})) && reset_peak "${pids[@]}"
    local a0 q0 a1 q1 s0 sq0 pu0=0 ps0=0 pu1=0 ps1=0 su0 ss0 su1 ss1 mb0 mt0 mb1 mt1
    read -r a0 q0 < <(stub_counters)
    [[ $q0 =~ ^[0-9]+$ ]] || die "cannot read the stub's stub_status"
    ((${#pids[@]})) && read -r pu0 ps0 < <(cpu_ticks "${pids[@]}")
    read -r su0 ss0 < <(cpu_ticks "${STUB_PIDS[@]}")
    read -r mb0 mt0 < <(cpu_jiffies "$WRK_CPU" "$PROXY_CPU")

    run_wrk "$key" "$port" "$path" "$DURATION" "$STEADY_AFTER"

    ((${#pids[@]})) && read -r pu1 ps1 < <(cpu_ticks "${pids[@]}")
    read -r su1 ss1 < <(cpu_ticks "${STUB_PIDS[@]}")
    read -r mb1 mt1 < <(cpu_jiffies "$WRK_CPU" "$PROXY_CPU")
    read -r a1 q1 < <(stub_counters)
    [[ $q1 =~ ^[0-9]+$ ]] || die "cannot read the stub's stub_status"
    read -r s0 sq0 <"$TMP/steady"
    [[ $sq0 =~ ^[0-9]+$ ]] || die "cannot read the stub's stub_status"
    local hwm=
    ((${#pids[@]})) && hwm=$(mem_sum_kib VmHWM "${pids[@]}")
    [[ -n $admin ]] && gw1=$(gateway_non_2xx "$admin")
    [[ $gw1 =~ ^[0-9]+\ [0-9]+$ ]] || die "cannot read the gateway's /metrics (admin port $admin)"

    local req rps p50 p99 sock non
    read -r req rps p50 p99 sock non < <(parse_wrk "$TMP/wrk.out")
    ((req > 0)) || {
        cat "$TMP/wrk.out" >&2
        die "'$name' (round $round): wrk completed no request"
    }
    local g0n g0c g1n g1c
    read -r g0n g0c <<<"$gw0"
    read -r g1n g1c <<<"$gw1"
    awk -v OFS='\t' -v round="$round" -v key="$key" -v name="$name" -v proxy="$proxy" \
        -v rps="$rps" -v req="$req" -v p50="$p50" -v p99="$p99" -v hz="$CLK_TCK" \
        -v has_proxy="${#pids[@]}" -v pu=$((pu1 - pu0)) -v ps=$((ps1 - ps0)) \
        -v st=$((su1 + ss1 - su0 - ss0)) -v wrk="$WRK_CPU_S" -v conns=$((a1 - a0 - 2)) \
        -v sconns=$((a1 - s0 - 1)) -v sreq=$((q1 - sq0 - 1)) \
        -v hwm="$hwm" -v sock=$((sock + w_sock)) -v non=$((non + w_non)) \
        -v gwn=$((g1n - g0n)) -v gwc=$((g1c - g0c)) -v mb=$((mb1 - mb0)) -v mt=$((mt1 - mt0)) 'BEGIN {
            us = 1e6 / hz / req
            other = mb - pu - ps - st - wrk * hz
            if (other < 0) other = 0
            errors = sock + (gwn > non ? gwn : non)
            print round, key, name, proxy, sprintf("%.0f", rps), req, p50, p99,
                (has_proxy ? sprintf("%.2f", (pu + ps) * us) : "-"),
                (has_proxy ? sprintf("%.2f", pu * us) : "-"),
                (has_proxy ? sprintf("%.2f", ps * us) : "-"),
                sprintf("%.2f", st * us), sprintf("%.2f", wrk * 1e6 / req), conns,
                sprintf("%.3f", sreq > 0 ? sconns * 1000 / sreq : 0),
                (hwm == "" ? "-" : sprintf("%.1f", hwm / 1024)), sock, non, gwn, gwc, errors,
                sprintf("%.0f", mt > 0 ? 100 * mb / mt : 0), sprintf("%.1f", mt > 0 ? 100 * other / mt : 0),
                sconns, sreq
        }' >>"$RAW"
    tail -n 1 "$RAW" | awk -F'\t' -v d="$DISTURBED" '{
        printf "   round %s  %-40s %7s req/s  p99 %6.2f ms  proxy %6s us/req  upstream %6s/1k  %5s MiB  errors %s%s\n",
            $1, $3, $5, $8, $9, $15, $16, $21, ($23 > d ? "  ! other " $23 "%" : "")
    }'
}

# The machine should be otherwise idle: CPU per request depends on how busy it is.
read -r b0 t0 < <(cpu_jiffies "$WRK_CPU" "$PROXY_CPU")
sleep 1
read -r b1 t1 < <(cpu_jiffies "$WRK_CPU" "$PROXY_CPU")
IDLE_BUSY=$(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN {printf "%.0f", (t > 0 ? 100 * b / t : 0)}')
if ((IDLE_BUSY > 10)); then
    echo "warning: CPUs $WRK_CPU,$PROXY_CPU are already ${IDLE_BUSY}% busy before the benchmark" \
        "starts; results will be disturbed (see 'other %')" >&2
fi

GW_THREADS=$(awk '$1 == "Threads:" {print $2}' "/proc/$GW_PID/status")
echo "== stub 127.0.0.1:$STUB_PORT (TLS $STUB_TLS_PORT, status $STUB_STATUS_PORT); nginx" \
    "127.0.0.1:$NGINX_PORT (TLS upstream $NGINX_TLS_PORT); gateway 127.0.0.1:$GW_PORT (TLS upstream" \
    "$GWT_PORT); gateway threads: $GW_THREADS${GATEWAY_ENV:+ ($GATEWAY_ENV)}"
echo "== wrk -t$THREADS -c$CONNECTIONS --latency, ${WARMUP}s warm-up + ${DURATION}s measured," \
    "$ROUNDS round(s) of ${#SELECTED[@]} workload(s), interleaved; wrk on CPU $WRK_CPU," \
    "proxies and stub on CPU $PROXY_CPU"
STARTED=$SECONDS
for ((round = 1; round <= ROUNDS; round++)); do
    for w in "${SELECTED[@]}"; do measure "$round" "$w"; done
done
echo "== load runs done in $((SECONDS - STARTED)) s"

# ---------------------------------------------------------------------------------------------
# 9. Memory with IDLE_CONNECTIONS idle keep-alive client connections (gateway, then nginx).

cat >"$TMP/idle.py" <<'PY'
"""Opens N keep-alive connections to 127.0.0.1:PORT, sends GET /rate_limit on each and reads the
whole answer, then holds them all idle. Writes READY (established, failed, seconds) once every
connection is answered or failed; when RELEASE appears, counts the connections the server has not
closed, closes them all and writes OUT. Gives up after --give-up seconds. asyncio protocols, not
streams, so that the proxy rather than this client sets the pace (the gateway closes a keep-alive
connection left idle for server.header_read_timeout, 10 s by default)."""
import argparse, asyncio, collections, os, sys, time

p = argparse.ArgumentParser()
for a in ("--port", "--n", "--concurrency", "--give-up"):
    p.add_argument(a, type=int, required=True)
for a in ("--ready", "--release", "--out"):
    p.add_argument(a, required=True)
a = p.parse_args()
REQ = b"GET /rate_limit HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: side-by-side-idle\r\n\r\n" % a.port


def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


class Conn(asyncio.Protocol):
    def __init__(self, answered):
        self.answered, self.buf, self.open, self.transport = answered, b"", True, None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(REQ)

    def data_received(self, data):
        if self.answered.done():
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.buf[:end].split(b"\r\n")
        fields = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            fields[k.strip().lower()] = v.strip().lower()
        status = lines[0].split(b" ")[1]
        if fields.get(b"transfer-encoding") == b"chunked":
            complete = self.buf.endswith(b"\r\n0\r\n\r\n")
        else:
            complete = len(self.buf) >= end + 4 + int(fields.get(b"content-length", b"0"))
        if not complete:
            return
        if status != b"200":
            self.answered.set_exception(RuntimeError("status " + status.decode()))
        elif fields.get(b"connection") == b"close":
            self.answered.set_exception(RuntimeError("answered with connection: close"))
        else:
            self.answered.set_result(True)
        self.buf = b""

    def eof_received(self):
        self.open = False
        if not self.answered.done():
            self.answered.set_exception(RuntimeError("closed before the answer"))

    def connection_lost(self, exc):
        self.open = False
        if not self.answered.done():
            self.answered.set_exception(exc or RuntimeError("closed before the answer"))


async def one(loop, sem):
    async with sem:
        answered = loop.create_future()
        transport, conn = await loop.create_connection(lambda: Conn(answered), "127.0.0.1", a.port)
        try:
            await answered
        except BaseException:
            transport.close()
            raise
        return conn


async def main():
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    sem = asyncio.Semaphore(a.concurrency)
    res = await asyncio.gather(*(one(loop, sem) for _ in range(a.n)), return_exceptions=True)
    conns = [x for x in res if not isinstance(x, BaseException)]
    why = collections.Counter("%s: %s" % (type(x).__name__, x) for x in res if isinstance(x, BaseException))
    took = time.monotonic() - t0
    write(a.ready, "%d %d %.2f\n" % (len(conns), a.n - len(conns), took))
    if why:
        print("idle client: failures: %s" % dict(why.most_common(5)), file=sys.stderr)
    while not os.path.exists(a.release):
        await asyncio.sleep(0.02)
    held = sum(1 for c in conns if c.open)
    for c in conns:
        c.transport.close()
    await asyncio.sleep(0.5)
    write(a.out, "%d %d %d %.2f\n" % (held, len(conns), a.n - len(conns), took))


try:
    asyncio.run(asyncio.wait_for(main(), a.give_up))
except asyncio.TimeoutError:
    sys.exit("idle client: gave up after %d s" % a.give_up)
PY

IDLE=$TMP/idle.tsv
IDLE_COLUMNS=(proxy requested established failed held_at_read server_established seconds
    rss_before_mib rss_held_mib hwm_held_mib rss_after_mib)
(IFS=$'\t' && echo "${IDLE_COLUMNS[*]}") >"$IDLE"

idle_test() { # name port pid...
    local name=$1 port=$2
    shift 2
    local pids=("$@") ready=$TMP/idle-$name.ready release=$TMP/idle-$name.release
    local out=$TMP/idle-$name.out i
    echo "== idle connections: $IDLE_CONNECTIONS to $name (127.0.0.1:$port)"
    reset_peak "${pids[@]}"
    local before held hwm after est=0 fail=0 secs=0 kept=0 srv=0
    before=$(mem_sum_kib VmRSS "${pids[@]}")
    taskset -c "$WRK_CPU" timeout 90 python3 "$TMP/idle.py" --port "$port" --n "$IDLE_CONNECTIONS" \
        --concurrency "$IDLE_CONCURRENCY" --give-up 60 --ready "$ready" --release "$release" \
        --out "$out" 2>"$TMP/idle-$name.log" &
    local client=$!
    PIDS+=("$client")
    for _ in $(seq 700); do
        [[ -e $ready ]] && break
        kill -0 "$client" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -e $ready ]]; then
        held=$(mem_sum_kib VmRSS "${pids[@]}")
        hwm=$(mem_sum_kib VmHWM "${pids[@]}")
        srv=$(ss -Htn state established "( sport = :$port )" | wc -l)
        read -r est fail secs <"$ready"
    else
        held=$(mem_sum_kib VmRSS "${pids[@]}")
        hwm=$(mem_sum_kib VmHWM "${pids[@]}")
        echo "warning: the idle client did not get its connections answered (see below)" >&2
    fi
    touch "$release"
    wait "$client" 2>/dev/null || true
    for i in "${!PIDS[@]}"; do [[ ${PIDS[i]} == "$client" ]] && unset 'PIDS[i]'; done
    PIDS=("${PIDS[@]}")
    [[ -s $TMP/idle-$name.log ]] && sed 's/^/   /' "$TMP/idle-$name.log" >&2
    [[ -e $out ]] && read -r kept est fail secs <"$out"
    sleep 2
    after=$(mem_sum_kib VmRSS "${pids[@]}")
    awk -v OFS='\t' -v n="$name" -v req="$IDLE_CONNECTIONS" -v est="$est" -v fail="$fail" \
        -v kept="$kept" -v srv="$srv" -v secs="$secs" -v b="$before" -v h="$held" -v m="$hwm" \
        -v a="$after" 'BEGIN {
            print n, req, est, fail, kept, srv, secs, sprintf("%.1f", b / 1024),
                sprintf("%.1f", h / 1024), sprintf("%.1f", m / 1024), sprintf("%.1f", a / 1024)
        }' >>"$IDLE"
    tail -n 1 "$IDLE" | awk -F'\t' '{printf "   %s established in %s s, %s still open when read" \
        " (server side: %s); RSS %s MiB before, %s held (peak %s), %s 2 s after closing\n",
        $3, $7, $5, $6, $8, $9, $10, $11}'
}

if ((IDLE_CONNECTIONS > 0)); then
    idle_test gateway "$GW_PORT" "$GW_PID"
    mapfile -t NGINX_PIDS < <(nginx_pids "$NGINX_PID")
    idle_test nginx "$NGINX_PORT" "${NGINX_PIDS[@]}"
fi

# ---------------------------------------------------------------------------------------------
# 10. Tables, verdicts, RESULTS.md (Python: medians and ratios per round).

META=$TMP/meta.tsv
{
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'machine\t%s CPUs (%s), kernel %s, %s MiB memory\n' "$(nproc)" \
        "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" "$(uname -r)" \
        "$(awk '/^MemTotal:/ {printf "%d", $2 / 1024}' /proc/meminfo)"
    printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's|^nginx version: nginx/||')"
    printf 'wrk\t%s\n' "$( (wrk -v 2>&1 || true) | awk 'NR == 1 {print $2}')"
    printf 'rustc\t%s\n' "$( (cd "$ROOT" && rustc -V 2>/dev/null) || echo '?')"
    printf 'openssl\t%s\n' "$(openssl version | awk '{print $1, $2}')"
    printf 'python\t%s\n' "$(python3 -V 2>&1)"
    printf 'gateway\t%s\n' "$GATEWAY_FROM"
    printf 'gateway_threads\t%s\n' "$GW_THREADS"
    printf 'gateway_env\t%s\n' "${GATEWAY_ENV:-(none)}"
    printf 'gateway_extra\t%s / %s\n' "$(printf '%s' "${GATEWAY_SERVER_EXTRA:-}${GATEWAY_LIMIT_LINES:+${GATEWAY_SERVER_EXTRA:+;}$GATEWAY_LIMIT_LINES}" | paste -sd';' - | sed 's/^$/(none)/')" \
        "$(printf '%s' "${GATEWAY_UPSTREAM_EXTRA:-(none)}" | paste -sd';' -)"
    printf 'settings\trounds: %s (interleaved); %s s measured after %s s warm-up; %s; %s; %s\n' \
        "$ROUNDS" "$DURATION" "$WARMUP" "wrk -t$THREADS -c$CONNECTIONS --latency pinned to CPU $WRK_CPU" \
        "proxies and stub pinned to CPU $PROXY_CPU (taskset)" \
        "churn: Connection: close on every ${CHURN_EVERY}th request of a wrk thread"
    printf 'tls_host\t%s\n' "$TLS_UPSTREAM_HOST"
    printf 'idle_connections\t%s\n' "$IDLE_CONNECTIONS"
    printf 'churn_every\t%s\n' "$CHURN_EVERY"
    printf 'peak_reset\t%s\n' "$PEAK_RESET"
    printf 'steady_after\t%s\n' "$STEADY_AFTER"
    printf 'disturbed\t%s\n' "$DISTURBED"
} >"$META"

cat >"$TMP/report.py" <<'PY'
"""Medians over rounds, ratios to "nginx plain GET" from the same round, verdicts, RESULTS.md."""
import csv, statistics, sys

raw_path, idle_path, meta_path, results_path, missed_path = sys.argv[1:6]
meta = dict(line.rstrip("\n").split("\t", 1) for line in open(meta_path))
rows = list(csv.DictReader(open(raw_path), delimiter="\t"))
idle = list(csv.DictReader(open(idle_path), delimiter="\t"))
DIST = float(meta["disturbed"])
for r in rows:
    r["disturbed"] = float(r["other_pct"]) > DIST

order, by_key = [], {}
for r in rows:
    if r["key"] not in by_key:
        order.append(r["key"])
        by_key[r["key"]] = []
    by_key[r["key"]].append(r)
name = {k: by_key[k][0]["name"] for k in order}


def num(v):
    return None if v in ("-", "", None) else float(v)


def median(values):
    """Median over the undisturbed values when there is one, else over all: (value, n used)."""
    clean = [v for v, d in values if v is not None and not d]
    use = clean or [v for v, d in values if v is not None]
    return (statistics.median(use), len(use)) if use else (None, 0)


def med(key, col):
    return median([(num(r[col]), r["disturbed"]) for r in by_key.get(key, [])])[0]


def ratio(key, col, ref="nginx"):
    """Median of per-round ratios key/ref (a round counts as disturbed if either run was)."""
    refs = {r["round"]: r for r in by_key.get(ref, [])}
    vals = []
    for r in by_key.get(key, []):
        q = refs.get(r["round"])
        if q and num(r[col]) is not None and num(q[col]):
            vals.append((num(r[col]) / num(q[col]), r["disturbed"] or q["disturbed"]))
    return median(vals)[0]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


summary = []
for k in order:
    rs = by_key[k]
    summary.append({
        "workload": name[k], "req/s": fmt(med(k, "rps"), ".0f"), "p50 ms": fmt(med(k, "p50_ms"), ".2f"),
        "p99 ms": fmt(med(k, "p99_ms"), ".2f"), "CPU µs/req": fmt(med(k, "proxy_cpu_us"), ".1f"),
        "CPU × nginx": fmt(ratio(k, "proxy_cpu_us"), ".2f"), "req/s × nginx": fmt(ratio(k, "rps"), ".2f"),
        "upstream conns/1k req": fmt(med(k, "upstream_per_1000"), ".2f"),
        "peak RSS MiB": fmt(med(k, "peak_rss_mib"), ".1f"),
        "errors": str(sum(int(r["errors"]) for r in rs)),
        "disturbed": "%d/%d" % (sum(r["disturbed"] for r in rs), len(rs)),
    })


def table_text(dicts):
    cols = list(dicts[0])
    w = {c: max(len(c), *(len(d[c]) for d in dicts)) for c in cols}
    out = ["  ".join(c.ljust(w[c]) if i == 0 else c.rjust(w[c]) for i, c in enumerate(cols))]
    for d in dicts:
        out.append("  ".join(d[c].ljust(w[c]) if i == 0 else d[c].rjust(w[c]) for i, c in enumerate(cols)))
    return "\n".join(out)


def table_md(dicts):
    cols = list(dicts[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(d[c] for c in cols) + " |" for d in dicts]
    return "\n".join(out)


RAW_COLS = [("round", "round"), ("workload", "name"), ("req/s", "rps"), ("p50 ms", "p50_ms"),
            ("p99 ms", "p99_ms"), ("proxy CPU µs/req", "proxy_cpu_us"), ("user", "proxy_user_us"),
            ("sys", "proxy_sys_us"), ("stub CPU µs/req", "stub_cpu_us"), ("wrk CPU µs/req", "wrk_cpu_us"),
            ("upstream conns (run)", "upstream_conns"), ("steady: conns", "steady_conns"),
            ("steady: upstream req", "steady_upstream_requests"), ("steady: per 1k", "upstream_per_1000"),
            ("peak RSS MiB", "peak_rss_mib"), ("socket errors", "sock_errors"), ("wrk non-2xx", "non2xx"),
            ("gateway non-2xx", "gw_non2xx"), ("gateway 499", "gw_499"), ("busy %", "busy_pct"),
            ("other %", "other_pct")]
raw_table = [{h: (r[c] + (" !" if c == "other_pct" and r["disturbed"] else "")) for h, c in RAW_COLS}
             for r in rows]

# Idle connections.
idle_lines = []
idle_gw = None
for r in idle:
    line = ("%s: %s of %s connections established and answered in %s s (%s failed), %s still open "
            "when memory was read (server side established: %s); RSS %s MiB before, %s MiB while "
            "held (peak VmHWM %s MiB), %s MiB 2 s after the client closed them"
            % (r["proxy"], r["established"], r["requested"], r["seconds"], r["failed"],
               r["held_at_read"], r["server_established"], r["rss_before_mib"], r["rss_held_mib"],
               r["hwm_held_mib"], r["rss_after_mib"]))
    idle_lines.append(line)
    if r["proxy"] == "gateway":
        idle_gw = r

# Verdicts: (text, status) with status MET / NOT MET / not measured.
verdicts = []


def verdict(text, ok, detail):
    status = "not measured" if ok is None else ("MET" if ok else "NOT MET")
    verdicts.append((status, text, detail or "a workload it needs was not selected (WORKLOADS)"))


have = lambda *ks: all(k in by_key for k in ks)
r = ratio("legacy", "proxy_cpu_us") if have("legacy", "nginx") else None
verdict("CPU per legacy (rewritten) call <= 1.0x nginx plain GET", None if r is None else r <= 1.0,
        "" if r is None else "median of per-round ratios %.2fx (gateway %.1f µs/req, nginx %.1f µs/req)"
        % (r, med("legacy", "proxy_cpu_us"), med("nginx", "proxy_cpu_us")))
r = ratio("pass", "proxy_cpu_us") if have("pass", "nginx") else None
verdict("CPU per pass-through call <= 0.9x nginx plain GET", None if r is None else r <= 0.9,
        "" if r is None else "%.2fx (gateway %.1f µs/req, nginx %.1f µs/req)"
        % (r, med("pass", "proxy_cpu_us"), med("nginx", "proxy_cpu_us")))
ks = [k for k in ("legacy", "pass") if k in by_key]
vals = {k: med(k, "upstream_per_1000") for k in ks}
verdict("upstream connections opened <= 1 per 1,000 requests (gateway legacy, pass-through)",
        None if not ks else all(v <= 1 for v in vals.values()),
        "; ".join("%s %.2f (per round: %s)" % (name[k], vals[k], ", ".join(x["upstream_per_1000"] for x in by_key[k]))
                  for k in ks) + "".join("; %s %.2f (reported)" % (name[k], med(k, "upstream_per_1000"))
                                          for k in ("churn-nginx", "churn-legacy") if k in by_key))
r = ratio("legacy", "rps") if have("legacy", "nginx") else None
verdict("legacy req/s >= 1.0x nginx plain GET", None if r is None else r >= 1.0,
        "" if r is None else "%.2fx (%.0f vs %.0f req/s)" % (r, med("legacy", "rps"), med("nginx", "rps")))
ok = None if not have("legacy", "nginx") else med("legacy", "p99_ms") <= med("nginx", "p99_ms")
verdict("legacy p99 <= nginx plain GET p99", ok,
        "" if ok is None else "%.2f ms vs %.2f ms" % (med("legacy", "p99_ms"), med("nginx", "p99_ms")))
gw_runs = [x for x in rows if x["proxy"] == "gateway"]
peak = max((float(x["peak_rss_mib"]) for x in gw_runs), default=None)
tls_peak = max((float(x["peak_rss_mib"]) for x in rows if x["proxy"] == "gateway-tls"), default=None)
verdict("gateway peak RSS <= 24 MiB under load", None if peak is None else peak <= 24,
        "" if peak is None else "highest VmHWM over the gateway's runs %.1f MiB%s" % (
            peak, "" if tls_peak is None else " (TLS-upstream instance, reported: %.1f MiB)" % tls_peak)
        + ("" if meta["peak_reset"] == "1" else "; peak could not be reset per run (clear_refs)"))
n = int(meta["idle_connections"])
if idle_gw is None:
    verdict("gateway peak RSS <= 64 MiB with 10,000 idle connections", None, "skipped (IDLE_CONNECTIONS=0)")
else:
    hwm, held = float(idle_gw["hwm_held_mib"]), int(idle_gw["held_at_read"])
    verdict("gateway peak RSS <= 64 MiB with 10,000 idle connections",
            hwm <= 64 and held == n and n >= 10000,
            "peak %.1f MiB with %d of %d connections held%s" % (
                hwm, held, n, "" if n >= 10000 else " (IDLE_CONNECTIONS below 10,000: not the target's load)"))
errs = sum(int(x["errors"]) for x in rows)
idle_fail = sum(int(x["failed"]) for x in idle)
verdict("no errors in any run", errs == 0 and idle_fail == 0,
        "%d error(s) over %d runs%s" % (errs, len(rows), "; idle test: %d connection(s) failed" % idle_fail if idle else ""))
r = ratio("churn-legacy", "proxy_cpu_us", ref="churn-nginx") if have("churn-legacy", "churn-nginx") else None
verdict("churn: legacy CPU <= 1.2x nginx churn CPU", None if r is None else r <= 1.2,
        "" if r is None else "%.2fx (gateway %.1f µs/req, nginx %.1f µs/req)"
        % (r, med("churn-legacy", "proxy_cpu_us"), med("churn-nginx", "proxy_cpu_us")))
missed = sum(1 for s, _, _ in verdicts if s == "NOT MET")
open(missed_path, "w").write("%d\n" % missed)

notes = [
    "CPU = utime+stime from /proc/<pid>/stat over the run / requests (gateway: its process; nginx: "
    "master + worker). Ratios: median over rounds of (workload / nginx plain GET of the same round).",
    "upstream conns/1k req = connections the stub accepted per 1,000 requests it served (stub_status "
    "accepts and requests), counted from %s s into the run to its end: a proxy reopens the upstream "
    "connections whose calls were cut off when the warm-up's wrk stopped, at the start of the run. "
    "Every run's whole count is under 'upstream conns (run)' (direct: wrk's own connections, one per "
    "-c plus the one wrk opens to check the address)." % meta["steady_after"],
    "peak RSS = VmHWM after the run, reset before it (echo 5 > /proc/<pid>/clear_refs); nginx: master + worker.",
    "errors = wrk socket errors + non-2xx (warm-up included; gateway: the larger of wrk's count and its "
    "own responses_total non-2xx, 499 left out: wrk drops calls in flight when it stops).",
    "churn: wrk's Lua hooks see no connection, so every %sth request of the wrk thread carries "
    "Connection: close: one connection closed per %s requests on average, not each after exactly %s."
    % (meta["churn_every"], meta["churn_every"], meta["churn_every"]),
    "disturbed = runs where more than %s%% of the two pinned CPUs went to something other than wrk, "
    "the proxies and the stub (other %%); medians leave them out when an undisturbed run exists."
    % meta["disturbed"],
]

n_dist = sum(r["disturbed"] for r in rows)
warn = (["warning: %d of %d runs were disturbed (other %% above %s): rerun on an idle machine"
         % (n_dist, len(rows), meta["disturbed"])] if n_dist else [])
text = [table_text(summary)] + warn + [""]
text += ["memory with idle keep-alive connections:"] + ["  " + l for l in idle_lines or ["skipped"]]
text += ["", "targets (issue 9):"] + ["  %-12s %s: %s" % (s, t, d) for s, t, d in verdicts]
text += [""] + ["note: " + n_ for n_ in notes]
print("\n".join(text))

if results_path:
    md = ["# Side-by-side benchmark results", "",
          "Written by `bench/side-by-side.sh` (see bench/README.md); rerun it to refresh.", "",
          "- date: " + meta["date"], "- machine: " + meta["machine"],
          "- versions: nginx %s, wrk %s, %s, %s, %s" % (meta["nginx"], meta["wrk"], meta["rustc"],
                                                       meta["openssl"], meta["python"]),
          "- gateway: %s; threads: %s; environment: %s; extra config (server / upstream): %s"
          % (meta["gateway"], meta["gateway_threads"], meta["gateway_env"], meta["gateway_extra"]),
          "- settings: " + meta["settings"], "",
          "## Medians over the rounds", "", table_md(summary), ""] + ["**%s**" % w_ for w_ in warn] + [
          "" if warn else None,
          "## Idle keep-alive connections", ""] + ["- " + l for l in idle_lines or ["skipped"]] + [
          "", "## Targets (issue 9)", ""] + ["- **%s** %s: %s" % (s, t, d) for s, t, d in verdicts] + [
          "", "## Every run", "", table_md(raw_table), "", "## Notes", ""] + ["- " + n_ for n_ in notes]
    with open(results_path, "w") as f:
        f.write("\n".join(x for x in md if x is not None) + "\n")
PY

echo
echo "== results (medians over $ROUNDS round(s))"
python3 "$TMP/report.py" "$RAW" "$IDLE" "$META" "$RESULTS" "$TMP/missed" || die "report failed"
if [[ -n $RESULTS ]]; then echo "== written: $RESULTS"; fi
echo
echo "every run:"
awk -F'\t' -v d="$DISTURBED" 'NR == 1 {next} {
    printf "  %s  %-40s %7s req/s  p50 %6.2f  p99 %6.2f ms  proxy %6s us/req (%s/%s)  stub %5s  upstream conns %5s (steady %6s/1k)  %5s MiB  err %s  other %s%%%s\n",
        $1, $3, $5, $7, $8, $9, $10, $11, $12, $14, $15, $16, $21, $23, ($23 > d ? " !" : "")
}' "$RAW"
MISSED=$(cat "$TMP/missed")
if [[ $STRICT == 1 ]] && ((MISSED > 0)); then
    echo "== $MISSED target(s) missed (STRICT=1)"
    exit 3
fi
