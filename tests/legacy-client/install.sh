#!/usr/bin/env bash
# Installs what tests/legacy_client.rs runs: node and npm (apt-get, only when `node` is absent),
# then the pinned @octokit/rest 16.43.2 from package-lock.json into node_modules here (npm ci).
# Quick when already installed. Called by .ci/run; touches nothing outside this folder but apt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
want="16.43.2"
manifest="$here/node_modules/@octokit/rest/package.json"

installed() {
  [ -f "$manifest" ] && node -p 'require(process.argv[1]).version' "$manifest" 2>/dev/null || true
}

if ! command -v node >/dev/null 2>&1; then
  echo "installing node and npm with apt-get"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
fi

have="$(installed)"
if [ "$have" = "$want" ]; then
  echo "ok: @octokit/rest@$have already installed in $here/node_modules"
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "FAILED: node is present but npm is not (apt-get install -y npm)" >&2; exit 1; }
(cd "$here" && npm ci --no-audit --no-fund)
have="$(installed)"
[ "$have" = "$want" ] || { echo "FAILED: installed @octokit/rest@${have:-nothing}, wanted $want" >&2; exit 1; }
echo "installed @octokit/rest@$have in $here/node_modules"
