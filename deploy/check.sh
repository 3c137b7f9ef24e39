#!/usr/bin/env bash
# Validates every file in deploy/, offline, with the tools its caller installed (deploy/README.md,
# "What is checked"): hadolint, kustomize (Debian's kubectl 1.20, fetched with apt-get download
# unless KUBECTL names one) with kubernetes-validate and the CRD schema in
# deploy/kubernetes/schemas, systemd-analyze, promtool, the dashboard's JSON and metric names,
# and the Debian package built with cargo deb, installed with dpkg -i, checked, and purged.
#
#   bash deploy/check.sh                          # from anywhere; needs root for dpkg
#   METRICS_SCRAPE=scrape.txt bash deploy/check.sh   # also: every metric name queried is in it
#
# Environment: PYTHON (default python3, with kubernetes-validate installed), KUBECTL (a kubectl
# with `kustomize`; default: Debian's kubernetes-client, unpacked into a temporary directory),
# CARGO_TARGET_DIR (reused for the release build). Nothing is left behind: the package is purged,
# a system user the package created is removed, temporary files are deleted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
installed_here=""   # set once dpkg -i of our package succeeded
user_created=""     # set when the package created the system user
cleanup() {
  if [[ -n "$installed_here" ]]; then
    dpkg -P oauth-apps-gateway >/dev/null 2>&1 || echo "check.sh: could not purge oauth-apps-gateway" >&2
  fi
  if [[ -n "$user_created" ]] && getent passwd oauth-apps-gateway >/dev/null; then
    userdel oauth-apps-gateway 2>/dev/null || true
    if getent group oauth-apps-gateway >/dev/null; then groupdel oauth-apps-gateway 2>/dev/null || true; fi
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() { echo "FAILED: $*" >&2; exit 1; }
timings=()
step_name=""
step_start=0
step() {
  finish_step
  step_name="$1"
  step_start="$(date +%s%N)"
  echo
  echo "== $step_name"
}
finish_step() {
  if [[ -n "$step_name" ]]; then
    local ms=$(( ($(date +%s%N) - step_start) / 1000000 ))
    timings+=("$(printf '%6d.%d s  %s' $((ms / 1000)) $((ms % 1000 / 100)) "$step_name")")
    step_name=""
  fi
}
# Runs a validator; any output on stderr fails it too (systemd-analyze warns there, exit 0).
no_stderr() {
  local err="$tmp/stderr"
  "$@" 2>"$err" || { cat "$err" >&2; fail "$*"; }
  if [[ -s "$err" ]]; then cat "$err" >&2; fail "$* wrote to stderr (a warning counts as a failure)"; fi
}

step "tools"
missing=()
for tool in hadolint kubernetes-validate systemd-analyze promtool cargo-deb dpkg-deb openssl timeout; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
"$PYTHON" -c 'import kubernetes_validate, jsonschema, yaml, tomllib' 2>/dev/null \
  || missing+=("$PYTHON with kubernetes-validate (pip), PyYAML, jsonschema, tomllib (3.11+)")
if (( ${#missing[@]} )); then
  fail "missing: ${missing[*]} (install lines: deploy/README.md, What is checked)"
fi
hadolint --version
echo "kubernetes-validate $(kubernetes-validate --version)"
promtool --version 2>&1 | head -1
systemd-analyze --version | head -1
cargo deb --version

step "Dockerfile: hadolint"
timeout 60 hadolint deploy/Dockerfile || fail "hadolint deploy/Dockerfile"
echo "hadolint: no findings (the image itself is not built here: no container engine)"

step "Debian package: cargo deb (release build)"
target_dir="$(cargo metadata --format-version 1 --no-deps --locked \
  | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
timeout 1800 cargo deb --locked --output "$tmp/" || fail "cargo deb"
deb="$(ls "$tmp"/oauth-apps-gateway_*.deb)"
gateway="$target_dir/release/oauth-apps-gateway"
dpkg-deb --info "$deb" | sed -n '/Package:/,/Description:/p'
dpkg-deb --contents "$deb" | awk '{ print $1, $6 }'

step "container image config: the Dockerfile's rewrite of config.toml"
# The Dockerfile's build step turns these two lines of config.toml into 0.0.0.0 listeners (and
# fails when they are not there); the result must be a valid configuration.
for addr in 127.0.0.1:8080 127.0.0.1:9090; do
  [[ "$(grep -cx "listen = \"$addr\"" config.toml)" == 1 ]] \
    || fail "config.toml must have exactly one line 'listen = \"$addr\"' (deploy/Dockerfile rewrites it)"
done
sed -e 's/^listen = "127\.0\.0\.1:\(8080\|9090\)"$/listen = "0.0.0.0:\1"/' config.toml >"$tmp/image-config.toml"
"$gateway" --config "$tmp/image-config.toml" --check-config || fail "the image's config"

step "Kubernetes: kustomize build, kubernetes-validate --strict, CRD schema, policy"
if [[ -z "${KUBECTL:-}" ]]; then
  # Debian's kubectl 1.20 (kustomize v2 inside), unpacked, not installed: it would conflict
  # with another kubectl on the machine, and the oldest kustomize is the one to stay within.
  mkdir -p "$tmp/kubectl"
  (cd "$tmp/kubectl" && timeout 120 apt-get download -q -o APT::Sandbox::User=root kubernetes-client >/dev/null) \
    || fail "apt-get download kubernetes-client (run apt-get update first)"
  dpkg-deb -x "$tmp"/kubectl/kubernetes-client_*.deb "$tmp/kubectl/root"
  KUBECTL="$tmp/kubectl/root/usr/bin/kubectl"
fi
"$KUBECTL" version --client 2>/dev/null | head -1
rendered="$tmp/kubernetes.yaml"
timeout 60 "$KUBECTL" kustomize deploy/kubernetes >"$rendered" || fail "kubectl kustomize deploy/kubernetes"
grep -E '^kind:' "$rendered" | sort | uniq -c
for k8s in 1.30.0 1.37.0; do
  # Kubernetes' own kinds; ServiceMonitor has no schema here (a WARN), see the next command.
  timeout 120 kubernetes-validate --strict --kubernetes-version "$k8s" "$rendered" \
    || fail "kubernetes-validate --strict -k $k8s"
done
timeout 120 "$PYTHON" deploy/kubernetes/schemas/validate_custom_resources.py 1.37.0 "$rendered" \
  || fail "custom resources against deploy/kubernetes/schemas"
"$PYTHON" deploy/kubernetes/check_policy.py "$rendered" || fail "deploy/kubernetes/check_policy.py"
# The Redis for [shared] (deploy/kubernetes/redis): Kubernetes' own kinds only.
rendered_redis="$tmp/kubernetes-redis.yaml"
timeout 60 "$KUBECTL" kustomize deploy/kubernetes/redis >"$rendered_redis" \
  || fail "kubectl kustomize deploy/kubernetes/redis"
grep -E '^kind:' "$rendered_redis" | sort | uniq -c
for k8s in 1.30.0 1.37.0; do
  timeout 120 kubernetes-validate --strict --kubernetes-version "$k8s" "$rendered_redis" \
    || fail "kubernetes-validate --strict -k $k8s (redis)"
done
grep -q 'redis_url = "redis://oauth-apps-gateway-redis:6379/0"' deploy/kubernetes/config.toml \
  || fail "deploy/kubernetes/config.toml does not point shared.redis_url at deploy/kubernetes/redis's Service"
# The ConfigMap's config.toml, with a throwaway certificate where the Secret is mounted.
mkdir -p "$tmp/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=oauth-apps-gateway -keyout "$tmp/tls/tls.key" -out "$tmp/tls/tls.crt" 2>/dev/null \
  || fail "openssl: throwaway certificate"
sed "s#/etc/oauth-apps-gateway-tls/#$tmp/tls/#" deploy/kubernetes/config.toml >"$tmp/k8s-config.toml"
"$gateway" --config "$tmp/k8s-config.toml" --check-config || fail "deploy/kubernetes/config.toml"

step "systemd: systemd-analyze verify and security"
# verify wants the ExecStart binary to exist: a copy of the unit names the one just built
# (nothing else changes); the installed unit is verified as packaged in the last step.
mkdir -p "$tmp/unit"
sed "s#/usr/bin/oauth-apps-gateway#$gateway#g" deploy/systemd/oauth-apps-gateway.service \
  >"$tmp/unit/oauth-apps-gateway.service"
no_stderr timeout 60 systemd-analyze verify "$tmp/unit/oauth-apps-gateway.service"
echo "systemd-analyze verify: clean"
# 1.2 ("OK") today; --threshold fails the step if a change makes it worse.
timeout 60 systemd-analyze security --offline=true --threshold=12 \
  deploy/systemd/oauth-apps-gateway.service >"$tmp/security.txt" 2>&1 \
  || { cat "$tmp/security.txt"; fail "systemd-analyze security: exposure above 1.2"; }
grep 'Overall exposure level' "$tmp/security.txt"

step "Prometheus: promtool check config, check rules, test rules"
timeout 60 promtool check config deploy/prometheus/prometheus.yml || fail "promtool check config"
timeout 60 promtool check rules deploy/prometheus/alerts.yml || fail "promtool check rules"
(cd deploy/prometheus && timeout 120 promtool test rules alerts_test.yml) || fail "promtool test rules"
# Every alert has a test that fires it.
while read -r alert; do
  grep -q "alertname: $alert$" deploy/prometheus/alerts_test.yml || fail "alert $alert has no unit test"
done < <(sed -n 's/^ *- alert: *//p' deploy/prometheus/alerts.yml)

step "Grafana: dashboard JSON, its queries, metric names"
"$PYTHON" deploy/metric_names.py --write-rules "$tmp/dashboard-rules.yml" ${METRICS_SCRAPE:+--scrape "$METRICS_SCRAPE"} \
  || fail "deploy/metric_names.py"
timeout 60 promtool check rules "$tmp/dashboard-rules.yml" >/dev/null \
  || { promtool check rules "$tmp/dashboard-rules.yml"; fail "a dashboard query is not valid PromQL"; }
echo "every dashboard query parses (promtool check rules)"

step "Debian package: dpkg -i, --check-config, purge"
[[ "$(id -u)" == 0 ]] || fail "dpkg -i needs root (run as root, in a throwaway machine or container)"
if [[ "$(dpkg-query -W -f '${Status}' oauth-apps-gateway 2>/dev/null || true)" == *" installed" ]]; then
  fail "oauth-apps-gateway is already installed here; not touching it"
fi
getent passwd oauth-apps-gateway >/dev/null || user_created=1
installed_here=1
timeout 120 dpkg -i "$deb" || fail "dpkg -i $deb"
getent passwd oauth-apps-gateway || fail "the package did not create the oauth-apps-gateway user"
[[ "$(stat -c '%a %U' /usr/bin/oauth-apps-gateway)" == "755 root" ]] || fail "/usr/bin/oauth-apps-gateway mode"
grep -qx /etc/oauth-apps-gateway/config.toml /var/lib/dpkg/info/oauth-apps-gateway.conffiles \
  || fail "/etc/oauth-apps-gateway/config.toml is not a conffile"
oauth-apps-gateway --check-config --config /etc/oauth-apps-gateway/config.toml \
  || fail "oauth-apps-gateway --check-config on the installed config"
unit="$(dpkg -L oauth-apps-gateway | grep '/systemd/system/oauth-apps-gateway.service$')"
no_stderr timeout 60 systemd-analyze verify "$unit"
echo "systemd-analyze verify $unit: clean"
timeout 120 dpkg -P oauth-apps-gateway || fail "dpkg -P oauth-apps-gateway"
installed_here=""
[[ ! -e /usr/bin/oauth-apps-gateway && ! -e /etc/oauth-apps-gateway ]] || fail "files left after dpkg -P"

finish_step
echo
echo "== deploy/check.sh: all checks passed"
printf '%s\n' "${timings[@]}"
