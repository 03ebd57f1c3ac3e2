//! The `nutshell-vmm` binary: the PVH boot path end to end with a synthetic kernel, and a clear
//! one-line error with a non-zero status for each kind of bad input.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{pvh_check_program, pvh_elf, Asm, LOAD_ADDR};

/// SIGTERM to a child this test spawned.
fn sigterm(child: &std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
}

const VMM: &str = env!("CARGO_BIN_EXE_nutshell-vmm");

fn vmm(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nutshell-vmm")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run whose error line mentions `needle`, and that the console file was not
/// created (nothing left behind).
fn assert_refused(dir: &Path, args: &[&str], needle: &str) {
    let console = dir.join("console.out");
    let mut all: Vec<&str> = args.to_vec();
    let console_arg = console.to_str().unwrap().to_owned();
    all.extend(["--console", &console_arg]);
    let out = vmm(&all);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let line = err
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_else(|| panic!("no error line for {args:?}: {err}"));
    assert!(line.contains(needle), "{args:?}: {line}");
    assert!(!console.exists(), "{args:?} left a console file");
}

#[test]
fn pvh_boot_passes_start_info_and_cmdline() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write(
        dir.path(),
        "kernel",
        &pvh_elf(&pvh_check_program(), LOAD_ADDR, 0, true),
    );
    let console = dir.path().join("console");
    let out = vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "user=args",
        "--memory-mib",
        "32",
        "--console",
        console.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.starts_with("PVH ok user=args console=ttyS0 "),
        "console: {text:?}"
    );
    assert!(text.contains("nutshell_exit_port=0x501"), "{text:?}");
    let err = stderr(&out);
    assert!(err.contains("guest CPU profile"), "{err}");
    assert!(err.contains("first KVM_RUN"), "{err}");
    assert!(err.contains("guest powered off"), "{err}");
}

#[test]
fn guest_panic_exits_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Asm::default();
    p.outb(0x501, 1).hang();
    let kernel = write(dir.path(), "kernel", &pvh_elf(&p.0, LOAD_ADDR, 0, true));
    let out = vmm(&["--kernel", kernel.to_str().unwrap(), "--memory-mib", "16"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("guest kernel panicked"));
}

#[test]
fn triple_fault_exits_with_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Asm::default();
    p.ud2();
    let kernel = write(dir.path(), "kernel", &pvh_elf(&p.0, LOAD_ADDR, 0, true));
    let out = vmm(&["--kernel", kernel.to_str().unwrap(), "--memory-mib", "16"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("triple fault"), "{}", stderr(&out));
    // Where it died is logged: the registers KVM left (a number, whatever the host kind).
    assert!(
        stderr(&out).contains("registers as KVM left them: rip 0x"),
        "{}",
        stderr(&out)
    );
}

/// Runs a guest that prints "up" and hangs with `extra` arguments, sends SIGTERM once it is
/// up, and asserts a clean stop (status 0, the signal logged).
fn sigterm_stops_cleanly(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Asm::default();
    p.print("up\n").hang();
    let kernel = write(dir.path(), "kernel", &pvh_elf(&p.0, LOAD_ADDR, 0, true));
    let console = dir.path().join("console");
    let child = Command::new(VMM)
        .args(extra)
        .args(["--kernel", kernel.to_str().unwrap(), "--memory-mib", "16"])
        .args(["--console", console.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..3000 {
        if std::fs::read_to_string(&console).is_ok_and(|t| t.contains("up")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("received SIGTERM"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    sigterm_stops_cleanly(&["--vcpus", "2"]);
}

#[test]
fn bad_inputs_get_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write(
        d,
        "good",
        &pvh_elf(&pvh_check_program(), LOAD_ADDR, 0, true),
    );
    let good = good.to_str().unwrap();
    let text = write(d, "text", b"#!/bin/sh\necho not a kernel\n");
    let no_pvh = write(d, "nopvh", &pvh_elf(&[0xf4], LOAD_ADDR, 0, false));
    // A kernel whose image (bss included) ends at 40 MiB.
    let big = write(d, "big", &pvh_elf(&[0xf4], LOAD_ADDR, 39 << 20, true));
    let initrd = write(d, "initrd", &vec![0u8; 10 << 20]);
    let missing = d.join("missing");
    let missing = missing.to_str().unwrap();

    assert_refused(d, &["--kernel", missing], "cannot open kernel");
    assert_refused(
        d,
        &["--kernel", text.to_str().unwrap()],
        "not an ELF vmlinux",
    );
    assert_refused(d, &["--kernel", no_pvh.to_str().unwrap()], "no PVH entry");
    assert_refused(
        d,
        &["--kernel", big.to_str().unwrap(), "--memory-mib", "32"],
        "does not fit in 32 MiB",
    );
    assert_refused(
        d,
        &["--kernel", good, "--initrd", missing],
        "cannot read initrd",
    );
    assert_refused(
        d,
        &[
            "--kernel",
            good,
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory-mib",
            "8",
        ],
        "too little guest memory",
    );
    assert_refused(d, &["--kernel", good, "--vcpus", "0"], "at least one vCPU");
    assert_refused(
        d,
        &["--kernel", good, "--memory-mib", "2"],
        "guest memory must be",
    );
    assert_refused(
        d,
        &["--kernel", good, "--vsock-uds", text.to_str().unwrap()],
        "is not a socket",
    );
    assert!(text.exists(), "a non-socket path is never removed");
    let uds = d.join("v.sock");
    assert_refused(
        d,
        &[
            "--kernel",
            good,
            "--vsock-uds",
            uds.to_str().unwrap(),
            "--vsock-cid",
            "2",
        ],
        "CID 2 is reserved",
    );
    assert_refused(
        d,
        &["--kernel", good, "--shared-dir", missing],
        "shared directory",
    );
    assert_refused(
        d,
        &["--kernel", good, "--shared-dir", text.to_str().unwrap()],
        "is not a directory",
    );
    let tag = "t".repeat(37);
    assert_refused(
        d,
        &[
            "--kernel",
            good,
            "--shared-dir",
            d.to_str().unwrap(),
            "--fs-tag",
            &tag,
        ],
        "tag",
    );
    let long = "x".repeat(3000);
    assert_refused(
        d,
        &["--kernel", good, "--cmdline", &long],
        "invalid kernel command line",
    );
}

#[test]
fn help_names_every_option() {
    let out = vmm(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory-mib",
        "--vcpus",
        "--console",
        "--vsock-uds",
        "--vsock-cid",
        "--shared-dir",
        "--fs-tag",
        "--api-sock",
        "--print-machine-id",
        "--nic-without-tap",
        "Exit status",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
    // Template policy lives in nutshell-template now: the VMM has no cache of its own.
    assert!(!help.contains("--template-cache"), "{help}");
}

/// `--print-machine-id`: one line naming what a restore depends on (version, snapshot format,
/// CPU profile, vCPUs, guest CPUID), the same for the same inputs, another for another CPU
/// profile or vCPU count.
#[test]
fn machine_id_names_what_a_restore_depends_on() {
    let id = |args: &[&str]| {
        let mut all = vec!["--print-machine-id"];
        all.extend_from_slice(args);
        let out = vmm(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        text.trim().to_owned()
    };
    let one = id(&["--vcpus", "1", "--cpu-profile", "compat"]);
    assert!(
        one.starts_with(&format!(
            "nutshell-vmm {} snapshot-format ",
            env!("CARGO_PKG_VERSION")
        )) && one.contains("cpu-profile compat vcpus 1 cpuid "),
        "{one}"
    );
    assert_eq!(id(&["--vcpus", "1", "--cpu-profile", "compat"]), one);
    assert_ne!(id(&["--vcpus", "2", "--cpu-profile", "compat"]), one);
    assert_ne!(id(&["--vcpus", "1", "--cpu-profile", "host"]), one);
    // Not with a VM to run.
    assert_eq!(
        vmm(&["--print-machine-id", "--kernel", "/x"]).status.code(),
        Some(2)
    );
}

#[test]
fn vsock_device_is_announced_and_its_socket_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write(
        dir.path(),
        "kernel",
        &pvh_elf(&pvh_check_program(), LOAD_ADDR, 0, true),
    );
    let console = dir.path().join("console");
    let uds = dir.path().join("vsock.sock");
    let out = vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory-mib",
        "32",
        "--console",
        console.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "console: {text:?}"
    );
    assert!(!uds.exists(), "socket file left behind");
}

#[test]
fn fs_device_takes_the_slot_after_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write(
        dir.path(),
        "kernel",
        &pvh_elf(&pvh_check_program(), LOAD_ADDR, 0, true),
    );
    let console = dir.path().join("console");
    let shared = tempfile::tempdir().unwrap();
    let out = vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory-mib",
        "32",
        "--console",
        console.to_str().unwrap(),
        "--shared-dir",
        shared.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("virtio_mmio.device=4K@0xd0001000:6"),
        "console: {text:?}"
    );
    assert!(!text.contains("0xd0000000"), "console: {text:?}");
}

/// Snapshots the counting guest (run in this process) into `dir`; returns its console so far.
fn counting_snapshot(dir: &Path) -> String {
    use nutshell_vmm::{Console, CpuProfileChoice, MachineConfig, Vm, VmExit};
    let console = common::Captured::default();
    let mut vm = Vm::new(MachineConfig {
        memory_mib: 16,
        vcpus: 1,
        console: Console::Writer(Box::new(console.clone())),
        cpu_profile: CpuProfileChoice::Auto,
        started_at: None,
        devices: Vec::new(),
    })
    .unwrap();
    vm.load_long_mode_program(&common::counter_program().0, LOAD_ADDR)
        .unwrap();
    let mut running = vm.start().unwrap();
    while console.0.lock().unwrap().len() < 100 && running.exit_handle().reason().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    running.pause().unwrap();
    running.snapshot(dir).unwrap();
    running
        .exit_handle()
        .request(VmExit::Stopped("test".into()));
    running.wait();
    console.text()
}

#[test]
fn restore_runs_a_snapshot_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let before = counting_snapshot(&snap);
    let console = dir.path().join("console");
    let child = Command::new(VMM)
        .args(["--restore", snap.to_str().unwrap()])
        .args(["--console", console.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The console file is written in 4 KiB chunks (no newlines here).
    for _ in 0..1000 {
        if std::fs::metadata(&console).is_ok_and(|m| m.len() >= 4096) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("restored"), "{}", stderr(&out));
    let after = std::fs::read_to_string(&console).unwrap();
    assert!(after.len() >= 4096, "{} bytes after restore", after.len());
    common::assert_consecutive(&format!("{before}{after}"));
}

#[test]
fn restore_refuses_a_corrupted_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    counting_snapshot(&snap);
    let state = snap.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&state, bytes).unwrap();
    assert_refused(
        dir.path(),
        &["--restore", snap.to_str().unwrap()],
        "snapshot state is corrupted",
    );
    // Boot options make no sense with a restore: a usage error (clap's status 2).
    let out = vmm(&["--restore", snap.to_str().unwrap(), "--kernel", "/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn restore_refuses_another_template_key_and_a_vsock_socket_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    counting_snapshot(&snap);
    assert_refused(
        dir.path(),
        &["--restore", snap.to_str().unwrap(), "--template-key", "abc"],
        "snapshot was made for template key none, abc is needed",
    );
    // The snapshot has no vsock device: a socket for one is a mistake, said so.
    let uds = dir.path().join("v.sock");
    assert_refused(
        dir.path(),
        &[
            "--restore",
            snap.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
        ],
        "the snapshot has no vsock device",
    );
    assert!(!uds.exists());
    // A template key without a restore is refused.
    assert_refused(
        dir.path(),
        &["--template-key", "abc", "--kernel", "/x"],
        "--template-key is used with --restore only",
    );
}

/// `--jail`: the guest runs in the jailed VMM, whose exit status comes back through the
/// supervisor (here: a guest panic, status 2); the jail's set-up is logged; the shared
/// directory's bind over itself is gone afterwards.
#[test]
fn jailed_vmm_runs_the_guest_and_its_status_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Asm::default();
    p.print("jailed\n").outb(0x501, 1).hang();
    let kernel = write(dir.path(), "kernel", &pvh_elf(&p.0, LOAD_ADDR, 0, true));
    let console = dir.path().join("console");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let uds = dir.path().join("vsock.sock");
    let out = vmm(&[
        "--jail",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory-mib",
        "16",
        "--console",
        console.to_str().unwrap(),
        "--shared-dir",
        shared.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("jail ready in"), "{err}");
    assert!(err.contains("seccomp filters: Kill"), "{err}");
    assert!(err.contains("guest kernel panicked"), "{err}");
    assert!(std::fs::read_to_string(&console)
        .unwrap()
        .contains("jailed"));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(dir.path().to_str().unwrap()),
        "a mount is left: {mounts}"
    );
    assert!(!uds.exists(), "socket left");
}

/// SIGTERM to the supervisor reaches the jailed VMM, which stops the VM cleanly (status 0).
#[test]
fn jailed_vmm_stops_on_sigterm_to_its_supervisor() {
    sigterm_stops_cleanly(&["--jail"]);
}

/// A thread that makes a forbidden system call (the test hook) kills the jailed VMM with
/// SIGSYS, and the supervisor dies by the same signal.
#[test]
fn forbidden_system_call_kills_the_jailed_vmm_by_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let mut p = Asm::default();
    p.print("up\n").hang();
    let kernel = write(dir.path(), "kernel", &pvh_elf(&p.0, LOAD_ADDR, 0, true));
    for kind in ["vcpu", "main"] {
        let out = Command::new(VMM)
            .args(["--jail", "--kernel", kernel.to_str().unwrap()])
            .args(["--memory-mib", "16"])
            .env("NUTSHELL_VMM_TEST_SIGSYS", kind)
            .env_remove("NUTSHELL_VMM_SECCOMP")
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {:?} {}",
            out.status,
            stderr(&out)
        );
        assert!(!out.status.core_dumped(), "{kind}: no core dump");
    }
}
