//! Fast VMM tests: tiny guest programs under real KVM check vCPU setup, serial output, port
//! I/O exits, power-off, reset, panic, triple fault and stopping.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{machine, poweroff, Asm, Captured, LOAD_ADDR};
use nutshell_vmm::{Vm, VmError, VmExit};

/// Runs `program` in long mode on a fresh VM; returns why it stopped and the console text.
fn run_program(vcpus: u8, program: &Asm) -> (VmExit, String) {
    let console = Captured::default();
    let mut vm = Vm::new(machine(vcpus, &console)).expect("VM");
    vm.load_long_mode_program(&program.0, LOAD_ADDR)
        .expect("program");
    let exit = vm.start().expect("start").wait();
    (exit, console.text())
}

#[test]
fn serial_output_then_poweroff() {
    let mut p = Asm::default();
    p.print("hello from the guest\n");
    poweroff(&mut p);
    let (exit, text) = run_program(1, &p);
    assert_eq!(exit, VmExit::PowerOff);
    assert_eq!(text, "hello from the guest\n");
}

#[test]
fn i8042_reset_stops_the_vm_cleanly() {
    let mut p = Asm::default();
    p.print("rebooting\n").outb(0x64, 0xfe).hang();
    let (exit, text) = run_program(1, &p);
    assert_eq!(exit, VmExit::Reset);
    assert!(exit.is_clean());
    assert_eq!(text, "rebooting\n");
}

#[test]
fn exit_port_reports_a_guest_panic() {
    let mut p = Asm::default();
    p.outb(0x501, 1).hang();
    let (exit, _) = run_program(1, &p);
    assert_eq!(exit, VmExit::GuestPanic);
    assert_eq!(exit.exit_code(), 2);
}

#[test]
fn triple_fault_is_an_error() {
    // The IDT is empty: the invalid opcode escalates to a triple fault.
    let mut p = Asm::default();
    p.print("x").ud2();
    let (exit, text) = run_program(1, &p);
    assert_eq!(exit, VmExit::TripleFault { vcpu: 0 });
    assert!(!exit.is_clean());
    assert_eq!(text, "x");
}

#[test]
fn unused_ports_read_as_all_ones() {
    let mut p = Asm::default();
    p.mov_dx(0x99).in_al_dx().mov_dx(0x3f8).out_dx_al();
    poweroff(&mut p);
    let console = Captured::default();
    let mut vm = Vm::new(machine(1, &console)).unwrap();
    vm.load_long_mode_program(&p.0, LOAD_ADDR).unwrap();
    assert_eq!(vm.start().unwrap().wait(), VmExit::PowerOff);
    assert_eq!(*console.0.lock().unwrap(), vec![0xff]);
}

#[test]
fn stop_request_ends_a_spinning_guest_with_every_vcpu() {
    // Three vCPUs: the boot one spins, the others wait for a startup IPI that never comes.
    let mut p = Asm::default();
    p.print("spinning\n").hang();
    let console = Captured::default();
    let mut vm = Vm::new(machine(3, &console)).unwrap();
    vm.load_long_mode_program(&p.0, LOAD_ADDR).unwrap();
    let running = vm.start().unwrap();
    let exit = running.exit_handle();
    let stopper = std::thread::spawn(move || {
        // Wait until the guest is visibly running, then stop it.
        for _ in 0..500 {
            if console.text().contains("spinning") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        exit.request(VmExit::Stopped("test".into()));
        console
    });
    // wait() returns only once every vCPU thread is joined.
    assert_eq!(running.wait(), VmExit::Stopped("test".into()));
    assert_eq!(stopper.join().unwrap().text(), "spinning\n");
}

#[test]
fn smp_vm_powers_off_while_aps_wait_for_sipi() {
    let mut p = Asm::default();
    p.print("bsp\n");
    poweroff(&mut p);
    let (exit, text) = run_program(2, &p);
    assert_eq!(exit, VmExit::PowerOff);
    assert_eq!(text, "bsp\n");
}

#[test]
fn bad_machine_shapes_are_refused() {
    let console = Captured::default();
    let err = Vm::new(machine(0, &console)).unwrap_err();
    assert!(matches!(err, VmError::Config(_)), "{err}");
    assert!(err.to_string().contains("at least one vCPU"), "{err}");

    let mut tiny = machine(1, &console);
    tiny.memory_mib = 1;
    let err = Vm::new(tiny).unwrap_err();
    assert!(err.to_string().contains("between"), "{err}");
}

#[test]
fn untouched_guest_memory_costs_no_host_memory() {
    let console = Captured::default();
    let mut m = machine(1, &console);
    m.memory_mib = 1024;
    let vm = Vm::new(m).unwrap();
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    let start = vm
        .memory()
        .iter()
        .next()
        .map(|r| vm.memory().get_host_address(r.start_addr()).unwrap() as usize);
    let rss_kib = resident_kib(start.unwrap(), 1024 << 20);
    // Only the boot data (GDT, MP table) pages have been written.
    assert!(rss_kib <= 64, "guest RAM resident: {rss_kib} KiB");
}

/// KiB of `[addr, addr + len)` resident in memory, by mincore(2). Not smaps: the kernel may merge
/// the guest's anonymous mapping with a neighbouring one (another test's guest memory), and the
/// merged mapping's Rss counts that one's pages too.
fn resident_kib(addr: usize, len: usize) -> u64 {
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `addr..addr + len` is the guest memory mapping, alive for the call; `vec` has one
    // byte per page of it, which is what mincore writes.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * (page as u64 / 1024)
}
