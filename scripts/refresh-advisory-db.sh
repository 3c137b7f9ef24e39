#!/usr/bin/env bash
# Refreshes audit/advisory-db, the RustSec advisory database snapshot that tests/advisories.rs
# checks Cargo.lock against (CI has no network, so the database lives in the repository).
#
#   bash scripts/refresh-advisory-db.sh            # clones https://github.com/rustsec/advisory-db
#   bash scripts/refresh-advisory-db.sh DIR        # or copies from a checkout you already have
#
# Keeps only what the check reads (crates/, one TOML-fronted Markdown file per advisory) and the
# database's licence (CC0-1.0), and records the commit in audit/advisory-db/SNAPSHOT.toml. Then
# run `cargo test --locked --test advisories` and commit the result; a new advisory against a
# dependency fails that test until the dependency is upgraded (or, with a reason, ignored in
# tests/advisories.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

src="${1:-}"
tmp=""
if [[ -z "$src" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  git clone --depth 1 --quiet https://github.com/rustsec/advisory-db "$tmp/advisory-db"
  src="$tmp/advisory-db"
fi
git -C "$src" cat-file -e HEAD:crates 2>/dev/null || { echo "error: $src has no crates/ directory (not an advisory-db checkout?)" >&2; exit 2; }

commit="$(git -C "$src" log -1 --format=%H)"
committed="$(git -C "$src" log -1 --format=%cI)"
dest=audit/advisory-db
rm -rf "$dest"
mkdir -p "$dest"
git -C "$src" archive HEAD crates LICENSE.txt | tar -x -C "$dest"
cat > "$dest/SNAPSHOT.toml" <<TOML
repository = "https://github.com/rustsec/advisory-db"
commit = "$commit"
committed = "$committed"
TOML
echo "audit/advisory-db: $(find "$dest/crates" -name '*.md' | wc -l) advisories, commit $commit ($committed)"
