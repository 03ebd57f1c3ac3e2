#!/usr/bin/env python3
"""Boot the guest kernel under QEMU microvm and time it (a measuring tool,
not used by the runtime).

Builds an uncompressed initramfs holding a static /init (tools/test-init.c),
runs QEMU with the exit port device (isa-debug-exit at 0x501) and prints, per
run, the wall time until /init printed INIT_MARKER, the guest uptime /init
saw, the total wall time and how QEMU ended. With --runs N it prints the
median too.

  boot-test.py --kernel vmlinux --init test-init [--mode features] [--smp 2]
               [--verbose] [--runs 3] [--append "..."] [--no-hide]
"""
import argparse, os, statistics, struct, subprocess, sys, tempfile, time

# CPUID bits hidden from the guest on a kvm_pvm host (see README.md), as
# QEMU -cpu flag names, and the kernel's clearcpuid= numbers (word*32+bit).
HIDE = [
    # name     clearcpuid  CPUID leaf.subleaf reg bit; why
    ("popcnt", 4*32+23),   # 1 ECX 23: popcnt not emulated in guest kernel mode
    ("cx16",   4*32+13),   # 1 ECX 13: cmpxchg16b (SLUB) not emulated
    ("xsave",  4*32+26),   # 1 ECX 26: xrstor not emulated (also hides AVX from the kernel)
    ("smap",   9*32+20),   # 7.0 EBX 20: clac/stac not emulated
    ("erms",   9*32+9),    # 7.0 EBX 9: speed, rep movsb/stosb emulated byte by byte (~1 s)
    ("fsrm",   18*32+4),   # 7.0 EDX 4: speed, as erms
]
# Also hidden by the reference probe on an Intel host, not needed on this AMD
# host: smep fsgsbase invpcid pcid rdpid pku clflushopt clwb.
NUMS = dict(HIDE, smep=9*32+7, fsgsbase=9*32+0, invpcid=9*32+10, pcid=4*32+17,
            rdpid=16*32+22, pku=16*32+3, clflushopt=9*32+23, clwb=9*32+24)

def cpio_newc(entries):
    out = bytearray()
    ino = 1
    def add(name, mode, data=b"", rdev=(0, 0)):
        nonlocal ino
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join("%08x" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        out.extend(hdr.encode()); out.extend(nb)
        out.extend(b"\0" * ((4 - len(out) % 4) % 4))
        out.extend(data)
        out.extend(b"\0" * ((4 - len(out) % 4) % 4))
        ino += 1
    for e in entries:
        add(*e)
    add("TRAILER!!!", 0)
    out.extend(b"\0" * ((512 - len(out) % 512) % 512))
    return bytes(out)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--mode", default="poweroff")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--mem", default="128")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--verbose", action="store_true", help="no quiet, earlycon")
    ap.add_argument("--append", default="")
    ap.add_argument("--no-exit-port", action="store_true")
    ap.add_argument("--hide", default=",".join(n for n, _ in HIDE),
                    help="comma list of CPUID feature names to hide")
    ap.add_argument("--no-clearcpuid", action="store_true",
                    help="hide through QEMU -cpu only (not enough on kvm_pvm: it ignores it)")
    ap.add_argument("--show", action="store_true", help="print the serial output")
    a = ap.parse_args()

    hide = [h for h in a.hide.split(",") if h]
    nums = NUMS
    # arch-capabilities: kvm_pvm on AMD rejects QEMU writing MSR 0x10a
    cpu = "host,-arch-capabilities" + "".join(",-" + h for h in hide)
    init = open(a.init, "rb").read()
    initrd = cpio_newc([("dev", 0o040755), ("dev/console", 0o020600, b"", (5, 1)),
                        ("init", 0o100755, init)])
    fd, rd = tempfile.mkstemp(prefix="nutshell-initrd."); os.write(fd, initrd); os.close(fd)

    cmd = ["console=ttyS0", "8250.nr_uarts=1", "reboot=k", "panic=-1", "tsc=reliable",
           "no_timer_check", "random.trust_cpu=on", "mitigations=off", "rdinit=/init"]
    if not a.no_clearcpuid:
        cmd.append("clearcpuid=" + ",".join(str(nums[h]) for h in hide if h in nums))
    if not a.no_exit_port: cmd.append("nutshell_exit_port=0x501")
    cmd.append("earlycon=uart8250,io,0x3f8" if a.verbose else "quiet")
    if a.append: cmd.append(a.append)
    cmd.append("--"); cmd.append(a.mode)
    cmdline = " ".join(cmd)

    marks, totals = [], []
    for run in range(a.runs):
        fd, ser = tempfile.mkstemp(prefix="nutshell-serial."); os.close(fd)
        args = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", cpu,
                "-m", a.mem, "-smp", str(a.smp), "-no-reboot", "-nodefaults", "-display", "none",
                "-kernel", a.kernel, "-initrd", rd, "-append", cmdline, "-serial", "file:" + ser]
        if not a.no_exit_port:
            args += ["-device", "isa-debug-exit,iobase=0x501,iosize=1"]
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        marker = None; first = None; end = "exited"; stamps = []; seen = 0
        while p.poll() is None:
            t = time.perf_counter() - t0
            data = open(ser, "rb").read()
            if first is None and data:
                first = t
            if len(data) != seen:
                stamps.append((t, seen, len(data))); seen = len(data)
            if marker is None and b"INIT_MARKER" in data:
                marker = t
            if t > a.timeout:
                end = "timeout"; p.terminate(); p.wait(); break
            if b"System halted" in data:
                end = "halted"; time.sleep(0.1); p.terminate(); p.wait(); break
            time.sleep(0.005)
        total = time.perf_counter() - t0
        err = p.stderr.read().decode(errors="replace")
        data = open(ser, "rb").read().decode(errors="replace"); os.unlink(ser)
        uptime = None
        for line in data.splitlines():
            if line.startswith("INIT_MARKER uptime="):
                uptime = line.split("=", 1)[1].split()[0]
        if a.show or a.verbose:
            if a.verbose:
                # prefix each line with the wall time at which it arrived
                raw = data.encode(errors="replace")
                out, pos = [], 0
                for line in raw.split(b"\n"):
                    arrived = next((t for t, lo, hi in stamps if hi > pos), total)
                    out.append("%7.3f| %s" % (arrived, line.decode(errors="replace")))
                    pos += len(line) + 1
                sys.stdout.write("\n".join(out) + "\n")
            else:
                sys.stdout.write(data)
        if err.strip():
            sys.stdout.write("qemu stderr: " + err[-2000:] + "\n")
        print(f"run {run+1}: marker_wall_s={marker and round(marker, 3)} guest_uptime_s={uptime} "
              f"total_wall_s={total:.3f} first_output_s={first and round(first, 3)} end={end} qemu_rc={p.returncode}")
        sys.stdout.flush()
        if marker: marks.append(marker)
        totals.append(total)
    os.unlink(rd)
    if a.runs > 1 and marks:
        print(f"median marker_wall_s={statistics.median(marks):.3f} over {len(marks)} runs "
              f"(min {min(marks):.3f} max {max(marks):.3f}); median total {statistics.median(totals):.3f}")
    print("cmdline: " + cmdline)
    print("cpu: " + cpu)

if __name__ == "__main__":
    main()
