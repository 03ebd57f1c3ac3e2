#!/usr/bin/env bash
# Installs Nutshell on a containerd node. Idempotent: run it again after an upgrade.
#
#   deploy/install.sh [--artifacts DIR] [--no-restart]
#
# From DIR (default: the repository's target/): release/containerd-shim-nutshell-v2 and
# release/nutshell-vmm go to /usr/local/bin; nutshell/vmlinux and nutshell/initramfs.cpio to
# /usr/local/share/nutshell. /etc/nutshell/config.toml and config-untrusted.toml (the strict
# node policy of the "nutshell-untrusted" handler) are written only if absent. The
# containerd snippet is merged into /etc/containerd/config.toml between markers (replaced if
# present), and containerd is restarted when the file changed (unless --no-restart).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
artifacts="$here/../target"
restart=1
while [ $# -gt 0 ]; do
    case "$1" in
        --artifacts) artifacts="$2"; shift 2 ;;
        --no-restart) restart=0; shift ;;
        *) echo "usage: $0 [--artifacts DIR] [--no-restart]" >&2; exit 2 ;;
    esac
done

BIN_DIR=${BIN_DIR:-/usr/local/bin}
SHARE_DIR=${SHARE_DIR:-/usr/local/share/nutshell}
CONFIG_DIR=${CONFIG_DIR:-/etc/nutshell}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
BEGIN="# BEGIN nutshell (deploy/install.sh)"
END="# END nutshell"

need() { [ -f "$1" ] || { echo "install: missing $1 (run scripts/setup.sh and cargo build --release -p containerd-shim-nutshell-v2)" >&2; exit 1; }; }
need "$artifacts/release/containerd-shim-nutshell-v2"
need "$artifacts/release/nutshell-vmm"
need "$artifacts/nutshell/vmlinux"
need "$artifacts/nutshell/initramfs.cpio"

install -d -m 0755 "$BIN_DIR" "$SHARE_DIR" "$CONFIG_DIR"
install -m 0755 "$artifacts/release/containerd-shim-nutshell-v2" "$BIN_DIR/"
install -m 0755 "$artifacts/release/nutshell-vmm" "$BIN_DIR/"
# Optional: builds templates ahead of the first pod (the shim does it through the library).
if [ -f "$artifacts/release/nutshell-template" ]; then
    install -m 0755 "$artifacts/release/nutshell-template" "$BIN_DIR/"
fi
install -m 0644 "$artifacts/nutshell/vmlinux" "$SHARE_DIR/vmlinux"
install -m 0644 "$artifacts/nutshell/initramfs.cpio" "$SHARE_DIR/initramfs.cpio"
for config in config.toml config-untrusted.toml; do
    if [ ! -e "$CONFIG_DIR/$config" ]; then
        install -m 0644 "$here/$config" "$CONFIG_DIR/$config"
        echo "install: wrote $CONFIG_DIR/$config"
    else
        echo "install: kept $CONFIG_DIR/$config"
    fi
done

# containerd: the snippet between markers, replacing an earlier one. containerd 1.6 merges
# repeated tables of a version-2 config poorly, so a node whose config already sets
# restrict_oom_score_adj or a cri plugin table may need the snippet merged by hand.
install -d -m 0755 "$(dirname "$CONTAINERD_CONFIG")"
if [ ! -e "$CONTAINERD_CONFIG" ]; then
    if command -v containerd >/dev/null; then
        containerd config default > "$CONTAINERD_CONFIG"
    else
        echo "version = 2" > "$CONTAINERD_CONFIG"
    fi
fi
before="$(sha256sum "$CONTAINERD_CONFIG")"
tmp="$(mktemp)"
sed "/^$BEGIN\$/,/^$END\$/d" "$CONTAINERD_CONFIG" > "$tmp"
if grep -q 'restrict_oom_score_adj' "$tmp"; then
    sed -i 's/restrict_oom_score_adj *= *false/restrict_oom_score_adj = true/' "$tmp"
    snippet="$(grep -v 'restrict_oom_score_adj' "$here/containerd-nutshell.toml" | sed '/^\[plugins."io.containerd.grpc.v1.cri"\]$/d')"
else
    snippet="$(cat "$here/containerd-nutshell.toml")"
fi
{ cat "$tmp"; echo "$BEGIN"; echo "$snippet"; echo "$END"; } > "$CONTAINERD_CONFIG"
rm -f "$tmp"
if [ "$before" != "$(sha256sum "$CONTAINERD_CONFIG")" ]; then
    echo "install: updated $CONTAINERD_CONFIG"
    if [ "$restart" = 1 ] && command -v systemctl >/dev/null && systemctl is-active --quiet containerd; then
        systemctl restart containerd
        echo "install: restarted containerd"
    fi
fi
echo "install: done (runtime io.containerd.nutshell.v2, CRI handlers nutshell and nutshell-untrusted)"
