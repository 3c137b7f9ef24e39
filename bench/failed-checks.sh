#!/usr/bin/env bash
# Measures the failed-check limiter from the outside: a gateway binary with the default
# [failed_checks], in front of the fake GitHub (or, for scenario 3, a slow upstream that answers
# 401 after 200 ms), driven by callers on different loopback addresses. Prints one table per
# scenario; with EXPECT=1 (the default) exits 3 when the binary misses an expectation of the
# caller-keyed limiter (issue 7). See bench/README.md.
#
#   bash bench/failed-checks.sh [GATEWAY_BIN [FAKE_BIN]]
#   EXPECT=0 LABEL=before bash bench/failed-checks.sh /path/to/old/oauth-apps-gateway   # report only
#
# Knobs (environment): GATEWAY_BIN, FAKE_BIN (default target/release/...; the arguments win),
# BUILD=0 (1: cargo build --release --locked first), EXPECT=1, LABEL=, SCENARIOS="1 2 3",
# SLOW_GUESSES=5, PACE=6 (seconds between the slow guesses of scenario 1), BATCH_SIZES="60 300",
# BATCH_PARALLEL=8, BURST=200, UPSTREAM_DELAY_MS=200, KEEP_TMP=0.
#
# Only 127.0.0.0/8 is contacted (callers bind 127.0.0.1, .2 and .3). Every process started here
# is stopped on exit; every loop is bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEWAY_BIN=${1:-${GATEWAY_BIN:-$ROOT/target/release/oauth-apps-gateway}}
FAKE_BIN=${2:-${FAKE_BIN:-$ROOT/target/release/examples/fake-github}}
BUILD=${BUILD:-0}
EXPECT=${EXPECT:-1}
LABEL=${LABEL:-}
SCENARIOS=${SCENARIOS:-"1 2 3"}
SLOW_GUESSES=${SLOW_GUESSES:-5}
PACE=${PACE:-6}
BATCH_SIZES=${BATCH_SIZES:-"60 300"}
BATCH_PARALLEL=${BATCH_PARALLEL:-8}
BURST=${BURST:-200}
UPSTREAM_DELAY_MS=${UPSTREAM_DELAY_MS:-200}
KEEP_TMP=${KEEP_TMP:-0}

CLIENT_ID=Iv1.bench00000000000
CLIENT_SECRET=bench-secret-0000
TOKEN=gho_bench0000000000000000000000000000000 # 40 characters, like GitHub's

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
for tool in curl ss python3 timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found"
done

if [[ $BUILD == 1 ]]; then
    # Two builds: together, the example's dev-dependencies would give the gateway tokio's
    # `test-util` (a mutex on every clock read).
    (cd "$ROOT" && cargo build --release --locked --bin oauth-apps-gateway &&
        cargo build --release --locked --example fake-github) ||
        die "cargo build failed"
fi
[[ -x $GATEWAY_BIN ]] || die "gateway binary not found: $GATEWAY_BIN (build it, or pass its path)"
[[ -x $FAKE_BIN ]] || die "fake-github binary not found: $FAKE_BIN"

# ---------------------------------------------------------------------------------------------
# Processes: started in the background, remembered by pid, stopped on exit (as compare-nginx.sh).

TMP=$(mktemp -d /tmp/failed-checks.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? i pid
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 ]]; then echo "temp dir kept: $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Copies: a concurrent build must not swap a binary mid-run.
mkdir -p "$TMP/bin"
cp "$GATEWAY_BIN" "$TMP/bin/gateway"
cp "$FAKE_BIN" "$TMP/bin/fake-github"

# ---------------------------------------------------------------------------------------------
# The client side (and the slow upstream), in Python: exact timing, 200 threads released at once.

cat >"$TMP/driver.py" <<'PY'
import argparse, base64, http.client, http.server, json, sys, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

APP, ATTACKER, BURSTER = "127.0.0.1", "127.0.0.2", "127.0.0.3"

def basic(cid, secret):
    return "Basic " + base64.b64encode(f"{cid}:{secret}".encode()).decode()

def check(a, src, secret, token):
    """One legacy check on a new connection from src: (status, retry-after, message)."""
    c = http.client.HTTPConnection("127.0.0.1", a.gw, timeout=60, source_address=(src, 0))
    try:
        c.request("GET", f"/applications/{a.client_id}/tokens/{token}",
                  headers={"Authorization": basic(a.client_id, secret), "User-Agent": "failed-checks.sh"})
        r = c.getresponse()
        body = r.read()
        msg = ""
        if r.status == 429:
            try: msg = json.loads(body).get("message", "")
            except ValueError: pass
        return r.status, r.getheader("Retry-After"), msg
    except (OSError, http.client.HTTPException) as e:
        return f"ERR {type(e).__name__}", None, ""
    finally:
        c.close()

def metrics(a):
    """{(name, labels): value} of the gateway's failed_checks/429 series."""
    out = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{a.admin}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("#") or "failed_checks" not in line and 'status="429"' not in line:
                continue
            name, _, value = line.rpartition(" ")
            out[name.replace("oauth_apps_gateway_", "")] = float(value)
    return out

def print_metrics(a):
    m = metrics(a)
    for k in sorted(m):
        if m[k] and "tracked_keys" not in k and "verified" not in k:
            print(f"    {k} {m[k]:g}")
    return m

def row(cells, widths):
    print("  " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))

FAILS = []
def expect(ok, what):
    print(f"  expect {what}: {'ok' if ok else 'FAILED'}")
    if not ok: FAILS.append(what)

def tally(results):
    t = {}
    for s, *_ in results: t[s] = t.get(s, 0) + 1
    return t

def lockout(a):
    print(f"scenario 1: lockout. Attacker at {ATTACKER} checks the real client_id with wrong secrets;"
          f" the app at {APP} checks its valid token between every two attacker calls")
    W = (34, 9, 7, 12, 12)
    row(("phase", "app calls", "app 429", "attacker 401", "attacker 429"), W)
    app_all, first_app_429, n_att = [], None, 0
    last = None
    def phase(name, secrets, gap):
        nonlocal first_app_429, n_att, last
        app, att = [], []
        def app_check():
            nonlocal first_app_429
            r = check(a, APP, a.secret, a.token); app.append(r)
            if r[0] == 429 and first_app_429 is None: first_app_429 = n_att
        for secret in secrets:
            # Paced: the app checks about once a second while the attacker waits `gap`.
            for _ in range(max(1, int(gap)) if gap else 0):
                app_check(); time.sleep(gap / max(1, int(gap)))
            att.append(check(a, ATTACKER, secret, a.token)); n_att += 1; last = att[-1]
            if not gap: app_check()
        if gap: app_check()
        ta, tt = tally(app), tally(att)
        other = {k: v for k, v in list(ta.items()) + list(tt.items()) if k not in (200, 401, 429)}
        row((name, len(app), ta.get(429, 0), tt.get(401, 0), tt.get(429, 0)), W)
        if other: print(f"    other statuses: {other}")
        app_all.extend(app)
        return app, att
    t0 = time.monotonic()
    phase("20 x one wrong secret", ["wrong-secret-fixed"] * 20, 0)
    phase("40 x a new wrong secret each", [f"wrong-secret-{i:03d}" for i in range(40)], 0)
    s1 = last  # the attacker's last answer of the 60
    fast = time.monotonic() - t0
    print(f"  attacker's last answer after the 60: {s1[0]}, Retry-After: {s1[1]}"
          + (f' ("{s1[2]}")' if s1[2] else "") + f"  ({fast:.1f} s for the 60 + 60 calls)")
    print(f"  app's first 429: " + (f"after attacker call #{first_app_429}" if first_app_429 else "none"))
    if a.slow_guesses:
        _, slow_att = phase(f"{a.slow_guesses} guesses, one every {a.pace:g} s",
                                   [f"wrong-secret-slow-{i}" for i in range(a.slow_guesses)], a.pace)
        print("  slow guesses answered: " + ", ".join(f"{s}" + (f" (RA {ra})" if ra else "") for s, ra, _ in slow_att))
    print("  metrics:")
    print_metrics(a)
    n429 = sum(1 for s, *_ in app_all if s == 429)
    expect(n429 == 0, f"the app is never answered 429 ({n429} of {len(app_all)} were)")
    expect(all(s == 200 for s, *_ in app_all), "every app check answers 200")

def batch(a, n):
    tokens = [f"gho_revoked{i:029d}" if i % 3 == 0 else a.token for i in range(n)]
    revoked = sum(1 for t in tokens if t != a.token)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        results = list(pool.map(lambda t: check(a, APP, a.secret, t), tokens))
    took = time.monotonic() - t0
    t = tally(results)
    valid_429 = sum(1 for tok, r in zip(tokens, results) if tok == a.token and r[0] == 429)
    print(f"scenario 2: batch job. The app at {APP} checks {n} stored tokens ({revoked} revoked),"
          f" {a.parallel} in parallel")
    W = (7, 5, 5, 5, 16, 6, 6)
    row(("tokens", "200", "404", "429", "valid ones 429", "other", "secs"), W)
    other = sum(v for k, v in t.items() if k not in (200, 404, 429))
    row((n, t.get(200, 0), t.get(404, 0), t.get(429, 0), valid_429, other, f"{took:.1f}"), W)
    if other: print(f"    other statuses: { {k: v for k, v in t.items() if k not in (200, 404, 429)} }")
    print("  metrics:")
    print_metrics(a)
    expect(t.get(429, 0) == 0, f"no 429 in the batch of {n}")
    expect(t.get(200, 0) == n - revoked and t.get(404, 0) == revoked,
           f"{n - revoked} x 200 and {revoked} x 404")

def upstream_stats(a, reset=False):
    with urllib.request.urlopen(f"http://127.0.0.1:{a.upstream}/__stats" + ("?reset" if reset else ""), timeout=10) as r:
        return json.loads(r.read())

def burst(a, mode):
    n = a.burst
    secrets = [f"wrong-burst-{i:03d}" for i in range(n)] if mode == "distinct" else ["wrong-burst-same"] * n
    before = upstream_stats(a, reset=True)
    m0 = metrics(a)
    go = threading.Barrier(n + 1, timeout=30)
    results = [None] * n
    def one(i):
        c = http.client.HTTPConnection("127.0.0.1", a.gw, timeout=60, source_address=(BURSTER, 0))
        try:
            c.connect()
            go.wait()
            c.request("GET", f"/applications/{a.client_id}/tokens/{a.token}",
                      headers={"Authorization": basic(a.client_id, secrets[i])})
            r = c.getresponse(); r.read()
            results[i] = (r.status, r.getheader("Retry-After"), "")
        except Exception as e:
            results[i] = (f"ERR {type(e).__name__}", None, "")
        finally:
            c.close()
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for th in threads: th.start()
    go.wait()
    t0 = time.monotonic()
    for th in threads: th.join(90)
    took = time.monotonic() - t0
    after = upstream_stats(a)
    m1 = metrics(a)
    reached = after["requests"] - before["requests"]
    t = tally(results)
    waits = (sum(v for k, v in m1.items() if k.startswith("failed_checks_waits_total"))
             - sum(v for k, v in m0.items() if k.startswith("failed_checks_waits_total")))
    has_waits = any(k.startswith("failed_checks_waits_total") for k in m1)
    ras = sorted({int(ra) for s, ra, _ in results if s == 429 and ra})
    burst_, interval = (30, 2.0) if mode == "distinct" else (10, 6.0)
    bound = burst_ + int(took // interval)  # cells regained while the burst ran
    label = f"{n} x a different wrong secret" if mode == "distinct" else f"{n} x one wrong secret"
    print(f"scenario 3: {label}, all at once from {BURSTER}; upstream answers 401 after {a.delay_ms} ms")
    W = (30, 16, 12, 5, 5, 6, 9, 5)
    row(("calls", "reached upstream", "max at once", "401", "429", "other", "waits", "secs"), W)
    other = sum(v for k, v in t.items() if k not in (401, 429))
    row((label, reached, after["max_in_flight"], t.get(401, 0), t.get(429, 0), other,
         f"{waits:g}" if has_waits else "n/a", f"{took:.1f}"), W)
    if other: print(f"    other statuses: { {k: v for k, v in t.items() if k not in (401, 429)} }")
    print(f"  Retry-After on the 429s: {ras[0]}..{ras[-1]} s" if ras else "  no 429")
    print("  metrics:")
    print_metrics(a)
    expect(reached <= bound, f"at most {bound} reach the upstream ({burst_} burst + 1 per "
           f"{interval:g} s over {took:.1f} s); {reached} did")
    expect(t.get(401, 0) == reached and t.get(401, 0) + t.get(429, 0) == n,
           "every call that reached the upstream answered 401, every other one 429")

class Slow(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
    def log_message(self, *args): pass
    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n: self.rfile.read(n)
        if self.path.startswith("/__stats"):  # ?reset: the peak starts again from now
            with Slow.lock:
                body = json.dumps({k: Slow.stats[k] for k in ("requests", "max_in_flight")}).encode()
                if self.path.endswith("?reset"): Slow.stats["max_in_flight"] = Slow.stats["in_flight"]
            status = 200
        else:
            print(f"{time.monotonic():.3f} {self.command} {self.path}", flush=True)  # to slow.log
            with Slow.lock:
                Slow.stats["requests"] += 1; Slow.stats["in_flight"] += 1
                Slow.stats["max_in_flight"] = max(Slow.stats["max_in_flight"], Slow.stats["in_flight"])
            time.sleep(self.server.delay)
            with Slow.lock: Slow.stats["in_flight"] -= 1
            body = b'{"message":"Requires authentication","documentation_url":"https://docs.github.com/rest"}'
            status = 401
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = handle_any

def slow_upstream(a):
    http.server.ThreadingHTTPServer.request_queue_size = 512
    http.server.ThreadingHTTPServer.daemon_threads = True
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.upstream), Slow)
    srv.delay = a.delay_ms / 1000
    srv.serve_forever()

p = argparse.ArgumentParser()
p.add_argument("what", choices=["lockout", "batch", "burst-distinct", "burst-same", "slow-upstream"])
for k in ("gw", "admin", "upstream", "burst", "parallel", "slow_guesses", "delay_ms"):
    p.add_argument("--" + k.replace("_", "-"), type=int, default=0)
p.add_argument("--pace", type=float, default=6)
p.add_argument("--sizes", default="60 300")
p.add_argument("--client-id"); p.add_argument("--secret"); p.add_argument("--token")
p.add_argument("--expect", type=int, default=1)
a = p.parse_args()
if a.what == "slow-upstream": slow_upstream(a)
elif a.what == "lockout": lockout(a)
elif a.what == "batch":
    for i, n in enumerate(a.sizes.split()):
        if i: print()
        batch(a, int(n))
else: burst(a, a.what.split("-")[1])
sys.exit(3 if FAILS and a.expect else 0)
PY

# ---------------------------------------------------------------------------------------------
# The upstreams and a fresh gateway per scenario (default [failed_checks]).

FAKE_PORT=$(free_port)
"$TMP/bin/fake-github" --listen "127.0.0.1:$FAKE_PORT" --client-id "$CLIENT_ID" \
    --client-secret "$CLIENT_SECRET" --token "$TOKEN" >"$TMP/fake.log" 2>&1 &
PIDS+=($!)
wait_http "fake GitHub" "$!" "http://127.0.0.1:$FAKE_PORT/headers"

GATEWAY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
GATEWAY_PID=
GATEWAY_STARTS=0
start_gateway() { # upstream port
    GATEWAY_STARTS=$((GATEWAY_STARTS + 1))
    local conf=$TMP/gateway-$GATEWAY_STARTS.toml
    cat >"$conf" <<EOF
# Written by bench/failed-checks.sh. Everything not set here takes its default.
[server]
listen = "127.0.0.1:$GATEWAY_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[upstream]
url = "http://127.0.0.1:$1"
[log]
level = "warn"
EOF
    "$TMP/bin/gateway" --config "$conf" --check-config >/dev/null || die "gateway rejected $conf"
    env -u RUST_LOG "$TMP/bin/gateway" --config "$conf" >"$TMP/gateway-$GATEWAY_STARTS.log" 2>&1 &
    GATEWAY_PID=$!
    PIDS+=("$GATEWAY_PID")
    wait_http gateway "$GATEWAY_PID" "http://127.0.0.1:$ADMIN_PORT/readyz"
}

FAILED=()
drive() { # scenario-name upstream-port driver args...: a fresh gateway, the driver, bounded
    local name=$1 upstream=$2 rc=0
    shift 2
    start_gateway "$upstream"
    timeout 300 python3 "$TMP/driver.py" "$@" --gw "$GATEWAY_PORT" --admin "$ADMIN_PORT" \
        --upstream "$upstream" --client-id "$CLIENT_ID" --secret "$CLIENT_SECRET" \
        --token "$TOKEN" --expect "$EXPECT" || rc=$?
    stop_pid "$GATEWAY_PID"
    case $rc in
    0) ;;
    3) FAILED+=("$name") ;;
    *) die "scenario '$name' did not complete (driver exit $rc)" ;;
    esac
    echo
}

echo "== ${LABEL:+$LABEL: }gateway $GATEWAY_BIN ($("$TMP/bin/gateway" --version 2>/dev/null || echo '?'))"
echo "== default [failed_checks]; fake GitHub on 127.0.0.1:$FAKE_PORT; expectations" \
    "$([[ $EXPECT == 1 ]] && echo checked || echo 'reported only')"
echo
STARTED=$SECONDS
for s in $SCENARIOS; do
    case $s in
    1) drive lockout "$FAKE_PORT" lockout --slow-guesses "$SLOW_GUESSES" --pace "$PACE" ;;
    2) for n in $BATCH_SIZES; do
        drive "batch of $n" "$FAKE_PORT" batch --sizes "$n" --parallel "$BATCH_PARALLEL"
    done ;;
    3)
        SLOW_PORT=$(free_port)
        python3 "$TMP/driver.py" slow-upstream --upstream "$SLOW_PORT" \
            --delay-ms "$UPSTREAM_DELAY_MS" >"$TMP/slow.log" 2>&1 &
        SLOW_PID=$!
        PIDS+=("$SLOW_PID")
        wait_http "slow upstream" "$SLOW_PID" "http://127.0.0.1:$SLOW_PORT/__stats"
        drive "burst, distinct secrets" "$SLOW_PORT" burst-distinct --burst "$BURST" --delay-ms "$UPSTREAM_DELAY_MS"
        drive "burst, one secret" "$SLOW_PORT" burst-same --burst "$BURST" --delay-ms "$UPSTREAM_DELAY_MS"
        stop_pid "$SLOW_PID"
        ;;
    *) die "unknown scenario '$s' (SCENARIOS takes 1, 2, 3)" ;;
    esac
done
echo "== ${LABEL:+$LABEL: }done in $((SECONDS - STARTED)) s"
if ((${#FAILED[@]})); then
    echo "== expectations missed in: $(IFS=,; echo "${FAILED[*]}")"
    exit 3
fi
