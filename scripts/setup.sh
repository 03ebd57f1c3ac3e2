#!/usr/bin/env bash
# Installs and builds everything Nutshell needs on a fresh Debian 12 machine; idempotent.
#   - Debian packages for the guest kernel build
#   - the guest kernel (cached outside the repo, see guest-kernel/README.md)
#   - nutshell-vmm, containerd-shim-nutshell-v2, nutshell-template and nutshell-initramfs (release)
#   - the slow-lane test initramfs: target/nutshell/test-initramfs.cpio
#   - the guest initramfs with nutshell-agent as /init: target/nutshell/initramfs.cpio
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

ensure_root
ensure_packages
ensure_rust
ensure_kvm

"$REPO/guest-kernel/build.sh"

log "building nutshell-vmm, the shim, nutshell-initramfs and nutshell-agent-ctl"
cargo build --release --locked -p nutshell-vmm -p containerd-shim-nutshell-v2 -p nutshell-initramfs -p nutshell-protocol -p nutshell-template
log "building the test /init (static, musl)"
cargo build --release --locked -p nutshell-test-init --target x86_64-unknown-linux-musl
log "building the agent and the benchmark probe (static, musl)"
cargo build --release --locked -p nutshell-agent -p nutshell-bench-probe --target x86_64-unknown-linux-musl

mkdir -p "$TARGET_DIR/nutshell"
MUSL_RELEASE="$TARGET_DIR/x86_64-unknown-linux-musl/release"
"$TARGET_DIR/release/nutshell-initramfs" \
    --init "$MUSL_RELEASE/nutshell-test-init" \
    -o "$TARGET_DIR/nutshell/test-initramfs.cpio" >&2
"$TARGET_DIR/release/nutshell-initramfs" \
    --init "$MUSL_RELEASE/nutshell-agent" \
    -o "$TARGET_DIR/nutshell/initramfs.cpio" >&2
log "ready: $TARGET_DIR/nutshell/{vmlinux,test-initramfs.cpio,initramfs.cpio}, $TARGET_DIR/release/nutshell-vmm"
