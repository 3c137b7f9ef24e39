#!/usr/bin/env bash
# Proves README.md's PromQL against a running gateway. Starts, on 127.0.0.1 only: the fake GitHub
# (examples/fake-github.rs), a tiny node upstream that answers 422 (401 on /unauthorized paths,
# 401 after 1 s for one client_id) or hangs up, the gateway (restarted for each step: observe,
# rewrite, reject with an override, upstream failures, then three runs of the failed-check limiter:
# README's "Trying it", concurrent guesses, shadow mode) and a Prometheus server scraping the
# gateway's admin /metrics every second. Traffic comes from the real legacy client
# (tests/legacy-client/demo.js, both auth styles), curl and a small node burst.
# Every query in README's ```promql blocks is run through Prometheus's HTTP API and its answer
# checked against what this script sent; `promtool check metrics` runs on the scrapes.
#
# The failed-check limiter ([failed_checks], on by default) is part of what is counted: each call
# is tallied with what the limiter did to it (charged a credential or a token failure, answered
# 429 naming a quota, nothing), and a 429 is only accepted where the traffic was built to produce
# one. Step 1 switches it off (see there); steps 6 to 8 exercise it with their own credentials and
# addresses. Deprecation headers are off by default: steps 1 and 2 check that they are absent (and
# that the legacy client prints no token or secret), steps 3, 5 and 6 turn them on to check them.
#
#   bash scripts/promql-check.sh        # needs cargo, node (+ tests/legacy-client/install.sh),
#                                       # curl, jq, prometheus and promtool (Debian: prometheus)
# Exit 0 when every check passes. Everything it starts is stopped on exit (trap). A run takes
# about a minute; each wait is bounded. KEEP_WORKDIR=1 keeps the temp dir (logs, TSDB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
README="$ROOT/README.md"
JOB="oauth-apps-gateway"          # the scrape job name README's queries use
CLIENT_ID="Iv1.demo0000000000"    # the fake's seeded app, token and secret
CLIENT_SECRET="demo-secret"
TOKEN="gho_demo00000000000000000000000000000000"
OPS="check reset revoke_token revoke_grant"  # the four legacy operations

# ---------------------------------------------------------------------------------------------
# Processes: every one we start is recorded and stopped on exit.

WORK="$(mktemp -d "${TMPDIR:-/tmp}/promql-check.XXXXXX")"
FAKE_PID="" STUB_PID="" PROM_PID="" GW_PID=""
FAILURES=0

stop_pid() { # stop_pid PID: TERM, up to 10 s, then KILL
  local pid="$1" i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  stop_pid "$GW_PID"; stop_pid "$FAKE_PID"; stop_pid "$STUB_PID"; stop_pid "$PROM_PID"
  if [ "${KEEP_WORKDIR:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "work dir kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { echo "FAILED: $*" >&2; exit 1; }
fail() { echo "FAIL  $*" >&2; FAILURES=$((FAILURES + 1)); }

for tool in cargo node curl jq prometheus promtool; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (see the comment at the top)"
done
[ -d "$ROOT/tests/legacy-client/node_modules/@octokit/rest" ] \
  || die "legacy client missing: bash tests/legacy-client/install.sh"

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close();});'
}
FAKE_PORT=$(free_port) STUB_PORT=$(free_port) DEAD_PORT=$(free_port)
PROXY_PORT=$(free_port) ADMIN_PORT=$(free_port) PROM_PORT=$(free_port)
GW="http://127.0.0.1:$PROXY_PORT"
ADMIN="http://127.0.0.1:$ADMIN_PORT"
PROM="http://127.0.0.1:$PROM_PORT"

wait_until() { # wait_until SECONDS WHAT COMMAND...: retry every 0.1 s
  local limit="$1" what="$2" i; shift 2
  for i in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out after ${limit}s waiting for $what"
}

echo "== build"
(cd "$ROOT" && cargo build --locked --quiet --bin oauth-apps-gateway --example fake-github)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/debug/oauth-apps-gateway"
FAKE_BIN="$TARGET/debug/examples/fake-github"

start_fake() { # a fresh fake GitHub (seeded token valid again)
  stop_pid "$FAKE_PID"
  "$FAKE_BIN" --listen "127.0.0.1:$FAKE_PORT" >"$WORK/fake.log" 2>&1 &
  FAKE_PID=$!
  wait_until 10 "fake GitHub" curl -s -o /dev/null "http://127.0.0.1:$FAKE_PORT/"
}

start_stub() { # answers every request 422 (GitHub's validation error), hangs up on paths with
  # /drop, answers 401 (a wrong client secret) on paths with /unauthorized, and answers calls for
  # client_id Iv1.slow 401 after 1 s, counting them: GET /__count (straight to the stub) tells how
  # many.
  cat >"$WORK/stub.js" <<'EOF'
const http = require("http");
const json = { "content-type": "application/json; charset=utf-8" };
const body = JSON.stringify({ message: "Validation Failed",
  errors: [{ resource: "OauthAccess", code: "invalid" }], documentation_url: "https://docs.github.com/rest" });
let slow = 0;
http.createServer((req, res) => {
  if (req.url === "/__count") { res.writeHead(200, { "content-type": "text/plain" }); res.end(String(slow)); return; }
  if (req.url.includes("/drop")) { req.socket.destroy(); return; }
  req.resume();
  req.on("end", () => {
    const unauthorized = () => { res.writeHead(401, json);
      res.end(JSON.stringify({ message: "Bad credentials", documentation_url: "https://docs.github.com/rest" })); };
    if (req.url.includes("/unauthorized")) { unauthorized(); return; }
    if (req.url.startsWith("/applications/Iv1.slow/")) { slow++; setTimeout(unauthorized, 1000); return; }
    res.writeHead(422, json); res.end(body);
  });
}).listen(Number(process.argv[2]), "127.0.0.1");
EOF
  node "$WORK/stub.js" "$STUB_PORT" >"$WORK/stub.log" 2>&1 &
  STUB_PID=$!
  wait_until 10 "stub upstream" curl -s -o /dev/null "http://127.0.0.1:$STUB_PORT/"
}

start_prometheus() {
  cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: $JOB
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
EOF
  promtool check config "$WORK/prometheus.yml" >/dev/null
  prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
  PROM_PID=$!
  wait_until 30 "Prometheus" curl -sf "$PROM/-/ready"
}

# ---------------------------------------------------------------------------------------------
# The gateway, one process per step. PROC counts processes; the tally records what each got.

PROC=0
UPSTREAM_KIND=""   # fake | stub | dead | tls: decides the expected outcome of a call
declare -A MODE    # MODE[op] = rewrite | observe | reject for the running process
LIMITER=on         # on | off | shadow: [failed_checks] enabled (and its mode) for the running process

start_gateway() { # start_gateway UPSTREAM MODE MIGRATION_TOML FAILED_CHECKS_TOML [op=mode...]
  # UPSTREAM: fake | stub | dead (nothing listens) | tls (https to the fake's plain port) |
  # timeout (the fake, with request_timeout = "1s"). MIGRATION_TOML: extra keys of [migration]
  # (e.g. deprecation_headers = true). FAILED_CHECKS_TOML: keys of [failed_checks], "" for the
  # defaults (the limiter on, mode enforce).
  local kind="$1" mode="$2" extra="$3" limiter_toml="$4" url op o server=""; shift 4
  LIMITER=on
  case "$limiter_toml" in *"enabled = false"*) LIMITER=off ;; *'mode = "shadow"'*) LIMITER=shadow ;; esac
  case "$kind" in
    fake) url="http://127.0.0.1:$FAKE_PORT" ;;
    timeout) url="http://127.0.0.1:$FAKE_PORT" server='request_timeout = "1s"' ;;
    stub) url="http://127.0.0.1:$STUB_PORT" ;;
    dead) url="http://127.0.0.1:$DEAD_PORT" ;;
    tls) url="https://127.0.0.1:$FAKE_PORT" ;;
  esac
  PROC=$((PROC + 1)); UPSTREAM_KIND="$kind"
  for op in $OPS; do MODE[$op]="$mode"; done
  local overrides=""
  for o in "$@"; do MODE[${o%%=*}]="${o#*=}"; overrides+="${o%%=*} = \"${o#*=}\""$'\n'; done
  cat >"$WORK/gw-$PROC.toml" <<EOF
[server]
listen = "127.0.0.1:$PROXY_PORT"
shutdown_grace = "10s"
$server
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[upstream]
url = "$url"
[migration]
mode = "$mode"
$extra
[migration.operations]
$overrides
[failed_checks]
$limiter_toml
EOF
  "$BIN" --check-config --config "$WORK/gw-$PROC.toml" >/dev/null
  env -u RUST_LOG "$BIN" --config "$WORK/gw-$PROC.toml" >"$WORK/gw-$PROC.log" 2>&1 &
  GW_PID=$!
  wait_until 15 "gateway $PROC /readyz" curl -sf "$ADMIN/readyz"
  # Traffic only once Prometheus has this process's first sample: counters start at 0 there.
  local started
  started=$(curl -s "$ADMIN/metrics" | awk '$1=="process_start_time_seconds"{print $2}')
  wait_until 20 "first scrape of gateway $PROC" \
    prom_has "process_start_time_seconds{job=\"$JOB\"} == $started"
  echo "== gateway $PROC: upstream $kind, mode $mode${*:+, overrides $*}, limiter $LIMITER${limiter_toml:+ ($limiter_toml)}"
}

stop_gateway() { # SIGTERM; the drain must complete (exit 0)
  local pid="$GW_PID" rc=0 i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && die "gateway $PROC did not exit within 15s of SIGTERM"
  wait "$pid" || rc=$?
  GW_PID=""
  [ "$rc" -eq 0 ] || fail "gateway $PROC exited $rc after SIGTERM (log: $WORK/gw-$PROC.log)"
}

# tally line: proc route op action status client_id query_credential status_compat failure_kind
# limiter
TALLY="$WORK/tally"; : >"$TALLY"
record() { echo "$PROC $*" >>"$TALLY"; }

now() { date +%s.%N; }

# What the failed-check limiter did to a call (README "What counts as a failure"): "cred" (a
# credential failure, charged to the credential and the client address), "token" (a token
# failure, charged to the credential), "429:CLASS:KIND" (answered 429, by the quota its message
# names), "shadow:CLASS:KIND" (shadow mode forwarded what enforce would have refused: nothing
# charged; set by the caller through LIM_OVERRIDE, the answer cannot tell), or "-".
# A credential failure: any call under /applications/{client_id}/ answered 401. A token failure: a
# forwarded token operation (legacy rewritten or observed, or the replacement API) the upstream
# answered 404 or 422 (a rewritten 422 reaches the app as 404). Only while the limiter is on.
lim_col() { # lim_col ROUTE ACTION STATUS PATH MESSAGE_OF_A_429
  local route="$1" action="$2" status="$3" path="$4" msg="$5"
  if [ -n "${LIM_OVERRIDE:-}" ]; then echo "$LIM_OVERRIDE"; return; fi
  if [ "$status" = 429 ]; then
    case "$msg" in
      *"wrong or missing client secret from these client credentials."*) echo 429:credential:credential ;;
      *"wrong or missing client secret from this client address."*) echo 429:credential:client_ip ;;
      *"invalid tokens from these client credentials."*) echo 429:token:credential ;;
      *) echo 429:unknown ;;
    esac
    return
  fi
  if [ "$LIMITER" != off ]; then
    if [ "$status" = 401 ] && [[ "$path" =~ ^(/api/v3)?/applications/[^/?]+/[^?]+ ]]; then
      echo cred; return
    fi
    case "$route:$action:$status" in
      legacy:rewritten:404 | legacy:rewritten:422 | legacy:observed:404 | legacy:observed:422 | \
        token_api:-:404 | token_api:-:422) echo token; return ;;
    esac
  fi
  echo -
}
last_message() { [ "$1" = 429 ] && jq -r '.message' "$WORK/last-body" 2>/dev/null || true; }

# Outcome of a call on the current upstream: status_compat and failure columns.
outcome() { # outcome ACTION STATUS -> "compat failure"
  local action="$1" status="$2" compat="-" failure="-"
  if [ "$UPSTREAM_KIND" = stub ] && [ "$action" = rewritten ] && [ "$status" = 404 ]; then compat=1; fi
  case "$UPSTREAM_KIND:$status" in
    dead:502) failure=connect ;; tls:502) failure=tls ;; timeout:504) failure=timeout ;;
    stub:502) failure=protocol ;;
  esac
  echo "$compat $failure"
}

action_of() { # the access-log and metric action of a well-formed legacy call of OP
  case "${MODE[$1]}" in rewrite) echo rewritten ;; observe) echo observed ;; reject) echo rejected ;; esac
}

legacy() { # legacy OP CLIENT_ID TOKEN [curl args]: one legacy call with curl, tallied; sends
  # Basic CLIENT_ID:$SECRET (default: the fake's secret)
  local op="$1" cid="$2" token="$3" method path action status qcred="-"; shift 3
  case "$op" in
    check) method=GET path="tokens" ;; reset) method=POST path="tokens" ;;
    revoke_token) method=DELETE path="tokens" ;; revoke_grant) method=DELETE path="grants" ;;
  esac
  action=$(action_of "$op")
  [ -n "$token" ] && [ -n "$cid" ] || action=malformed
  status=$(curl -s -o "$WORK/last-body" -D "$WORK/last-headers" -w '%{http_code}' -X "$method" \
    -u "${cid:-x}:${SECRET:-$CLIENT_SECRET}" "$@" "$GW/applications/$cid/$path/$token")
  # A call the limiter answered 429 was neither rewritten nor observed: action "limited".
  if [ "$status" = 429 ] && { [ "$action" = rewritten ] || [ "$action" = observed ]; }; then
    action=limited
  fi
  # Forwarded calls only: a rejected, malformed or limited call never reaches the credential step.
  if [ "$action" = rewritten ] || [ "$action" = observed ]; then
    case "$*" in *client_secret=*) qcred=client_secret ;; *access_token=*) qcred=access_token ;; esac
  fi
  local cid_col="${cid:--}"; [ "$action" = malformed ] && cid_col="-"
  record legacy "$op" "$action" "$status" "$cid_col" "$qcred" $(outcome "$action" "$status") \
    "$(lim_col legacy "$action" "$status" "/applications/$cid/$path/$token" "$(last_message "$status")")"
  echo "$status"
}

other() { # other ROUTE METHOD PATH [curl args]: a pass-through or token-API call, tallied
  local route="$1" method="$2" path="$3" status qcred="-"; shift 3
  status=$(curl -s -o "$WORK/last-body" -D "$WORK/last-headers" -w '%{http_code}' -X "$method" \
    "$@" "$GW$path")
  if [ "$status" != 429 ]; then # a 429 was not forwarded
    case "$path" in *access_token=*) qcred=access_token ;; *client_secret=*) qcred=client_secret ;; esac
  fi
  record "$route" - - "$status" - "$qcred" $(outcome - "$status") \
    "$(lim_col "$route" - "$status" "$path" "$(last_message "$status")")"
  echo "$status"
}

demo() { # demo AUTH_STYLE [ONLY]: the real legacy client; every call it makes is tallied
  local style="$1" only="${2:-}" line name op action status qcred msg
  GATEWAY_URL="$GW" CLIENT_ID="$CLIENT_ID" CLIENT_SECRET="$CLIENT_SECRET" ACCESS_TOKEN="$TOKEN" \
    OCTOKIT_AUTH="$style" ONLY="$only" timeout 60 node "$ROOT/tests/legacy-client/demo.js" \
    >"$WORK/demo.out" 2>"$WORK/demo.err" || die "demo.js failed: $(cat "$WORK/demo.err")"
  while IFS= read -r line; do
    name=$(jq -r '.operation' <<<"$line"); status=$(jq -r '.status' <<<"$line")
    [ "$status" != error ] || die "demo.js could not reach the gateway: $line"
    case "${name#*.}" in
      checkAuthorization) op=check ;; resetAuthorization) op=reset ;;
      revokeAuthorizationForApplication) op=revoke_token ;; revokeGrantForApplication) op=revoke_grant ;;
    esac
    action=$(action_of "$op"); qcred="-"; msg=""
    if [ "$status" = 429 ] && [ "$action" != rejected ]; then
      action=limited; msg=$(jq -r '.body | objects | .message // ""' <<<"$line")
    fi
    # @octokit/rest 16 with auth: { clientId, clientSecret } sends them as query parameters on
    # revokeGrantForApplication; a forwarded call has them moved into Authorization and counted.
    if [ "$style" = auth-object ] && [ "$op" = revoke_grant ] \
        && { [ "$action" = rewritten ] || [ "$action" = observed ]; }; then
      qcred=client_secret
    fi
    record legacy "$op" "$action" "$status" "$CLIENT_ID" "$qcred" $(outcome "$action" "$status") \
      "$(lim_col legacy "$action" "$status" "/applications/$CLIENT_ID/tokens" "$msg")"
  done <"$WORK/demo.out"
  echo "   demo.js ($style${only:+, ONLY=$only}): $(jq -r '.status' "$WORK/demo.out" | sort | uniq -c | xargs)"
}

# ---------------------------------------------------------------------------------------------
# Prometheus queries and checks.

CHECKED="$WORK/checked"; : >"$CHECKED"

promq() { # promq QUERY -> the raw JSON answer
  curl -s --max-time 10 "$PROM/api/v1/query" --data-urlencode "query=$1"
}
prom_has() { [ "$(promq "$1" | jq '.data.result | length')" -gt 0 ]; }

# A vector answer as sorted lines "label=value,... number" without __name__, job and instance.
vector() {
  local json; json=$(promq "$1")
  [ "$(jq -r .status <<<"$json")" = success ] || die "query failed: $1: $json"
  jq -r '.data.result[] | ((.metric | del(.__name__, .job, .instance) | to_entries | sort_by(.key)
           | map("\(.key)=\(.value)") | join(",")) as $l | (if $l == "" then "{}" else $l end)
           + " " + .value[1])' <<<"$json" | LC_ALL=C sort
}

# Wait for a scrape that started after now, so queries see every call made so far.
# (timestamp() of a selector is the sample's time; of an expression, the evaluation time.)
settle() {
  local now; now=$(date +%s.%N)
  wait_until 20 "a scrape after $now" \
    prom_has "timestamp(up{job=\"$JOB\"}) > $now and up{job=\"$JOB\"} == 1"
}

in_readme() {
  grep -qF -- "$1" "$README" || fail "query not in README.md: $1"
  echo "$1" >>"$CHECKED"
}

show() { sed 's/^/      /' <<<"$1"; }

# check NAME QUERY EXPECTED [REL_TOL ABS_TOL]: same label sets; each value within tolerance
# (exact when no tolerance). EXPECTED lines are "labels value", sorted like `vector`.
check() {
  local name="$1" query="$2" want="$3" rel="${4:-0}" abs="${5:-0}" got
  in_readme "$query"
  got=$(vector "$query")
  if awk -v rel="$rel" -v abs="$abs" '
      NR == FNR { want[$1] = $2; next }
      { got[$1] = $2 }
      END {
        for (k in want) { if (!(k in got)) exit 1
          d = got[k] - want[k]; if (d < 0) d = -d
          if (d > rel * want[k] + abs) exit 1 }
        for (k in got) if (!(k in want)) exit 1
      }' <(printf '%s\n' "$want" | sed '/^$/d') <(printf '%s\n' "$got" | sed '/^$/d'); then
    echo "ok    $name: $query"; show "${got:-(empty result)}"
  else
    fail "$name: $query"; echo "      want (rel $rel, abs $abs):" >&2; show "${want:-(empty)}" >&2
    echo "      got:" >&2; show "${got:-(empty result)}" >&2
  fi
}

# check_that NAME QUERY AWK_CONDITION DESCRIPTION: every line ($1 labels, $2 value) satisfies it
# and the answer is not empty.
check_that() {
  local name="$1" query="$2" cond="$3" what="$4" got
  in_readme "$query"
  got=$(vector "$query")
  if [ -n "$got" ] && awk "{ if (!($cond)) bad = 1 } END { exit bad }" <<<"$got"; then
    echo "ok    $name ($what): $query"; show "$got"
  else
    fail "$name ($what): $query"; show "${got:-(empty result)}" >&2
  fi
}

# Expected answers, from the tally. $1 proc $2 route $3 op $4 action $5 status $6 client
# $7 query credential $8 status compat $9 failure kind $10 limiter.
expect_by_op_action() { # every operation x action series exists (pre-created at 0): 4 x 5 = 20
  awk -v ops="$OPS" '$2 == "legacy" { n[$3 "," $4]++ }
    END { split(ops, o, " "); split("limited malformed observed rejected rewritten", a, " ")
      for (i in o) for (j in a) printf "action=%s,operation=%s %d\n", a[j], o[i], n[o[i] "," a[j]] + 0 }' \
    "$TALLY" | LC_ALL=C sort
}
expect_by_op() { # expect_by_op AWK_FILTER: one line per operation
  awk -v ops="$OPS" "\$2 == \"legacy\" && ($1) { n[\$3]++ }
    END { split(ops, o, \" \"); for (i in o) printf \"operation=%s %d\\n\", o[i], n[o[i]] + 0 }" \
    "$TALLY" | LC_ALL=C sort
}
expect_clients_now() { # per client_id, calls in the running process (malformed calls have none)
  awk -v p="$PROC" '$1 == p && $2 == "legacy" && $6 != "-" { n[$6]++ }
    END { for (c in n) printf "client_id=%s %d\n", c, n[c] }' "$TALLY" | LC_ALL=C sort
}
expect_legacy_status_now() {
  awk -v p="$PROC" '$1 == p && $2 == "legacy" { n[$5]++ }
    END { for (s in n) printf "status=%s %d\n", s, n[s] }' "$TALLY" | LC_ALL=C sort
}
expect_by_column() { # expect_by_column COLUMN LABEL VALUES...: counts of column values
  local col="$1" label="$2"; shift 2
  awk -v col="$col" -v label="$label" -v vals="$*" '{ n[$col]++ }
    END { split(vals, v, " "); for (i in v) printf "%s=%s %d\n", label, v[i], n[v[i]] + 0 }' \
    "$TALLY" | LC_ALL=C sort
}
total_legacy() { awk '$2 == "legacy"' "$TALLY" | wc -l; }
QUOTAS="credential:credential credential:client_ip token:credential" # class:key_kind
expect_failed_checks() { # failures charged, per quota: a credential failure to both of its class
  awk '$10 == "cred" { c++ } $10 == "token" { t++ }
    END { printf "class=credential,key_kind=client_ip %d\nclass=credential,key_kind=credential %d\nclass=token,key_kind=credential %d\n", c, c, t }' "$TALLY"
}
expect_per_quota() { # expect_per_quota PREFIX: tally entries "PREFIX:CLASS:KIND", one line per quota
  awk -v p="$1" -v qs="$QUOTAS" '{ n[$10]++ } END { split(qs, q, " ")
    for (i in q) { split(q[i], ck, ":"); printf "class=%s,key_kind=%s %d\n", ck[1], ck[2], n[p ":" q[i]] + 0 } }' \
    "$TALLY" | LC_ALL=C sort
}
expect_rejected() { expect_per_quota 429; }   # the limiter's 429s, by the quota the answer named
expect_shadow() { expect_per_quota shadow; }  # shadow mode's would-be 429s

promtool_lint() { # promtool check metrics on a scrape of the admin listener: nothing reported
  local out
  if out=$(curl -s "$ADMIN/metrics" | promtool check metrics 2>&1) && [ -z "$out" ]; then
    echo "ok    promtool check metrics (gateway $PROC): no lint"
  else
    fail "promtool check metrics (gateway $PROC)"; show "$out" >&2
  fi
}

header_is() { # header_is NAME VALUE WHAT: the last response carried NAME: VALUE
  if tr -d '\r' <"$WORK/last-headers" | grep -qixF "$1: $2"; then
    echo "ok    $3: $1: $2"
  else
    fail "$3: no '$1: $2' in"; show "$(cat "$WORK/last-headers")" >&2
  fi
}

no_header() { # no_header NAME WHAT: the last response did not carry NAME
  if tr -d '\r' <"$WORK/last-headers" | grep -qi "^$1:"; then
    fail "$2: a '$1' header in"; show "$(cat "$WORK/last-headers")" >&2
  else
    echo "ok    $2: no $1 header"
  fi
}

expect_status() { # expect_status GOT WANT WHAT (a 429 is accepted only where it is expected)
  [ "$1" = "$2" ] && return 0
  fail "$3: status $1, expected $2$([ "$1" = 429 ] && echo " ($(jq -r .message "$WORK/last-body"))")"
}

expect_statuses() { # expect_statuses GOT WANT WHAT: a space-separated list of statuses
  if [ "$(xargs <<<"$1")" = "$(xargs <<<"$2")" ]; then
    echo "ok    $3: $(xargs <<<"$1" | tr ' ' '\n' | uniq -c | xargs)"
  else
    fail "$3: got [$(xargs <<<"$1")], expected [$(xargs <<<"$2")]"
  fi
}
repeat() { local i; for i in $(seq "$2"); do printf '%s ' "$1"; done; } # repeat WORD N
last_word() { awk '{ print $NF }' <<<"$1"; }

# expect_429 STATUS QUOTA RA_MIN RA_MAX WHAT: the last answer was the limiter's 429 for QUOTA
# (credential:credential, credential:client_ip or token:credential: class and key kind), with
# RA_MIN <= Retry-After <= RA_MAX and no x-ratelimit-* header.
expect_429() {
  local status="$1" quota="$2" lo="$3" hi="$4" what="$5" ra msg what_failed whose
  case "${quota%%:*}" in
    credential) what_failed="calls with a wrong or missing client secret" ;;
    token) what_failed="token operations on invalid tokens" ;;
  esac
  case "${quota#*:}" in
    credential) whose="these client credentials" ;; client_ip) whose="this client address" ;;
  esac
  ra=$(tr -d '\r' <"$WORK/last-headers" | awk 'tolower($1) == "retry-after:" { print $2 }')
  msg=$(jq -r .message "$WORK/last-body" 2>/dev/null || true)
  if [ "$status" = 429 ] && [[ "$ra" =~ ^[0-9]+$ ]] && [ "$ra" -ge "$lo" ] && [ "$ra" -le "$hi" ] \
      && [ "$msg" = "Too many failed $what_failed from $whose. Retry after $ra seconds." ] \
      && ! grep -qi '^x-ratelimit-' "$WORK/last-headers"; then
    echo "ok    $what: 429, Retry-After: $ra ($quota)"
  else
    fail "$what: status $status, Retry-After '$ra', message '$msg' (want 429 for $quota, Retry-After $lo..$hi)"
  fi
}

limiter_metrics() { # the failed_checks lines of a scrape of the admin listener, sorted
  curl -s "$ADMIN/metrics" | grep '^oauth_apps_gateway_failed_checks' | LC_ALL=C sort
}

ERROR_RATIO='(sum(rate(oauth_apps_gateway_responses_total{route="legacy",status=~"5.."}[5m])) or vector(0)) / sum(rate(oauth_apps_gateway_request_duration_seconds_count{route="legacy"}[5m]))'

# The deprecation headers README documents, on the last response.
DEPRECATION="@1581638400"
LINK='<https://developer.github.com/changes/2020-02-14-deprecating-oauth-app-endpoint/>; rel="deprecation"; type="text/html"'

# ---------------------------------------------------------------------------------------------
echo "== upstreams and Prometheus (127.0.0.1:$PROM_PORT)"
start_fake
start_stub
start_prometheus
T0=$SECONDS

# Step 1: observe. The fake, like api.github.com, answers every legacy path 404.
# Limiter OFF for this run ([failed_checks] enabled = false): in mode observe each of those 404s
# is a failed token operation, and the demo client alone makes 18 of them, so with the limiter
# on its 11th and later calls would be answered 429. This step measures who makes which
# deprecated calls (README's /legacy-clients example is its report), not the limiter; the
# limiter's metrics must still exist here, at 0, and stay there.
start_gateway fake observe "" "enabled = false"

s=$(other pass_through GET "/headers?access_token=gho_passthrough") ; expect_status "$s" 200 "pass-through /headers"
s=$(other pass_through GET "/nope"); expect_status "$s" 404 "pass-through /nope"
s=$(other token_api POST "/applications/$CLIENT_ID/token" -u "$CLIENT_ID:$CLIENT_SECRET" \
  -H 'Content-Type: application/json' -d "{\"access_token\":\"$TOKEN\"}")
expect_status "$s" 200 "replacement check called directly"
grep -qi '^deprecation:' "$WORK/last-headers" && fail "Deprecation header on a token_api call"
settle
check "no deprecated call yet" \
  'sum(increase(oauth_apps_gateway_deprecated_calls_total[7d])) == 0' '{} 0'
check "deprecated calls so far" \
  'sum(increase(oauth_apps_gateway_deprecated_calls_total[7d]))' '{} 0'
check "operations without deprecated calls (all)" \
  'sum by (operation) (increase(oauth_apps_gateway_deprecated_calls_total[7d])) == 0' \
  "$(expect_by_op 1 | awk '$2 == 0')"

demo auth-object apps.checkAuthorization
settle
check "operations without deprecated calls (check called)" \
  'sum by (operation) (increase(oauth_apps_gateway_deprecated_calls_total[7d])) == 0' \
  "$(expect_by_op 1 | awk '$2 == 0')"
check "deprecated traffic remains: no sample" \
  'sum(increase(oauth_apps_gateway_deprecated_calls_total[7d])) == 0' ''

demo auth-object
demo authenticate-basic
s=$(legacy check "$CLIENT_ID" "$TOKEN"); expect_status "$s" 404 "observed check (fake has no legacy form)"
no_header deprecation "observed 404 (deprecation_headers is off by default)"
no_header link "observed 404 (deprecation_headers is off by default)"
s=$(legacy check "$CLIENT_ID" ""); expect_status "$s" 400 "malformed: empty token"
no_header deprecation "malformed 400 (deprecation_headers is off by default)"
settle # just after a scrape: the next one is about a second away
s=$(legacy check "Iv1.oneoff" "gho_oneoff"); expect_status "$s" 404 "one-off client"
for i in 1 2 3 4 5; do # a burst: all five calls before Prometheus first sees the series
  s=$(legacy check "Iv1.burst" "gho_burst"); expect_status "$s" 404 "burst client"
done
sleep 2.2 # past a scrape: Prometheus first sees Iv1.oneoff at 1 and Iv1.burst at 5
for i in 1 2 3 4 5 6; do
  s=$(legacy check "Iv1.steady" "gho_steady"); expect_status "$s" 404 "steady client"
  sleep 1.5
done
settle
# Iv1.steady's first call creates its series; the next five increase it. Iv1.oneoff called once
# and Iv1.burst five times within one scrape interval: rate() sees none of those calls.
steady_seen=$(awk -v p="$PROC" '$1 == p && $6 == "Iv1.steady"' "$TALLY" | wc -l)
demo_calls=$(awk -v p="$PROC" '$1 == p && $6 == "'"$CLIENT_ID"'"' "$TALLY" | wc -l)
check "deprecated calls per second by client_id, x300 = calls in 5 minutes" \
  'sum by (client_id) (rate(oauth_apps_gateway_deprecated_calls_by_client_total[5m]))' \
  "$(printf 'client_id=%s %s\nclient_id=Iv1.burst 0\nclient_id=Iv1.oneoff 0\nclient_id=Iv1.steady %s\n' \
      "$CLIENT_ID" "$(awk -v n=$((demo_calls - 1)) 'BEGIN{print n/300}')" \
      "$(awk -v n=$((steady_seen - 1)) 'BEGIN{print n/300}')" | LC_ALL=C sort)" 0.25 0.002
check "deprecated calls by client_id since the gateway started (exact)" \
  'sort_desc(sum by (client_id) (oauth_apps_gateway_deprecated_calls_by_client_total))' \
  "$(expect_clients_now)"
check "deprecated calls by operation and action (20 series, none limited)" \
  'sum by (operation, action) (increase(oauth_apps_gateway_deprecated_calls_total[1h]))' \
  "$(expect_by_op_action)" 0.05 0.5
check "legacy responses by status since the gateway started" \
  'sum by (status) (oauth_apps_gateway_responses_total{route="legacy"})' \
  "$(expect_legacy_status_now)"
check "query-parameter credentials moved into Authorization" \
  'sum by (kind) (increase(oauth_apps_gateway_query_credentials_total[1h]))' \
  "$(expect_by_column 7 kind access_token client_secret)" 0.05 0.5
# The limiter is off: its series exist from the start at 0 and stay there, 404s or not.
check "failures charged, by quota (limiter off: 0)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_total[1h]))' \
  "$(expect_failed_checks)"
check "somebody turned away in the last 5 minutes (nobody: no sample)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_rejected_total[5m])) > 0' ''
# 5 metrics x 3 quotas, the waits counter and the verified-credentials gauge.
[ "$(limiter_metrics | awk '$2 != 0')" = "" ] && [ "$(limiter_metrics | wc -l)" = 17 ] \
  && echo "ok    limiter off: all 17 failed_checks series on /metrics, at 0" \
  || { fail "limiter off: failed_checks series"; show "$(limiter_metrics)" >&2; }

# /legacy-clients agrees with the tally of this process.
report=$(curl -s "$ADMIN/legacy-clients")
echo "$report" >"$WORK/legacy-clients-observe.json"
want=$(awk -v p="$PROC" '$1 == p && $2 == "legacy" && $6 != "-" { n[$6 " " $3]++; t[$6]++ }
  END { for (k in n) print k, n[k]; for (c in t) print c, "total", t[c] }' "$TALLY" | LC_ALL=C sort)
got=$(jq -r '.clients[] | .client_id as $c | ((.calls | to_entries[] | select(.value > 0)
  | "\($c) \(.key) \(.value)"), "\($c) total \(.total)")' <<<"$report" | LC_ALL=C sort)
if [ "$want" = "$got" ] && jq -e '.max_client_ids == 1000 and .other == null
    and (.clients[0].first_seen | test("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"))' \
    <<<"$report" >/dev/null; then
  echo "ok    /legacy-clients matches the calls made"
else
  fail "/legacy-clients"; show "$report" >&2; show "$want" >&2
fi
grep -q 'action="observed"' "$WORK/gw-$PROC.log" || fail "no action=\"observed\" in the access log"
promtool_lint
stop_gateway

# Step 2: rewrite (the default), against a fresh fake so the seeded token is valid again.
# Limiter ON (the default): the demo's own reset replaces the token, so its first run makes 6
# token failures (200 200, then 404 x 6) and the second 8 more. Token failures are charged to the
# app's credential only, under the token quota (5,000 an hour by default): no 429. Deprecation
# headers are off (the default): @octokit/request prints no warning, so neither run writes the
# token or the secret to stderr (README "Tokens in app logs").
start_fake
start_gateway fake rewrite "" ""
demo auth-object
run1=$(jq -r .status "$WORK/demo.out" | xargs)
cp "$WORK/demo.err" "$WORK/demo-1.err"
demo authenticate-basic
run2=$(jq -r .status "$WORK/demo.out" | xargs)
s=$(legacy check "$CLIENT_ID" "gho_invalid")
expect_statuses "$run1 $run2 $s" "200 200 $(repeat 404 6) $(repeat 404 8) 404" \
  "demo.js twice, then an invalid token: token failures, never limited under the defaults"
no_header deprecation "rewritten 404 (deprecation_headers is off by default)"
warned=$(cat "$WORK/demo-1.err" "$WORK/demo.err" | grep -c '^\[@octokit/request\] ".*" is deprecated' || true)
[ "$warned" = 0 ] && echo "ok    @octokit/request prints no deprecation warning under the default" \
  || fail "@octokit/request warned $warned times with deprecation_headers off"
if grep -qF -e "$TOKEN" -e "$CLIENT_SECRET" "$WORK/demo-1.err" "$WORK/demo.err"; then
  fail "the legacy client printed the token or the secret under the default configuration"
else
  echo "ok    the legacy client printed neither the token nor the secret"
fi
s=$(legacy check "Iv1.unknown" "gho_invalid"); expect_status "$s" 404 "rewritten check, unknown app"
s=$(legacy check "$CLIENT_ID" ""); expect_status "$s" 400 "malformed: empty token"
s=$(other pass_through GET "/nope"); expect_status "$s" 404 "pass-through /nope"
grep -qi '^deprecation:' "$WORK/last-headers" && fail "Deprecation header on a pass-through call"
settle
check "5xx share of legacy responses (none)" "$ERROR_RATIO" '{} 0'
check "status-compatibility rewrites (none: the fake answers 404)" \
  'sum by (operation) (increase(oauth_apps_gateway_status_compat_rewrites_total[1h]))' \
  "$(expect_by_op '$8 == 1')" 0.05 0.5
check "deprecated calls by operation and action" \
  'sum by (operation, action) (increase(oauth_apps_gateway_deprecated_calls_total[1h]))' \
  "$(expect_by_op_action)" 0.05 0.5
check "deprecated calls by client_id since the gateway started (exact)" \
  'sort_desc(sum by (client_id) (oauth_apps_gateway_deprecated_calls_by_client_total))' \
  "$(expect_clients_now)"
check "failures charged, by quota (token failures only)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_total[1h]))' \
  "$(expect_failed_checks)" 0.05 0.5
check "somebody turned away in the last 5 minutes (nobody: no sample)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_rejected_total[5m])) > 0' \
  "$(expect_rejected | awk '$2 > 0')" 0.05 0.5
grep -q 'action="rewritten"' "$WORK/gw-$PROC.log" || fail "no action=\"rewritten\" in the access log"
grep -q 'action="malformed"' "$WORK/gw-$PROC.log" || fail "no action=\"malformed\" in the access log"
promtool_lint
stop_gateway

# Step 3: reject, with check still rewritten; deprecation headers on and a sunset date announced.
# Limiter ON (defaults): rejected calls are never charged and the demo's checks succeed, so the
# one token failure below (an invalid token) is all it counts; no 429.
start_fake
start_gateway fake reject $'deprecation_headers = true\nsunset_date = "2027-06-30"' "" check=rewrite
demo auth-object
demo authenticate-basic
# @octokit/request reads the headers and warns on stderr, with the URL it called.
grep -qF 'is deprecated. It is scheduled to be removed on Wed, 30 Jun 2027 00:00:00 GMT. See https://developer.github.com/changes/2020-02-14-deprecating-oauth-app-endpoint/' \
  "$WORK/demo.err" && echo "ok    @octokit/request warns about the Deprecation and Sunset headers" \
  || fail "no @octokit/request deprecation warning in $(head -3 "$WORK/demo.err")"
s=$(legacy reset "$CLIENT_ID" "$TOKEN"); expect_status "$s" 410 "rejected reset"
header_is deprecation "$DEPRECATION" "410"
header_is link "$LINK" "410"
header_is sunset "Wed, 30 Jun 2027 00:00:00 GMT" "410"
cp "$WORK/last-body" "$WORK/410-body.json"
jq -e '.message == "Gone: this deprecated endpoint is switched off. Use PATCH /applications/'"$CLIENT_ID"'/token with the token in a JSON body: {\"access_token\": \"...\"}." and .documentation_url == "https://docs.github.com/rest/apps/oauth-applications#reset-a-token"' \
  "$WORK/410-body.json" >/dev/null || fail "410 body: $(cat "$WORK/410-body.json")"
grep -qF "$TOKEN" "$WORK/410-body.json" && fail "410 body holds the token"
s=$(legacy check "$CLIENT_ID" "gho_invalid"); expect_status "$s" 404 "check still rewritten"
header_is sunset "Wed, 30 Jun 2027 00:00:00 GMT" "rewritten 404"
settle
check "rejected calls by operation" \
  'sum by (operation) (increase(oauth_apps_gateway_deprecated_calls_total{action="rejected"}[1h]))' \
  "$(expect_by_op '$4 == "rejected"')" 0.05 0.5
check "deprecated calls by client_id since the gateway started (exact)" \
  'sort_desc(sum by (client_id) (oauth_apps_gateway_deprecated_calls_by_client_total))' \
  "$(expect_clients_now)"
grep -q 'action="rejected"' "$WORK/gw-$PROC.log" || fail "no action=\"rejected\" in the access log"
promtool_lint

# /readyz turns 503 while draining; the request in flight still completes.
curl -s -o "$WORK/stream.out" "$GW/stream?chunks=10&size=10&delay_ms=300" &
stream_pid=$!
sleep 0.5
kill -TERM "$GW_PID"
wait_until 5 "/readyz 503 while draining" \
  sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' '$ADMIN/readyz')\" = 503 ]"
echo "ok    /readyz answers 503 while draining"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$ADMIN/livez")" = 200 ] || fail "/livez while draining"
wait "$stream_pid" || true
[ "$(wc -c <"$WORK/stream.out")" -eq 100 ] || fail "request in flight during the drain was cut"
record pass_through - - 200 - - - - -
stop_gateway

# Step 4: status compatibility and a hang-up, against the stub (422 to everything). Limiter ON
# (defaults): the three checks, the reset and the direct call are 5 token failures (a 422 counts,
# though the legacy app sees 404), far under the token quota: no 429.
start_gateway stub rewrite "" ""
for i in 1 2 3; do
  s=$(legacy check "$CLIENT_ID" "gho_x$i"); expect_status "$s" 404 "422 to a rewritten check"
done
jq -e '.message == "Validation Failed"' "$WORK/last-body" >/dev/null || fail "upstream body not kept"
s=$(legacy reset "$CLIENT_ID" "gho_x"); expect_status "$s" 404 "422 to a rewritten reset"
s=$(other token_api POST "/applications/$CLIENT_ID/token" -H 'Content-Type: application/json' \
  -d '{"access_token":"gho_x"}'); expect_status "$s" 422 "token_api keeps 422"
s=$(legacy check "drop" "gho_x"); expect_status "$s" 502 "upstream hangs up on a legacy call"
s=$(other pass_through GET "/drop"); expect_status "$s" 502 "upstream hangs up"
settle
check "status-compatibility rewrites by operation" \
  'sum by (operation) (increase(oauth_apps_gateway_status_compat_rewrites_total[1h]))' \
  "$(expect_by_op '$8 == 1')" 0.05 0.5
promtool_lint
stop_gateway

# Step 5: upstream failures of every kind. Limiter ON (defaults): a 502 or 504 is the gateway's
# own answer, never a failure charged. Deprecation headers on for the first run: the gateway's own
# errors carry them too.
start_gateway dead rewrite 'deprecation_headers = true' ""
s=$(legacy check "$CLIENT_ID" "gho_x"); expect_status "$s" 502 "connect failure"
header_is deprecation "$DEPRECATION" "502 on a legacy call"
s=$(legacy revoke_grant "$CLIENT_ID" "gho_x"); expect_status "$s" 502 "connect failure"
s=$(other pass_through GET "/user"); expect_status "$s" 502 "connect failure"
settle; stop_gateway
start_gateway tls rewrite "" ""
s=$(legacy check "$CLIENT_ID" "gho_x"); expect_status "$s" 502 "TLS failure"
settle; stop_gateway
start_gateway timeout rewrite "" ""
for i in 1 2 3; do
  s=$(other pass_through GET "/slow"); expect_status "$s" 504 "timeout"
done
settle
check "upstream failures by kind" \
  'sum by (kind) (increase(oauth_apps_gateway_upstream_failures_total[1h]))' \
  "$(expect_by_column 9 kind connect tls timeout protocol)" 0.05 0.5
# 5xx series appear with their first 5xx, and rate() cannot see what came before Prometheus's
# first sample of a series: the share may be understated, never overstated.
share=$(awk '$2 == "legacy" { n++; if ($5 ~ /^5/) e++ } END { print e / n }' "$TALLY")
check_that "5xx share of legacy responses (after failures)" "$ERROR_RATIO" \
  "\$2 > 0 && \$2 <= $share * 1.1 + 0.002" "above 0, at most the true share $share"
check_that "p95 time to response head by route" \
  'histogram_quantile(0.95, sum by (route, le) (rate(oauth_apps_gateway_request_duration_seconds_bucket[5m])))' \
  '($1 == "route=pass_through" && $2 >= 1 && $2 <= 2.5) || ($1 != "route=pass_through" && $2 > 0 && $2 < 0.5)' \
  "pass_through includes the 1 s timeouts, the others are fast"
check_that "p95 upstream time to response head by route" \
  'histogram_quantile(0.95, sum by (route, le) (rate(oauth_apps_gateway_upstream_duration_seconds_bucket[5m])))' \
  '$2 > 0 && $2 < 0.5' "timeouts are not upstream answers"
promtool_lint
stop_gateway

# Step 6: the failed-check limiter with its defaults, against a fresh fake (README "Limiting failed
# token checks"). Limiter ON, with trusted_proxies = ["127.0.0.1"] as in README's "Trying it", so
# that curl can name the client address in X-Forwarded-For; deprecation headers on, to check that
# a 429 to a legacy call carries them. Each block below uses its own credentials and addresses, so
# one block's failures do not spend another's quota; reset is observed (an override) for the
# observe-mode block only.
start_fake
start_gateway fake rewrite 'deprecation_headers = true' 'trusted_proxies = ["127.0.0.1"]' reset=observe

# README "Trying it", call for call, from 203.0.113.7. The address regains one failure every 2 s:
# exact statuses are asserted when the 30 credential failures came within 1.8 s of the first.
X='X-Forwarded-For: 203.0.113.7'
t_first=$(now)
got=""
for i in $(seq 11); do got+="$(SECRET=wrong legacy check "$CLIENT_ID" "$TOKEN" -H "$X") "; done
expect_statuses "$got" "$(repeat 401 10) 429" "eleven checks with one wrong secret from 203.0.113.7"
expect_429 "$(last_word "$got")" credential:credential 5 6 "the eleventh: its credential is spent"
header_is deprecation "$DEPRECATION" "429 to a legacy call"
header_is link "$LINK" "429 to a legacy call"
s=$(legacy check "$CLIENT_ID" "$TOKEN" -H "$X")
expect_status "$s" 200 "the app's own credential, from the same address"
got=""
for i in $(seq 21); do got+="$(SECRET="guess$i" legacy check "$CLIENT_ID" "$TOKEN" -H "$X") "; done
in_time=$(awk -v a="$t_first" -v b="$(now)" 'BEGIN { print (b - a < 1.8) ? 1 : 0 }')
if [ "$in_time" = 1 ]; then
  expect_statuses "$got" "$(repeat 401 20) 429" "21 new secrets from 203.0.113.7"
  expect_429 "$(last_word "$got")" credential:client_ip 1 2 "the 21st: the address has had its 30"
else
  echo "note: the guesses took 1.8 s or more; the address's outcomes counted as they came ($got)"
fi
s=$(legacy check "$CLIENT_ID" "$TOKEN" -H "$X")
expect_status "$s" 200 "the verified app, from its spent address"
got=""
for i in 1 2 3; do got+="$(legacy check "$CLIENT_ID" "gho_revoked$i" -H "$X") "; done
expect_statuses "$got" "404 404 404" "three token failures for the app"
snapshot=$(limiter_metrics)
want=$(LC_ALL=C sort <<'EOF'
oauth_apps_gateway_failed_checks_total{class="credential",key_kind="client_ip"} 30
oauth_apps_gateway_failed_checks_total{class="credential",key_kind="credential"} 30
oauth_apps_gateway_failed_checks_total{class="token",key_kind="credential"} 3
oauth_apps_gateway_failed_checks_rejected_total{class="credential",key_kind="client_ip"} 1
oauth_apps_gateway_failed_checks_rejected_total{class="credential",key_kind="credential"} 1
oauth_apps_gateway_failed_checks_rejected_total{class="token",key_kind="credential"} 0
oauth_apps_gateway_failed_checks_shadow_rejected_total{class="credential",key_kind="client_ip"} 0
oauth_apps_gateway_failed_checks_shadow_rejected_total{class="credential",key_kind="credential"} 0
oauth_apps_gateway_failed_checks_shadow_rejected_total{class="token",key_kind="credential"} 0
oauth_apps_gateway_failed_checks_untracked_total{class="credential",key_kind="client_ip"} 0
oauth_apps_gateway_failed_checks_untracked_total{class="credential",key_kind="credential"} 0
oauth_apps_gateway_failed_checks_untracked_total{class="token",key_kind="credential"} 0
oauth_apps_gateway_failed_checks_tracked_keys{class="credential",key_kind="client_ip"} 1
oauth_apps_gateway_failed_checks_tracked_keys{class="credential",key_kind="credential"} 21
oauth_apps_gateway_failed_checks_tracked_keys{class="token",key_kind="credential"} 1
oauth_apps_gateway_failed_checks_verified_credentials 1
oauth_apps_gateway_failed_checks_waits_total 0
EOF
)
if [ "$in_time" = 0 ]; then
  echo "note: /metrics after \"Trying it\" not compared (the guesses were slow)"
elif [ "$snapshot" = "$want" ]; then
  echo "ok    /metrics after \"Trying it\": 30/30/3 failures, 1 rejected per credential-class quota, 21/1/1 keys, 1 verified"
else
  fail "/metrics after \"Trying it\""; show "$snapshot" >&2
fi
s=$(other token_api POST "/applications/$CLIENT_ID/token" -u "$CLIENT_ID:wrong" \
  -H 'Content-Type: application/json' -H 'X-Forwarded-For: 198.51.100.21' -d "{\"access_token\":\"$TOKEN\"}")
expect_429 "$s" credential:credential 1 6 "the spent credential from another address, replacement endpoint"
settle # seconds after the last failures: the credential-class keys have not recovered
# The token-failure key (3 failures, one regained per 720 ms) may already be dropped.
check_that "keys tracked per quota (after \"Trying it\")" 'oauth_apps_gateway_failed_checks_tracked_keys' \
  '($1 == "class=credential,key_kind=client_ip" && $2 == 1) || ($1 == "class=credential,key_kind=credential" && $2 == 21) || ($1 == "class=token,key_kind=credential" && $2 <= 1)' \
  "21 credentials and 1 address for credential failures, at most 1 credential for token failures"
check "a table close to full (none is)" 'oauth_apps_gateway_failed_checks_tracked_keys >= 90000' ''
grep -qF "failed-check quota spent class=\"credential\" key_kind=\"credential\" client_id=$CLIENT_ID" "$WORK/gw-$PROC.log" \
  && grep -qE "failed-check quota: answered 429 class=\"credential\" key_kind=\"credential\" reason=\"spent\" client_id=${CLIENT_ID//./\\.} retry_after_seconds=[56]( |\$)" "$WORK/gw-$PROC.log" \
  && grep -qF "action=\"limited\" status=429 outcome=\"answered\"" "$WORK/gw-$PROC.log" \
  && echo "ok    the log names the spent quota, each 429 and the limited call" \
  || fail "limiter log lines missing from $WORK/gw-$PROC.log"

# Mode observe on an upstream without the legacy form: every call 404s, a token failure each,
# far under the token quota: no 429 (README, Migrating step by step, step 1).
got=""
for i in $(seq 11); do
  got+="$(legacy reset Iv1.observe "gho_o$i" -H 'X-Forwarded-For: 203.0.113.9') "
done
expect_statuses "$got" "$(repeat 404 11)" "observed resets for Iv1.observe: token failures, not limited"
settle # Prometheus must see this process's last counts before it stops
promtool_lint
stop_gateway

# Step 7: concurrent guesses and calls that are not token operations. Limiter ON (defaults) with
# trusted_proxies = ["127.0.0.1"], against the stub, which answers Iv1.slow's calls 401 after 1 s:
# 100 concurrent checks with one wrong secret from one address. At most as many are in flight as
# the credential has failures left (10); the others wait at the gate, and once the ten are
# charged the credential is spent: 90 answers 429, and only 10 calls reach the upstream (README
# "Calls in flight").
start_gateway stub rewrite "" 'trusted_proxies = ["127.0.0.1"]'
cat >"$WORK/burst.js" <<'EOF'
// node burst.js URL_PREFIX N X_FORWARDED_FOR USER:PASS: N GETs of URL_PREFIX<i> at once, each on
// its own connection; prints "status<TAB>message" per answer (message: 429s only).
const http = require("http");
const [prefix, n, xff, auth] = process.argv.slice(2);
const out = []; let left = Number(n);
const done = (line) => { out.push(line); if (--left === 0) { console.log(out.join("\n")); } };
for (let i = 0; i < Number(n); i++) {
  const req = http.request(prefix + i, { agent: false, timeout: 20000, headers: {
      "x-forwarded-for": xff, authorization: "Basic " + Buffer.from(auth).toString("base64") } },
    (res) => { let b = ""; res.setEncoding("utf8"); res.on("data", (d) => { b += d; });
      res.on("end", () => {
        let m = ""; if (res.statusCode === 429) { try { m = JSON.parse(b).message; } catch (_) {} }
        done(res.statusCode + "\t" + m); }); });
  req.on("timeout", () => req.destroy(new Error("timeout")));
  req.on("error", (e) => done("error\t" + e.message));
  req.end();
}
EOF
timeout 30 node "$WORK/burst.js" "$GW/applications/Iv1.slow/tokens/gho_slow" 100 192.0.2.100 \
  "Iv1.slow:x" >"$WORK/burst.out" || die "burst.js failed"
while IFS=$'\t' read -r st msg; do
  [ "$st" != error ] || die "burst.js: $msg"
  action=rewritten; [ "$st" = 429 ] && action=limited
  record legacy check "$action" "$st" Iv1.slow - $(outcome "$action" "$st") \
    "$(lim_col legacy "$action" "$st" /applications/Iv1.slow/tokens/x "$msg")"
done <"$WORK/burst.out"
expect_statuses "$(cut -f1 "$WORK/burst.out" | sort -n | xargs)" "$(repeat 401 10) $(repeat 429 90)" \
  "100 concurrent checks with one wrong secret for Iv1.slow"
reached=$(curl -s "http://127.0.0.1:$STUB_PORT/__count")
[ "$reached" = 10 ] && echo "ok    10 reached the upstream (the credential's burst); the 429s did not" \
  || fail "the stub saw $reached calls for Iv1.slow, expected 10"
waits=$(curl -s "$ADMIN/metrics" | awk '$1 == "oauth_apps_gateway_failed_checks_waits_total" { print $2 }')
[ "${waits:-0}" -gt 0 ] 2>/dev/null && echo "ok    $waits calls waited at the gate" \
  || fail "failed_checks_waits_total is '${waits:-}', expected more than 0"
s=$(SECRET=x legacy check Iv1.slow gho_slow_next -H 'X-Forwarded-For: 198.51.100.30')
expect_429 "$s" credential:credential 5 6 "the same credential from another address"
# Every call to one app's OAuth Applications API is held, not only token operations; another
# credential naming the same app is not.
for i in $(seq 10); do
  s=$(other pass_through GET "/applications/Iv1.secret/unauthorized" -u "Iv1.secret:same" \
    -H 'X-Forwarded-For: 192.0.2.101')
  expect_status "$s" 401 "a wrong client secret on a call that is not a token operation"
done
s=$(other pass_through GET "/applications/Iv1.secret/unauthorized" -u "Iv1.secret:same" \
  -H 'X-Forwarded-For: 192.0.2.101')
expect_429 "$s" credential:credential 5 6 "the eleventh: the credential is spent, on any route"
s=$(other pass_through GET "/applications/Iv1.secret/unauthorized" -u "Iv1.secret:other" \
  -H 'X-Forwarded-For: 192.0.2.101')
expect_status "$s" 401 "another credential naming the same app is forwarded"
settle # seconds after the last failures: no key here has recovered
check "keys tracked per quota (Iv1.slow:x, Iv1.secret:same, Iv1.secret:other; 192.0.2.100, 192.0.2.101)" \
  'oauth_apps_gateway_failed_checks_tracked_keys' \
  "$(printf 'class=credential,key_kind=client_ip 2\nclass=credential,key_kind=credential 3\nclass=token,key_kind=credential 0\n')"
grep -qE 'failed-check quota: answered 429 class="credential" key_kind="credential" reason="spent" client_id=Iv1\.slow retry_after_seconds=[56]( |$)' "$WORK/gw-$PROC.log" \
  && echo "ok    the log has the 429s for Iv1.slow's spent credential" \
  || fail "no 429 line for Iv1.slow in $WORK/gw-$PROC.log"
promtool_lint
stop_gateway

# Step 8: shadow mode, against the fake, with a credential burst of 3: six checks with one wrong
# secret all reach the upstream (401); the last three are what enforce would have refused, counted
# and logged, and charged to nothing (README "Shadow mode").
start_gateway fake rewrite "" $'mode = "shadow"\ncredential_burst = 3'
got=""
for i in 1 2 3; do got+="$(SECRET=stale legacy check "$CLIENT_ID" "gho_s$i") "; done
for i in 4 5 6; do
  got+="$(SECRET=stale LIM_OVERRIDE=shadow:credential:credential legacy check "$CLIENT_ID" "gho_s$i") "
done
expect_statuses "$got" "$(repeat 401 6)" "shadow mode forwards every call"
no_header retry-after "shadow mode"
snapshot=$(limiter_metrics \
  | grep -E '^oauth_apps_gateway_failed_checks_(total|rejected_total|shadow_rejected_total)\{class="credential",key_kind="credential"\}')
want=$(LC_ALL=C sort <<'EOF'
oauth_apps_gateway_failed_checks_rejected_total{class="credential",key_kind="credential"} 0
oauth_apps_gateway_failed_checks_shadow_rejected_total{class="credential",key_kind="credential"} 3
oauth_apps_gateway_failed_checks_total{class="credential",key_kind="credential"} 3
EOF
)
[ "$snapshot" = "$want" ] && echo "ok    shadow: 3 charged, 3 would-be 429s, none sent" \
  || { fail "shadow-mode counters"; show "$snapshot" >&2; }
grep -qF "failed-check quota spent; forwarded (shadow mode), enforce would answer 429 class=\"credential\" key_kind=\"credential\" client_id=$CLIENT_ID retry_after_seconds=" "$WORK/gw-$PROC.log" \
  && echo "ok    the log has the shadow-mode line" \
  || fail "no shadow-mode line in $WORK/gw-$PROC.log"
settle

# The whole run, over every gateway process (the limiter was off in step 1 only).
check "failures charged, by quota (whole run)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_total[1h]))' \
  "$(expect_failed_checks)" 0.05 0.5
check "calls answered 429, by quota (whole run)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_rejected_total[1h]))' \
  "$(expect_rejected)" 0.05 0.5
check "somebody turned away in the last 5 minutes (the credential-class quotas)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_rejected_total[5m])) > 0' \
  "$(expect_rejected | awk '$2 > 0')" 0.05 0.5
check "shadow mode's would-be 429s, by quota (whole run)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_shadow_rejected_total[1h]))' \
  "$(expect_shadow)" 0.05 0.5
check "failures a full table could not track (none)" \
  'sum by (class, key_kind) (increase(oauth_apps_gateway_failed_checks_untracked_total[1h])) > 0' ''
check "legacy calls answered 429, by operation (whole run)" \
  'sum by (operation) (increase(oauth_apps_gateway_deprecated_calls_total{action="limited"}[1h]))' \
  "$(expect_by_op '$4 == "limited"')" 0.05 0.5
check "deprecated calls by operation and action (whole run)" \
  'sum by (operation, action) (increase(oauth_apps_gateway_deprecated_calls_total[1h]))' \
  "$(expect_by_op_action)" 0.05 0.5
check "deprecated calls so far" \
  'sum(increase(oauth_apps_gateway_deprecated_calls_total[7d]))' "{} $(total_legacy)" 0.05 0.5
check "operations without deprecated calls (none)" \
  'sum by (operation) (increase(oauth_apps_gateway_deprecated_calls_total[7d])) == 0' ''
check "gateway restarts seen by Prometheus" \
  "changes(process_start_time_seconds{job=\"$JOB\"}[1h])" "{} $((PROC - 1))"
check "running version" 'oauth_apps_gateway_build_info' \
  "version=$(awk -F'"' '/^version/ {print $2; exit}' "$ROOT/Cargo.toml") 1"
promtool_lint
stop_gateway

# Every query in README's ```promql blocks was run above.
missing=$(awk '/^```promql/ { on = 1; next } /^```/ { on = 0 } on && !/^#/ && NF' "$README" \
  | sort -u | comm -23 - <(sort -u "$CHECKED"))
[ -z "$missing" ] || { fail "README queries this script does not check:"; show "$missing" >&2; }
[ $((SECONDS - T0)) -lt 270 ] || echo "note: the run took over 4.5 minutes; [5m] windows no longer cover it all"

if [ "$FAILURES" -gt 0 ]; then
  echo "$FAILURES check(s) failed" >&2
  exit 1
fi
echo "all checks passed ($(total_legacy) deprecated calls over $PROC gateway processes)"
