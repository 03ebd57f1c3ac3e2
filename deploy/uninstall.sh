#!/usr/bin/env bash
# Removes what deploy/install.sh installed. Idempotent. Keeps /etc/nutshell/ (config.toml,
# config-untrusted.toml) unless --purge. Refuses while Nutshell sandboxes run (their state is
# under /run/nutshell).
set -euo pipefail

purge=0
[ "${1:-}" = "--purge" ] && purge=1
BIN_DIR=${BIN_DIR:-/usr/local/bin}
SHARE_DIR=${SHARE_DIR:-/usr/local/share/nutshell}
CONFIG_DIR=${CONFIG_DIR:-/etc/nutshell}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
BEGIN="# BEGIN nutshell (deploy/install.sh)"
END="# END nutshell"

if [ -d /run/nutshell ] && [ -n "$(ls -A /run/nutshell 2>/dev/null)" ]; then
    echo "uninstall: sandboxes still run (/run/nutshell is not empty); stop their pods first" >&2
    exit 1
fi
rm -f "$BIN_DIR/containerd-shim-nutshell-v2" "$BIN_DIR/nutshell-vmm" "$BIN_DIR/nutshell-template"
rm -rf "$SHARE_DIR"
[ "$purge" = 1 ] && rm -rf "$CONFIG_DIR" /var/cache/nutshell/templates
if [ -f "$CONTAINERD_CONFIG" ] && grep -q "^$BEGIN\$" "$CONTAINERD_CONFIG"; then
    sed -i "/^$BEGIN\$/,/^$END\$/d" "$CONTAINERD_CONFIG"
    echo "uninstall: removed the nutshell runtime from $CONTAINERD_CONFIG"
    if command -v systemctl >/dev/null && systemctl is-active --quiet containerd; then
        systemctl restart containerd
    fi
fi
echo "uninstall: done"
