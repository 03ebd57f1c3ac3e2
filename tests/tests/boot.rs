//! Slow lane: boot the real guest kernel with the test initramfs under `nutshell-vmm`.
//!
//! Each boot costs seconds on a host whose KVM emulates guest ring 0; the tests are
//! `#[ignore]`d for plain `cargo test` and run by `scripts/test.sh` (`--include-ignored`).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use nix::sys::signal::Signal;
use nutshell_tests::{report_field, GuestBoot, VmmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const MARKER: &str = "NUTSHELL_TEST_INIT uptime=";

fn boot(vcpus: u8, cmdline: &str) -> VmmProcess {
    GuestBoot::new("test-initramfs.cpio")
        .vcpus(vcpus)
        .cmdline(cmdline)
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn linux_boots_smp_to_init_and_powers_off() {
    let mut vm = boot(2, "quiet nutshell_test.user_arg=1");
    let to_init = vm.wait_for_console(MARKER, BOOT_TIMEOUT).unwrap();
    let out = vm.wait(Duration::from_secs(60)).unwrap();
    eprintln!(
        "boot: exec -> /init report {:.2} s wall",
        to_init.as_secs_f64()
    );
    out.assert_status(0);
    assert!(out.stderr.contains("guest powered off"), "{}", out.stderr);

    let console = &out.console;
    assert_eq!(report_field(console, "cpus"), Some("2"), "{console}");
    let mem_kib: u64 = report_field(console, "mem_kib").unwrap().parse().unwrap();
    assert!(
        (96 * 1024..=128 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB for a 128 MiB guest"
    );
    // The user's parameters, then the VMM's (the kernel may prepend its built-in ones).
    let cmdline = report_field(console, "cmdline").unwrap();
    assert!(
        cmdline.contains("quiet nutshell_test.user_arg=1 console=ttyS0 "),
        "{cmdline}"
    );
    assert!(!console.contains("error"), "{console}");
    // The guest's wall clock comes from the host (CMOS RTC or kvm-clock). Allow for the boot
    // time and for the guest clock running slow on an emulating host.
    let guest_epoch: u64 = report_field(console, "epoch").unwrap().parse().unwrap();
    let host_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        host_epoch.abs_diff(guest_epoch) < 300,
        "guest wall clock {guest_epoch}, host {host_epoch}"
    );
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn guest_reboot_stops_the_vm_with_status_0() {
    let vm = boot(1, "quiet nutshell_test.action=reboot");
    let out = vm.wait(BOOT_TIMEOUT).unwrap();
    assert!(out.console.contains(MARKER), "{}", out.console);
    out.assert_status(0);
    assert!(out.stderr.contains("guest rebooted"), "{}", out.stderr);
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn guest_kernel_panic_is_reported_with_status_2() {
    // PID 1 exits: the kernel panics, reports it on the exit port, and reboots.
    let vm = boot(1, "quiet nutshell_test.action=panic");
    let out = vm.wait(BOOT_TIMEOUT).unwrap();
    out.assert_status(2);
    assert!(out.console.contains("Kernel panic"), "{}", out.console);
    assert!(
        out.stderr.contains("guest kernel panicked"),
        "{}",
        out.stderr
    );
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn sigterm_stops_a_running_guest_cleanly() {
    let mut vm = boot(2, "quiet nutshell_test.action=hang");
    vm.wait_for_console(MARKER, BOOT_TIMEOUT).unwrap();
    vm.signal(Signal::SIGTERM).unwrap();
    let out = vm.wait(Duration::from_secs(30)).unwrap();
    out.assert_status(0);
    assert!(out.stderr.contains("received SIGTERM"), "{}", out.stderr);
}
