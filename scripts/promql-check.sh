#!/usr/bin/env bash
# Proves README.md's PromQL against a running gateway. Starts, on 127.0.0.1 only: the fake GitHub
# (examples/fake-github.rs), a tiny node upstream that answers 422 or hangs up, the gateway
# (restarted for each migration step: observe, rewrite, reject with an override, then upstream
# failures) and a Prometheus server scraping the gateway's admin /metrics every second. Traffic
# comes from the real legacy client (tests/legacy-client/demo.js, both auth styles) and curl.
# Every query in README's ```promql blocks is run through Prometheus's HTTP API and its answer
# checked against what this script sent; `promtool check metrics` runs on the scrapes.
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

start_stub() { # answers every request 422 (GitHub's validation error), hangs up on paths with /drop
  cat >"$WORK/stub.js" <<'EOF'
const http = require("http");
const body = JSON.stringify({ message: "Validation Failed",
  errors: [{ resource: "OauthAccess", code: "invalid" }], documentation_url: "https://docs.github.com/rest" });
http.createServer((req, res) => {
  if (req.url.includes("/drop")) { req.socket.destroy(); return; }
  req.resume();
  req.on("end", () => { res.writeHead(422, { "content-type": "application/json; charset=utf-8" }); res.end(body); });
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

start_gateway() { # start_gateway UPSTREAM MODE MIGRATION_TOML [op=mode...]
  # UPSTREAM: fake | stub | dead (nothing listens) | tls (https to the fake's plain port) |
  # timeout (the fake, with request_timeout = "1s")
  local kind="$1" mode="$2" extra="$3" url op o server=""; shift 3
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
  echo "== gateway $PROC: upstream $kind, mode $mode${*:+, overrides $*}"
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
TALLY="$WORK/tally"; : >"$TALLY"
record() { echo "$PROC $*" >>"$TALLY"; }

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

legacy() { # legacy OP CLIENT_ID TOKEN [curl args]: one legacy call with curl, tallied
  local op="$1" cid="$2" token="$3" method path action status qcred="-"; shift 3
  case "$op" in
    check) method=GET path="tokens" ;; reset) method=POST path="tokens" ;;
    revoke_token) method=DELETE path="tokens" ;; revoke_grant) method=DELETE path="grants" ;;
  esac
  action=$(action_of "$op")
  [ -n "$token" ] && [ -n "$cid" ] || action=malformed
  status=$(curl -s -o "$WORK/last-body" -D "$WORK/last-headers" -w '%{http_code}' -X "$method" \
    -u "${cid:-x}:$CLIENT_SECRET" "$@" "$GW/applications/$cid/$path/$token")
  # Forwarded calls only: a rejected, malformed or 429 call never reaches the credential step.
  if [ "$action" != malformed ] && [ "$action" != rejected ] && [ "$status" != 429 ]; then
    case "$*" in *client_secret=*) qcred=client_secret ;; *access_token=*) qcred=access_token ;; esac
  fi
  local cid_col="${cid:--}"; [ "$action" = malformed ] && cid_col="-"
  record legacy "$op" "$action" "$status" "$cid_col" "$qcred" $(outcome "$action" "$status")
  echo "$status"
}

other() { # other ROUTE METHOD PATH [curl args]: a pass-through or token-API call, tallied
  local route="$1" method="$2" path="$3" status qcred="-"; shift 3
  status=$(curl -s -o "$WORK/last-body" -D "$WORK/last-headers" -w '%{http_code}' -X "$method" \
    "$@" "$GW$path")
  case "$path" in *access_token=*) qcred=access_token ;; *client_secret=*) qcred=client_secret ;; esac
  record "$route" - - "$status" - "$qcred" $(outcome - "$status")
  echo "$status"
}

demo() { # demo AUTH_STYLE [ONLY]: the real legacy client; every call it makes is tallied
  local style="$1" only="${2:-}" line name op action status qcred
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
    action=$(action_of "$op"); qcred="-"
    # @octokit/rest 16 with auth: { clientId, clientSecret } sends them as query parameters on
    # revokeGrantForApplication; a forwarded call has them moved into Authorization and counted.
    if [ "$style" = auth-object ] && [ "$op" = revoke_grant ] && [ "$action" != rejected ] \
        && [ "$status" != 429 ]; then
      qcred=client_secret
    fi
    record legacy "$op" "$action" "$status" "$CLIENT_ID" "$qcred" $(outcome "$action" "$status")
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
# $7 query credential $8 status compat $9 failure kind.
expect_by_op_action() { # every operation x action series exists (pre-created at 0)
  awk -v ops="$OPS" '$2 == "legacy" { n[$3 "," $4]++ }
    END { split(ops, o, " "); split("malformed observed rejected rewritten", a, " ")
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

expect_status() { # expect_status GOT WANT WHAT
  [ "$1" = "$2" ] && return 0
  # The failed-check limiter (on by default) answers a token operation 429 once a client_id or
  # address has failed too often; the tally records what the client got, so counts stay right.
  if [ "$1" = 429 ] && grep -qi '^retry-after:' "$WORK/last-headers"; then
    echo "      ($3: 429 from the failed-check limiter instead of $2)"
    return 0
  fi
  fail "$3: status $1, expected $2"
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
start_gateway fake observe ""

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
header_is deprecation "$DEPRECATION" "observed 404"
header_is link "$LINK" "observed 404"
s=$(legacy check "$CLIENT_ID" ""); expect_status "$s" 400 "malformed: empty token"
header_is deprecation "$DEPRECATION" "malformed 400"
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
check "deprecated calls by operation and action" \
  'sum by (operation, action) (increase(oauth_apps_gateway_deprecated_calls_total[1h]))' \
  "$(expect_by_op_action)" 0.05 0.5
check "legacy responses by status since the gateway started" \
  'sum by (status) (oauth_apps_gateway_responses_total{route="legacy"})' \
  "$(expect_legacy_status_now)"
check "query-parameter credentials moved into Authorization" \
  'sum by (kind) (increase(oauth_apps_gateway_query_credentials_total[1h]))' \
  "$(expect_by_column 7 kind access_token client_secret)" 0.05 0.5

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
start_fake
start_gateway fake rewrite ""
demo auth-object
demo authenticate-basic
s=$(legacy check "$CLIENT_ID" "gho_invalid"); expect_status "$s" 404 "rewritten check, invalid token"
header_is deprecation "$DEPRECATION" "rewritten 404"
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
grep -q 'action="rewritten"' "$WORK/gw-$PROC.log" || fail "no action=\"rewritten\" in the access log"
grep -q 'action="malformed"' "$WORK/gw-$PROC.log" || fail "no action=\"malformed\" in the access log"
promtool_lint
stop_gateway

# Step 3: reject, with check still rewritten; a sunset date is announced.
start_fake
start_gateway fake reject 'sunset_date = "2027-06-30"' check=rewrite
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
record pass_through - - 200 - - - -
stop_gateway

# Step 4: status compatibility and a hang-up, against the stub (422 to everything).
start_gateway stub rewrite ""
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

# Step 5: upstream failures of every kind.
start_gateway dead rewrite ""
s=$(legacy check "$CLIENT_ID" "gho_x"); expect_status "$s" 502 "connect failure"
header_is deprecation "$DEPRECATION" "502 on a legacy call"
s=$(legacy revoke_grant "$CLIENT_ID" "gho_x"); expect_status "$s" 502 "connect failure"
s=$(other pass_through GET "/user"); expect_status "$s" 502 "connect failure"
settle; stop_gateway
start_gateway tls rewrite ""
s=$(legacy check "$CLIENT_ID" "gho_x"); expect_status "$s" 502 "TLS failure"
settle; stop_gateway
start_gateway timeout rewrite ""
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
