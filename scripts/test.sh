#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs every check and test: formatting, clippy,
# unit and fast VM tests, the slow lane that boots the real guest kernel, and the hardware-KVM
# lane (the `host` CPU profile in an L1 system under QEMU TCG with emulated SVM).
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
# A test that fails with a private containerd prints where each shim thread waits and leaves
# containerd's log (with the shims' lines) here, outside the clone, for whoever looks next.
export NUTSHELL_KEEP_LOGS="${NUTSHELL_KEEP_LOGS:-/var/log/nutshell-tests}"
cargo test --locked --workspace -- --include-ignored
log "the hardware-KVM lane (tests/hardware-lane/run.sh)"
tests/hardware-lane/run.sh
