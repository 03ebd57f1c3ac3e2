#!/bin/busybox sh
# /init of the hardware-lane's L1 system (Debian's 6.1 kernel under QEMU TCG with emulated
# SVM): loads KVM, runs the lane's cases (cases.sh) against the nested /dev/kvm, prints the
# notes the report wants from the L1 kernel, and powers off. run.sh builds the image.
/bin/busybox --install -s /bin
export PATH=/bin:/opt/nutshell/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
LANE=l1
. /lane/cases.sh
say figure l1.boot "$(now)"

for m in irqbypass kvm ccp kvm-amd; do
    insmod "/lib/modules/$m.ko" 2>&1 | sed 's/^/insmod: /'
done
if [ ! -c /dev/kvm ]; then
    say plan binding=kvm informative=
    say case kvm fail attempt=1 -- "no /dev/kvm after insmod kvm-amd: $(dmesg | grep -i -m3 'kvm\|svm' | tr '\n' '|')"
else
    VMM=/opt/nutshell/bin/nutshell-vmm
    CTL=/opt/nutshell/bin/nutshell-agent-ctl
    TPL=/opt/nutshell/bin/nutshell-template
    KERNEL=/opt/nutshell/vmlinux
    TEST_INITRD=/opt/nutshell/test-initramfs.cpio
    AGENT_INITRD=/opt/nutshell/initramfs.cpio
    WORK=/tmp/lane
    EXPECT_PROFILE=host
    VM_LIMIT=$(sed -n 's/.*hwlane.vm_limit=\([0-9]*\).*/\1/p' /proc/cmdline)
    VM_LIMIT=${VM_LIMIT:-90}
    # The cases this boot leaves to others (run.sh boots L1 per CPU count, and once more for
    # binding cases an L1 failure left without a verdict).
    SKIP=$(sed -n 's/.*hwlane.skip=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
    mkdir -p "$WORK"
    run_lane
fi
# What the L1 kernel said about its guests (the guest's PMU probe, XSAVE, soft lockups).
dmesg | grep -iE 'wrmsr|rdmsr|consistency|lockup|kvm' | grep -v 'Command line' | head -n 20 |
    while IFS= read -r line; do say note "$line"; done
sync
poweroff -f
