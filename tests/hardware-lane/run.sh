#!/usr/bin/env bash
# The hardware-KVM lane: runs Nutshell's hardware-KVM code path (the `host` CPU profile, with
# kvm-clock, PV features and SMP without `nopv`) inside an L1 system whose /dev/kvm is SVM,
# emulated by QEMU TCG, then the same cases on this host's KVM for the figures beside them,
# and writes target/nutshell/hardware-lane/report.md. Exit status 1 when a binding case failed.
#
# The L1 system: Debian's linux-image 6.1 amd64 kernel (downloaded with apt-get download,
# unpacked with dpkg-deb -x, never installed) with its kvm.ko, kvm-amd.ko and their
# dependencies, busybox-static, the release nutshell-vmm and nutshell-agent-ctl with the
# shared libraries ldd lists, and the guest kernel and initramfs from target/nutshell; its
# /init is l1-init.sh, which runs cases.sh. The image is cached by the hash of its inputs in
# ${NUTSHELL_CACHE_DIR:-/var/cache/nutshell}/hwlane/<key>.
#
# Needs scripts/setup.sh to have run (packages, release binaries, guest kernel, initramfs).
# Environment: HWLANE_TIME_LIMIT (seconds for the whole L1 run, default 420), HWLANE_VM_LIMIT
# (seconds one VM may take in L1, default 90), HWLANE_PVM=0 (skip the kvm_pvm figures),
# HWLANE_PVM_LIMIT (seconds for them, default 300), HWLANE_SILENCE_LIMIT (seconds an L1 console
# may stay silent before the boot is stopped as hung, default twice HWLANE_VM_LIMIT).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"

LANE_DIR=$REPO/tests/hardware-lane
CACHE=${NUTSHELL_CACHE_DIR:-/var/cache/nutshell}/hwlane
OUT=$TARGET_DIR/nutshell/hardware-lane
TIME_LIMIT=${HWLANE_TIME_LIMIT:-420}
VM_LIMIT=${HWLANE_VM_LIMIT:-90}
PVM_LIMIT=${HWLANE_PVM_LIMIT:-300}
SILENCE_LIMIT=${HWLANE_SILENCE_LIMIT:-$((2 * VM_LIMIT))}
VMM=$TARGET_DIR/release/nutshell-vmm
CTL=$TARGET_DIR/release/nutshell-agent-ctl
TPL=$TARGET_DIR/release/nutshell-template
GUEST=(vmlinux test-initramfs.cpio initramfs.cpio)

lane_log() { printf '[hwlane] %s\n' "$*" >&2; }

for f in "$VMM" "$CTL" "$TPL" "${GUEST[@]/#/$TARGET_DIR/nutshell/}"; do
    [ -f "$f" ] || die "$f is missing: run scripts/setup.sh first"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing: run scripts/setup.sh"
cargo build --release --locked -q -p nutshell-hwlane
mkdir -p "$CACHE/debs" "$OUT"

# Debian's kernel package, resolved through the metapackage (its ABI name changes with
# Debian's updates; the version is part of the image's key).
resolve_kernel_pkg() {
    apt-cache depends "$HWLANE_KERNEL_META" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-6\.1[^ ]*-amd64\)$/\1/p' | head -n1
}
kernel_pkg=$(resolve_kernel_pkg)
[ -n "$kernel_pkg" ] || { apt-get update -qq && kernel_pkg=$(resolve_kernel_pkg); }
[ -n "$kernel_pkg" ] || die "cannot resolve $HWLANE_KERNEL_META to a linux-image-6.1 package (apt-get update?)"
deb=$(ls "$CACHE/debs/${kernel_pkg}_"*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    lane_log "downloading $kernel_pkg"
    (cd "$CACHE/debs" && apt-get download -qq "$kernel_pkg" 2>&1 | grep -v 'Download is performed unsandboxed' >&2 || true)
    deb=$(ls "$CACHE/debs/${kernel_pkg}_"*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || die "apt-get download $kernel_pkg failed"
fi

key=$( {
    echo "layout 1 $(basename "$deb")"
    sha256sum "$VMM" "$CTL" "$TPL" "${GUEST[@]/#/$TARGET_DIR/nutshell/}" /bin/busybox \
        "$LANE_DIR/l1-init.sh" "$LANE_DIR/cases.sh" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
IMAGE=$CACHE/$key

# Copies a dynamically linked binary and the libraries ldd lists into the image at $1.
copy_with_libs() { # ROOT BINARY DEST_DIR
    install -D -m 0755 "$2" "$1$3/$(basename "$2")"
    ldd "$2" | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$1$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$1$lib"
    done
}

# The path of module $2 in the unpacked kernel tree $1, and its dependencies' first.
module_with_deps() { # MODROOT NAME
    local path dep
    path=$(find "$1" -name "$2.ko" -print -quit)
    [ -n "$path" ] || die "module $2 not in $kernel_pkg"
    for dep in $(tr '\0' '\n' <"$path" | sed -n 's/^depends=//p' | tr ',' ' '); do
        module_with_deps "$1" "$dep"
    done
    echo "$path"
}

build_image() {
    local tmp root modroot m
    tmp=$(mktemp -d "$CACHE/.build.$key.XXXXXX")
    trap 'rm -rf "$tmp"; trap - RETURN' RETURN
    lane_log "building the L1 image $key from $(basename "$deb")"
    dpkg-deb -x "$deb" "$tmp/deb"
    root=$tmp/root
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,lane,lib/modules,opt/nutshell/bin}
    install -m 0755 /bin/busybox "$root/bin/busybox"
    install -m 0755 "$LANE_DIR/l1-init.sh" "$root/init"
    install -m 0644 "$LANE_DIR/cases.sh" "$root/lane/cases.sh"
    modroot=$(echo "$tmp"/deb/lib/modules/*/kernel)
    for m in $(module_with_deps "$modroot" kvm-amd | awk '!seen[$0]++'); do
        install -m 0644 "$m" "$root/lib/modules/$(basename "$m")"
    done
    [ -f "$root/lib/modules/irqbypass.ko" ] && [ -f "$root/lib/modules/ccp.ko" ] ||
        die "kvm-amd's dependencies changed (l1-init.sh loads irqbypass, kvm, ccp, kvm-amd)"
    copy_with_libs "$root" "$VMM" /opt/nutshell/bin
    copy_with_libs "$root" "$CTL" /opt/nutshell/bin
    copy_with_libs "$root" "$TPL" /opt/nutshell/bin
    for f in "${GUEST[@]}"; do
        install -m 0644 "$TARGET_DIR/nutshell/$f" "$root/opt/nutshell/$f"
    done
    cp "$tmp"/deb/boot/vmlinuz-* "$tmp/vmlinuz"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet >"$tmp/l1.cpio")
    mkdir -p "$tmp/image"
    mv "$tmp/vmlinuz" "$tmp/l1.cpio" "$tmp/image/"
    rm -rf "$IMAGE"
    mv "$tmp/image" "$IMAGE"
}

[ -f "$IMAGE/l1.cpio" ] || build_image
touch "$IMAGE"
# Images of other inputs unused for a week go, and builds that died an hour ago.
find "$CACHE" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
    \( -regex '.*/[0-9a-f]{16}' -mtime +7 -o -name '.build.*' -mmin +60 \) -exec rm -rf {} +

# Boots the L1 system with $1 CPUs; its test program skips the cases named in $2 (commas);
# its console goes to $3. Adds the boot's wall seconds to l1_wall. A boot whose console stays
# silent for SILENCE_LIMIT seconds is stopped: the L1 system has hung (no case may be silent
# that long: each VM of a case has VM_LIMIT seconds).
l1_wall=0
boot_l1() { # CPUS SKIP CONSOLE
    local started qemu quiet size last=-1 wall
    started=$(date +%s.%N)
    lane_log "booting L1 with $1 CPU(s) under QEMU TCG with emulated SVM (image $key, limit ${TIME_LIMIT} s)"
    rm -f "$3"
    timeout --kill-after=10 "$TIME_LIMIT" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu EPYC,+svm -smp "$1" -m 3G \
        -nodefaults -no-reboot -display none -monitor none \
        -serial "file:$3" \
        -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/l1.cpio" \
        -append "console=ttyS0 quiet panic=-1 hwlane.vm_limit=$VM_LIMIT hwlane.skip=$2" \
        2> >(grep -v "TCG doesn't support requested feature" >&2) &
    qemu=$!
    quiet=0
    while kill -0 "$qemu" 2>/dev/null; do
        sleep 5
        size=$(stat -c %s "$3" 2>/dev/null || echo 0)
        if [ "$size" != "$last" ]; then
            last=$size quiet=0
        elif [ "$((quiet += 5))" -ge "$SILENCE_LIMIT" ]; then
            lane_log "L1 has been silent for $quiet s: stopping it"
            echo "HWLANE l1 note the L1 system fell silent for $quiet s and was stopped" >>"$3"
            kill "$qemu" 2>/dev/null || true
            break
        fi
    done
    local rc=0
    wait "$qemu" || rc=$?
    wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    l1_wall=$(awk -v a="$l1_wall" -v b="$wall" 'BEGIN { printf "%.1f", a + b }')
    lane_log "L1 with $1 CPU(s) ran ${wall} s (qemu exit status $rc$([ "$rc" = 124 ] && echo ': time limit'))"
    if ! grep -aq "HWLANE l1 plan" "$3"; then
        lane_log "L1 with $1 CPU(s) never started its test program; its console's last lines:"
        tail -c 4096 "$3" | tr -d '\000-\011\013-\037\177' | grep -v '^ *$' | tail -n 12 |
            cut -c1-300 | sed 's/^/[hwlane]   /' >&2
    fi
}

# shellcheck source=tests/hardware-lane/cases.sh
. "$LANE_DIR/cases.sh" # BINDING_CASES, INFORMATIVE_CASES
consoles=()
# The binding cases (1 vCPU) in an L1 with one CPU: with two, QEMU's multi-threaded TCG
# intermittently broke the L1 kernel's own state around VMRUN (stack-guard-page oopses in
# svm_vcpu_enter_exit, a nested guest's triple fault, a VMM gone mid-snapshot: 4 of 31 case
# runs, against 1 of 78 with one CPU, an L1 hang; docs/vmm.md). An L1 system that dies or
# hangs under a case leaves it without a verdict: one more boot runs the cases that have none.
# A case that reported a failure is never run again.
left=$BINDING_CASES
for boot in 1 2; do
    [ -n "$left" ] || break
    skip=$INFORMATIVE_CASES
    for c in $BINDING_CASES; do
        case " $left " in *" $c "*) ;; *) skip="$skip $c" ;; esac
    done
    console=$OUT/l1-console-$boot.log
    boot_l1 1 "$(echo $skip | tr ' ' ',')" "$console"
    consoles+=(--l1-console "$console")
    still=""
    for c in $left; do
        grep -aq "HWLANE l1 case $c " "$console" || still="$still $c"
    done
    left=${still# }
    [ -z "$left" ] || lane_log "L1 boot $boot ended without a verdict for: $left"
done
# The informative 2-vCPU cases in an L1 with two CPUs, where their vCPUs run in parallel.
# Nothing in this boot fails the lane, not even an L1 that hangs before its test program
# (CI saw one on 2026-12-07: the emulator with two CPUs, before any Nutshell code ran).
boot_l1 2 "$(echo $BINDING_CASES | tr ' ' ',')" "$OUT/l1-smp2-console.log"
consoles+=(--l1-informative-console "$OUT/l1-smp2-console.log")

# The kvm_pvm column: the same cases on this host, but the slowest (the agent on 2 vCPUs, which
# boots with nopv and no kvm-clock here: minutes under load) and with a time limit of its own.
pvm_args=()
if [ "${HWLANE_PVM:-1}" != 0 ]; then
    lane_log "the same cases on this host's KVM, for the figures beside L1's (limit ${PVM_LIMIT} s)"
    work=$(mktemp -d)
    started=$(date +%s.%N)
    set +e
    LANE=pvm VMM=$VMM CTL=$CTL TPL=$TPL WORK=$work VM_LIMIT=240 SKIP=agent-2vcpu \
        KERNEL=$TARGET_DIR/nutshell/vmlinux \
        TEST_INITRD=$TARGET_DIR/nutshell/test-initramfs.cpio \
        AGENT_INITRD=$TARGET_DIR/nutshell/initramfs.cpio \
        EXPECT_PROFILE=$([ -d /sys/module/kvm_pvm ] && echo compat || echo host) \
        LANE_DIR=$LANE_DIR timeout --kill-after=10 "$PVM_LIMIT" \
        sh -c '. "$LANE_DIR/cases.sh" && run_lane' >"$OUT/pvm-output.log" 2>&1
    set -e
    rm -rf "$work"
    pvm_wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    pvm_args=(--pvm-output "$OUT/pvm-output.log" --pvm-wall "$pvm_wall")
fi

context="$(date -u '+%Y-%m-%d %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg); L1 kernel $(basename "$deb" .deb), $(qemu-system-x86_64 --version | head -n1)"
"$TARGET_DIR/release/nutshell-hwlane" "${consoles[@]}" \
    --l1-wall "$l1_wall" "${pvm_args[@]}" --context "$context" --out "$OUT/report.md"
