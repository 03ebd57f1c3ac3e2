# Shared by the scripts in this folder: logging, root check, apt packages, cargo on PATH.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

log() { printf '[nutshell] %s\n' "$*" >&2; }
die() { printf '[nutshell] error: %s\n' "$*" >&2; exit 1; }

# Debian packages the build and the tests need.
APT_PACKAGES=(
    # guest kernel build (guest-kernel/build.sh)
    linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils
    # containers: the agent's host-run tests use busybox-static as a rootfs; containerd and
    # runc are the real components the end-to-end tests and benchmarks drive
    busybox-static containerd runc iproute2
    # pod networks: the CNI bridge, host-local and portmap plugins the CRI tests give pods
    # (portmap needs iptables), nsenter (util-linux) to look into a pod's network namespace
    containernetworking-plugins iptables util-linux
    # the CRI client of the end-to-end tests (k8s-cri generates its gRPC code with protoc)
    protobuf-compiler
    # benchmark workloads (nutshell-bench builds its images from these Debian binaries):
    # iperf3 for the network workload's throughput; runsc (gVisor) for the benchmark's third
    # column, run by containerd's runc shim (Debian's runsc has no shim of its own)
    sysbench fio iperf3 runsc
    # the hardware-KVM lane (tests/hardware-lane/run.sh): QEMU's TCG emulates AMD SVM for the
    # L1 system in which the VMM meets a hardware-like /dev/kvm
    qemu-system-x86
)

# The L1 system's kernel in the hardware-KVM lane: the linux-image 6.1 amd64 package this
# metapackage depends on. The lane fetches it with `apt-get download` into its cache and
# unpacks it with `dpkg-deb -x`; it is never installed (it is not this machine's kernel).
HWLANE_KERNEL_META=linux-image-amd64

ensure_root() {
    [ "$(id -u)" = 0 ] || die "run as root: the VMM needs /dev/kvm, and setup installs packages"
}

ensure_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The pinned toolchain (rust-toolchain.toml) with the musl target for static guest binaries.
ensure_rust() {
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup"
    (cd "$REPO" && rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install)
    (cd "$REPO" && rustup target list --installed | grep -qx x86_64-unknown-linux-musl ||
        rustup target add x86_64-unknown-linux-musl)
    (cd "$REPO" && rustup component list --installed | grep -q '^clippy' ||
        rustup component add clippy rustfmt)
}

ensure_kvm() {
    [ -e /dev/kvm ] || die "/dev/kvm does not exist: Nutshell needs KVM"
}
