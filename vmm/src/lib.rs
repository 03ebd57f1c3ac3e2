//! The Nutshell VMM: one KVM microVM per pod, on the rust-vmm crates.
//!
//! [`Vm`] owns a VM from creation to the joined stop: guest memory, the in-kernel irqchip and
//! PIT, the port-I/O devices (8250 console, i8042 reset, exit port) and the vCPU threads.
//! [`boot_linux`] loads a PVH `vmlinux`, an initrd and a command line into it and starts it.

pub mod api;
pub mod arch;
pub mod boot;
pub mod devices;
pub mod exit;
pub mod host;
pub mod jail;
pub mod memory;
pub mod ratelimit;
pub mod seccomp;
pub mod snapshot;
pub mod sys;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

use std::path::PathBuf;

pub use exit::{ExitHandle, VmExit};
pub use vm::{
    Console, CpuProfileChoice, MachineConfig, RestoreConfig, RunningVm, Vm, VmError, VmRunState,
};

/// A Linux guest to boot.
#[derive(Debug)]
pub struct LinuxConfig {
    /// Uncompressed `vmlinux` with a PVH entry.
    pub kernel: PathBuf,
    /// Optional initrd (an uncompressed newc cpio for Nutshell's kernel).
    pub initrd: Option<PathBuf>,
    /// The user's part of the kernel command line.
    pub cmdline: String,
    /// Memory, vCPUs, console.
    pub machine: MachineConfig,
}

/// What the VMM appends to every guest command line, and why.
pub const VMM_CMDLINE: &[&str] = &[
    // The 8250 UART at COM1 is the console; probing other UARTs costs boot time.
    "console=ttyS0",
    "8250.nr_uarts=1",
    // Reboot through the i8042 reset, which stops the VM.
    "reboot=k",
    // On panic, report it through the exit port and reboot at once rather than hang.
    "panic=-1",
    // Power-off and panic reports go to the exit port (guest-kernel patch).
    "nutshell_exit_port=0x501",
    // KVM's PIT and IOAPIC are known good: skip the timer check and TSC watchdog.
    "no_timer_check",
    "tsc=reliable",
];

/// What the compatibility CPU profile (a `kvm_pvm` host) adds to a one-vCPU guest's command line.
///
/// `kvm_pvm` does not intercept the guest's CPUID instruction: the guest reads the host's CPUID,
/// including the KVM leaves of the hypervisor below it, and turns on the paravirtual features
/// listed there. kvm-clock is one it serves, and the one clock that survives a template restore:
/// KVM rewrites the guest's pvclock page for the new VM, while the TSC is not offset here (a
/// restored guest would see it jump by the template's age, past what the TSC clocksource can
/// convert). With kvm-clock the guest has a high-resolution clock, so it stops its tick when idle
/// (NO_HZ) and reads the time in the vDSO, without a syscall.
pub const COMPAT_UP_CMDLINE: &[&str] = &["clocksource=kvm-clock"];

/// What the compatibility CPU profile adds to a guest of more than one vCPU.
///
/// An SMP guest also turns on PV IPIs and PV spinlock kicks, whose hypercalls `kvm_pvm` does not
/// serve, and hangs (seen also with `nopvspin`: the PV IPIs alone are enough). `nopv` boots it as
/// a plain x86 guest, without kvm-clock: its clocksource is `refined-jiffies` (the TSC cannot be
/// calibrated here), so it keeps its tick when idle and `clock_gettime` is a syscall.
/// Hiding the CPU features themselves is `clearcpuid=`, appended after these.
pub const COMPAT_SMP_CMDLINE: &[&str] = &["nopv"];

/// What the compatibility profile adds for a guest of `vcpus` vCPUs.
pub fn compat_cmdline(vcpus: u8) -> &'static [&'static str] {
    if vcpus > 1 {
        COMPAT_SMP_CMDLINE
    } else {
        COMPAT_UP_CMDLINE
    }
}

/// Loads the guest and starts its vCPUs.
pub fn boot_linux(config: LinuxConfig) -> Result<RunningVm, VmError> {
    // Check inputs before anything is created (the console file among them).
    for (what, path) in std::iter::once(("kernel", &config.kernel))
        .chain(config.initrd.as_ref().map(|p| ("initrd", p)))
    {
        if let Err(source) = std::fs::File::open(path) {
            return Err(match what {
                "kernel" => boot::BootError::KernelOpen {
                    path: path.clone(),
                    source,
                },
                _ => boot::BootError::InitrdRead {
                    path: path.clone(),
                    source,
                },
            }
            .into());
        }
    }
    for device in &config.machine.devices {
        device.validate()?;
    }
    // A console file this call creates is removed again if the boot fails.
    let created_console = match &config.machine.console {
        Console::File(path) if !path.exists() => Some(path.clone()),
        _ => None,
    };
    let mut machine = config.machine;
    let profile = machine.cpu_profile.resolve();
    machine.cpu_profile = CpuProfileChoice::Fixed(profile);
    let compat_arg = (profile == arch::x86_64::cpuid::CpuProfile::Compat)
        .then(arch::x86_64::cpuid::compat_clearcpuid_arg);
    let mut vmm_args = VMM_CMDLINE.to_vec();
    if let Some(arg) = &compat_arg {
        vmm_args.extend_from_slice(compat_cmdline(machine.vcpus));
        vmm_args.push(arg);
    }
    let result = boot::build_cmdline(&config.cmdline, &vmm_args)
        .map_err(VmError::from)
        .and_then(|mut cmdline| {
            devices::virtio::manager::add_to_cmdline(&machine.devices, &mut cmdline).map_err(
                |e| VmError::Config(format!("virtio-mmio devices on the command line: {e}")),
            )?;
            let mut vm = Vm::new(machine)?;
            vm.load_linux(&config.kernel, config.initrd.as_deref(), &cmdline)?;
            vm.start()
        });
    if result.is_err() {
        if let Some(path) = created_console {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}
