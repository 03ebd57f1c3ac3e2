#!/usr/bin/env bash
# Build the Nutshell guest kernel (an uncompressed vmlinux with a PVH entry
# point) from Debian's linux-source-6.1 package, config/nutshell.config and
# patches/*.patch, and cache it.
#
# Needs (Debian 12 packages, no network): linux-source-6.1 build-essential
#   flex bison bc libelf-dev libssl-dev cpio xz-utils util-linux (flock)
#   binutils (objcopy, readelf)
#
# Cache: ${NUTSHELL_CACHE_DIR:-/var/cache/nutshell}/kernel/<key>/ with
#   vmlinux, .config, System.map, build-info
# where <key> = sha256 over the linux-source-6.1 package version, the
# fragment, every patch (name and content) and this script. A hit builds
# nothing. The kernel is then placed at ${CARGO_TARGET_DIR:-<repo>/target}/nutshell/vmlinux.
#
# Environment: NUTSHELL_CACHE_DIR, CARGO_TARGET_DIR, NUTSHELL_KERNEL_JOBS
#   (default: nproc), NUTSHELL_KEEP_BUILD=1 (keep the build tree of a failed
#   build for inspection).
set -euo pipefail

# Everything runs inside main(), which bash reads whole before running it:
# editing this file during a build cannot derail the running build.
main() {

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$HERE/config/nutshell.config"
PATCH_DIR="$HERE/patches"
PKG=linux-source-6.1
ARCH=x86_64

usage() {
    cat <<EOF
usage: $0 [--print-key] [--force] [--help]

Builds (or finds in the cache) the Nutshell guest kernel and places it at
${CARGO_TARGET_DIR:-$REPO/target}/nutshell/vmlinux.

  --print-key  print the cache key and exit
  --force      rebuild even when the cache has this key
  --help       this text

Cache: \${NUTSHELL_CACHE_DIR:-/var/cache/nutshell}/kernel/<key>/
EOF
}

log() { printf '[guest-kernel] %s\n' "$*" >&2; }
die() { printf '[guest-kernel] error: %s\n' "$*" >&2; exit 1; }

PRINT_KEY=0 FORCE=0
for arg in "$@"; do
    case "$arg" in
        --print-key) PRINT_KEY=1 ;;
        --force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

# --- inputs -----------------------------------------------------------------
PKG_VERSION=$(dpkg-query -W -f='${Version}' "$PKG" 2>/dev/null) ||
    die "package $PKG is not installed (apt-get install $PKG)"
[ -n "$PKG_VERSION" ] || die "package $PKG is not installed (apt-get install $PKG)"
TARBALL=$(ls /usr/src/${PKG}.tar.xz 2>/dev/null || true)
[ -f "$TARBALL" ] || die "$PKG $PKG_VERSION is installed but /usr/src/${PKG}.tar.xz is missing"
[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"
shopt -s nullglob
PATCHES=("$PATCH_DIR"/[0-9][0-9][0-9][0-9]-*.patch)
shopt -u nullglob

# The key covers everything that decides the output; names matter too,
# because they decide the order in which patches apply.
manifest() {
    printf 'package %s %s\n' "$PKG" "$PKG_VERSION"
    printf 'arch %s\n' "$ARCH"
    printf 'fragment %s\n' "$(sha256sum <"$FRAGMENT" | cut -d' ' -f1)"
    local p
    for p in "${PATCHES[@]}"; do
        printf 'patch %s %s\n' "$(basename "$p")" "$(sha256sum <"$p" | cut -d' ' -f1)"
    done
    printf 'build.sh %s\n' "$(sha256sum <"$SELF" | cut -d' ' -f1)"
}
KEY=$(manifest | sha256sum | cut -d' ' -f1)

if [ "$PRINT_KEY" = 1 ]; then
    echo "$KEY"
    exit 0
fi

CACHE_ROOT="${NUTSHELL_CACHE_DIR:-/var/cache/nutshell}/kernel"
ENTRY="$CACHE_ROOT/$KEY"
OUT_DIR="${CARGO_TARGET_DIR:-$REPO/target}/nutshell"
mkdir -p "$CACHE_ROOT" 2>/dev/null && [ -w "$CACHE_ROOT" ] ||
    die "cannot write $CACHE_ROOT (set NUTSHELL_CACHE_DIR to a writable directory)"

# One builder per key; others wait and then find the published entry.
exec 9>"$CACHE_ROOT/$KEY.lock"
if ! flock -n 9; then
    log "another build of $KEY is running; waiting for it"
    flock 9
fi

is_complete() { [ -f "$1/vmlinux" ] && [ -f "$1/build-info" ]; }

info_value() { sed -n "s/^$2=//p" "$1/build-info" | head -n1; }

install_kernel() {
    mkdir -p "$OUT_DIR"
    local tmp="$OUT_DIR/.vmlinux.$$"
    # A hard link when possible (same file system), a copy otherwise; then
    # rename, so a reader never sees a partial file.
    if ! [ "$ENTRY/vmlinux" -ef "$OUT_DIR/vmlinux" ]; then
        ln -f "$ENTRY/vmlinux" "$tmp" 2>/dev/null || cp -f "$ENTRY/vmlinux" "$tmp"
        mv -f "$tmp" "$OUT_DIR/vmlinux"
    fi
    echo "$OUT_DIR/vmlinux"
    log "kernel: $OUT_DIR/vmlinux"
    log "key: $KEY ($PKG $PKG_VERSION)"
    log "build time: $(info_value "$ENTRY" build_seconds) s, size: $(info_value "$ENTRY" vmlinux_bytes) bytes"
}

if [ "$FORCE" = 0 ] && is_complete "$ENTRY"; then
    log "cache hit: $ENTRY"
    install_kernel
    exit 0
fi

# --- build ------------------------------------------------------------------
for tool in make gcc flex bison bc tar xz objcopy readelf sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (see the package list at the top of $0)"
done

JOBS=${NUTSHELL_KERNEL_JOBS:-$(nproc)}
WORK=$(mktemp -d "$CACHE_ROOT/.build.$KEY.XXXXXX")
cleanup() {
    local rc=$?
    if [ $rc -ne 0 ] && [ "${NUTSHELL_KEEP_BUILD:-0}" = 1 ]; then
        log "build tree kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

START=$(date +%s)
SRC="$WORK/src"
MAKELOG="$WORK/make.log"
mkdir -p "$SRC"
log "extracting $TARBALL ($PKG $PKG_VERSION)"
tar -xf "$TARBALL" -C "$SRC" --strip-components=1

for p in "${PATCHES[@]}"; do
    log "patch $(basename "$p")"
    patch -d "$SRC" -p1 -s --forward --no-backup-if-mismatch <"$p" ||
        die "$(basename "$p") does not apply to $PKG $PKG_VERSION"
done

# Reproducible identification strings (uname -v shows them).
export KBUILD_BUILD_USER=nutshell KBUILD_BUILD_HOST=nutshell
export KBUILD_BUILD_TIMESTAMP="nutshell-${KEY:0:12}"

kmake() {
    make -C "$SRC" ARCH="$ARCH" "$@" >>"$MAKELOG" 2>&1 || {
        grep -E -i 'error|undefined reference' "$MAKELOG" | tail -n 40 >&2 || true
        echo '--- last lines of the make log:' >&2
        tail -n 25 "$MAKELOG" >&2
        die "make $* failed (full log: $MAKELOG, kept with NUTSHELL_KEEP_BUILD=1)"
    }
}

log "configuring: tinyconfig + $(basename "$FRAGMENT")"
kmake -s tinyconfig
(cd "$SRC" && ./scripts/kconfig/merge_config.sh -m -O "$SRC" "$SRC/.config" "$FRAGMENT") >>"$MAKELOG" 2>&1 ||
    die "merge_config.sh failed (see $MAKELOG)"
kmake -s olddefconfig

# Every line of the fragment must hold in the final .config. A symbol that
# is "not set" may also be absent (its dependencies are off).
MISSING=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
        got=$(grep -E "^$sym=" "$SRC/.config" | head -n1 | cut -d= -f2- || true)
        [ "$got" = "$want" ] || MISSING+=("$sym: wanted $want, got ${got:-<not set>}")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set ]]; then
        sym=${BASH_REMATCH[1]}
        got=$(grep -E "^$sym=" "$SRC/.config" | head -n1 | cut -d= -f2- || true)
        [ -z "$got" ] || MISSING+=("$sym: wanted not set, got $got")
    fi
done <"$FRAGMENT"
if [ ${#MISSING[@]} -gt 0 ]; then
    printf '[guest-kernel]   %s\n' "${MISSING[@]}" >&2
    die "${#MISSING[@]} symbol(s) of $(basename "$FRAGMENT") did not land in .config (dependencies? misspelt? patch missing?)"
fi

log "building vmlinux with -j$JOBS (log: $MAKELOG)"
kmake -j"$JOBS" vmlinux
RELEASE=$(make -s -C "$SRC" ARCH="$ARCH" kernelrelease 2>/dev/null || echo unknown)

# Strip the symbol table (kallsyms is built in; System.map is kept next to
# it). Sections with SHF_ALLOC, the PVH note among them, stay.
STAGE="$WORK/stage"
mkdir -p "$STAGE"
objcopy --strip-all "$SRC/vmlinux" "$STAGE/vmlinux"
# XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry point QEMU and our VMM use.
readelf -n "$STAGE/vmlinux" | grep -E '^\s*Xen\s.*(0x00000012|PHYS32_ENTRY)' >/dev/null ||
    die "vmlinux has no XEN_ELFNOTE_PHYS32_ENTRY note (PVH entry missing)"
cp "$SRC/.config" "$STAGE/.config"
cp "$SRC/System.map" "$STAGE/System.map"
END=$(date +%s)
SIZE=$(stat -c %s "$STAGE/vmlinux")
{
    echo "key=$KEY"
    echo "package=$PKG"
    echo "package_version=$PKG_VERSION"
    echo "kernel_release=$RELEASE"
    echo "build_seconds=$((END - START))"
    echo "vmlinux_bytes=$SIZE"
    echo "jobs=$JOBS"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# inputs:"
    manifest | sed 's/^/# /'
} >"$STAGE/build-info"

# Publish by rename: readers see the whole entry or none of it.
if [ -e "$ENTRY" ]; then
    OLD="$CACHE_ROOT/.old.$KEY.$$"
    mv "$ENTRY" "$OLD"
    mv "$STAGE" "$ENTRY"
    rm -rf "$OLD"
else
    mv "$STAGE" "$ENTRY"
fi
log "published $ENTRY"
install_kernel
}

main "$@"
exit $?
