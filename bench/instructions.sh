#!/usr/bin/env bash
# Instructions the gateway executes per proxied call, counted by valgrind's callgrind: the one
# figure on this shared 2-core VM that repeats from run to run (wall-clock CPU per request in
# side-by-side.sh moved by up to 2x between runs of the same binary on 2026-12-02, nginx's own
# included). User-space instructions only: kernel work (syscalls, page faults) is not in it.
#
#   bash bench/instructions.sh                       # the release build in target/
#   GATEWAY=/path/to/oauth-apps-gateway bash bench/instructions.sh
#   CALLS=2000 WORKLOADS="legacy pass" GATEWAY_ENV="LD_PRELOAD=..." bash bench/instructions.sh
#
# For each workload it runs the gateway (one worker thread, [failed_checks] off, log level warn)
# under callgrind twice against a small Python upstream answering a fixed 1.2 KB JSON: once with
# a 200-call warm-up only, once with the warm-up and CALLS more calls on one keep-alive
# connection; the difference divided by CALLS is the figure. 127.0.0.1 only; every wait bounded.
# About 30 s per workload and CALLS=2000. Needs valgrind, python3, curl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh

CALLS=${CALLS:-2000}
WORKLOADS=${WORKLOADS:-legacy pass}
GATEWAY=${GATEWAY:-target/release/oauth-apps-gateway}
GATEWAY_ENV=${GATEWAY_ENV:-}
need valgrind valgrind
need python3 python3
need curl curl
[[ -x $GATEWAY ]] || die "$GATEWAY not found: cargo build --release --locked (or set GATEWAY=)"

TMP=$(mktemp -d)
PIDS=()
WRK_PID=
trap 'stop_started; rm -rf "$TMP"' EXIT

cat > "$TMP/upstream.py" <<'PY'
import http.server, socketserver, sys
BODY = b'{"id":1,"token":"gho_x","app":{"client_id":"Iv1.bench"}}' + b" " * 1176
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        self.send_response(200)
        self.send_header("content-type", "application/json; charset=utf-8")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    do_GET = do_POST = do_PATCH = do_DELETE = answer
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
cat > "$TMP/client.py" <<'PY'
import base64, http.client, sys, time
port, calls, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
auth = "Basic " + base64.b64encode(b"Iv1.bench:not-a-secret").decode()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
deadline = time.monotonic() + 600
for _ in range(calls):
    assert time.monotonic() < deadline, "took over 600 s"
    conn.request("GET", path, headers={"Authorization": auth})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
PY

UP_PORT=$(free_port)
python3 "$TMP/upstream.py" "$UP_PORT" &
PIDS+=($!)
wait_http upstream "${PIDS[-1]}" "http://127.0.0.1:$UP_PORT/"

# Instructions (callgrind's "Collected") for a warm-up and `$1` more calls to path `$2`.
collected() { # calls path
    local port admin out
    port=$(free_port)
    admin=$(free_port)
    cat > "$TMP/gw.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
worker_threads = 1
[admin]
listen = "127.0.0.1:$admin"
[upstream]
url = "http://127.0.0.1:$UP_PORT"
[failed_checks]
enabled = false
[log]
level = "warn"
TOML
    out="$TMP/callgrind.$RANDOM"
    # shellcheck disable=SC2086 # GATEWAY_ENV is a list of VAR=value words
    env $GATEWAY_ENV valgrind --tool=callgrind --callgrind-out-file="$out.out" \
        "$GATEWAY" --config "$TMP/gw.toml" >/dev/null 2>"$out.log" &
    PIDS+=($!)
    local pid=${PIDS[-1]}
    for _ in $(seq 300); do
        curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$admin/livez" && break
        kill -0 "$pid" 2>/dev/null || die "gateway under callgrind exited (log: $out.log)"
        sleep 0.2
    done
    python3 "$TMP/client.py" "$port" 200 "$2"
    ((${1} > 0)) && python3 "$TMP/client.py" "$port" "$1" "$2"
    stop_pid "$pid" gateway
    awk '/Collected/ { print $NF }' "$out.log"
}

printf '%-14s %12s\n' workload 'instr/call'
for w in $WORKLOADS; do
    case $w in
        legacy) path=/applications/Iv1.bench/tokens/gho_16C7e42F292c6912E7710c838347Ae178B4a ;;
        pass) path=/user ;;
        *) die "unknown workload '$w' (known: legacy pass)" ;;
    esac
    base=$(collected 0 "$path")
    total=$(collected "$CALLS" "$path")
    printf '%-14s %12d\n' "$w" $(((total - base) / CALLS))
done
