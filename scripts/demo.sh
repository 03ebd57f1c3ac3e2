#!/usr/bin/env bash
# README command 1. Sets up everything on a fresh machine (packages, guest kernel, binaries),
# then runs a pod in a Nutshell microVM end to end: a private containerd runs a locally built
# busybox image with `ctr run --runtime io.containerd.nutshell.v2`; the shim starts a microVM
# with its own guest kernel (restored from an agent-ready template in
# /var/cache/nutshell/templates, built by the first run), the guest agent runs the container,
# and its output is shown here.
# Nothing is left behind: containerd, the shim and the VM are stopped, their directories removed.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

"$REPO/scripts/setup.sh"

log "building the shim and the demo driver"
cargo build --release --locked -p containerd-shim-nutshell-v2 >&2
cargo build --locked -p nutshell-bench --bin nutshell-demo >&2

work=$(mktemp -d /tmp/nutshell-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat > "$work/config.toml" <<TOML
kernel = "$TARGET_DIR/nutshell/vmlinux"
initramfs = "$TARGET_DIR/nutshell/initramfs.cpio"
vmm = "$TARGET_DIR/release/nutshell-vmm"
run_dir = "$work/run"
boot_timeout_secs = 300
rpc_timeout_secs = 120
TOML

# containerd finds the shim on its PATH; the shim reads NUTSHELL_CONFIG.
PATH="$TARGET_DIR/release:$PATH" NUTSHELL_CONFIG="$work/config.toml" \
    "$TARGET_DIR/debug/nutshell-demo" "$TARGET_DIR/nutshell/bench-images"
