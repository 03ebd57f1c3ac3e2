#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs every check and test: formatting, clippy,
# unit and fast VM tests, and the slow lane that boots the real guest kernel.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

"$REPO/scripts/setup.sh"

cd "$REPO"
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
log "cargo test (fast tests and the slow lane)"
cargo test --locked --workspace -- --include-ignored
