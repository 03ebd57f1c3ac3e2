#!/usr/bin/env bash
# Sets up everything on a fresh machine, then boots a Nutshell microVM (2 vCPUs, 128 MiB)
# with the guest kernel and a test /init that reports what the guest sees and powers off.
# The guest console is shown as it boots.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

"$REPO/scripts/setup.sh"

log "booting a microVM (on a kvm_pvm host this takes seconds: guest ring 0 is emulated)"
start=$(date +%s.%N)
status=0
"$TARGET_DIR/release/nutshell-vmm" \
    --kernel "$TARGET_DIR/nutshell/vmlinux" \
    --initrd "$TARGET_DIR/nutshell/test-initramfs.cpio" \
    --vcpus 2 --memory-mib 128 --cmdline "quiet" || status=$?
log "VM exited with status $status after $(echo "$(date +%s.%N) - $start" | bc) s"
exit "$status"
