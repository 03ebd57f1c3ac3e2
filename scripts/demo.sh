#!/usr/bin/env bash
# Sets up everything on a fresh machine, then boots a Nutshell microVM (1 vCPU, 128 MiB) with
# the guest kernel and the guest agent as PID 1, asks the agent for its health and version
# over hybrid vsock, and asks it to shut the VM down. The guest console is shown as it boots.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

"$REPO/scripts/setup.sh"

work=$(mktemp -d /tmp/nutshell-demo.XXXXXX)
vmm_pid=
cleanup() {
    if [ -n "$vmm_pid" ] && kill -0 "$vmm_pid" 2>/dev/null; then
        kill -TERM "$vmm_pid" 2>/dev/null || true
        wait "$vmm_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

log "booting a microVM (on a kvm_pvm host this takes seconds: guest ring 0 is emulated)"
start=$(date +%s.%N)
"$TARGET_DIR/release/nutshell-vmm" \
    --kernel "$TARGET_DIR/nutshell/vmlinux" \
    --initrd "$TARGET_DIR/nutshell/initramfs.cpio" \
    --vcpus 1 --memory-mib 128 --cmdline "quiet" \
    --vsock-uds "$work/vsock.sock" &
vmm_pid=$!

"$TARGET_DIR/release/nutshell-agent-ctl" --uds "$work/vsock.sock" shutdown

status=0
wait "$vmm_pid" || status=$?
vmm_pid=
log "VM exited with status $status after $(echo "$(date +%s.%N) - $start" | bc) s"
exit "$status"
