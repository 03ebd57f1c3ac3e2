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
pub mod memory;
pub mod ratelimit;
pub mod snapshot;
pub mod template;
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

/// What the compatibility CPU profile (a `kvm_pvm` host) adds to the command line.
///
/// `kvm_pvm` does not intercept the guest's CPUID instruction: the guest reads the host's CPUID,
/// including the KVM leaves of the hypervisor below it, and turns on paravirtual features (PV
/// IPIs, PV spinlock kicks, PTP clock pairing) whose hypercalls this host does not serve; an SMP
/// guest then hangs. `nopv` boots it as a plain x86 guest (TSC clock instead of kvm-clock).
/// Hiding the CPU features themselves is `clearcpuid=`, appended after these.
///
/// Not `tsc_early_khz=` (the guest would use the TSC instead of refined-jiffies): with it,
/// containers in VMs restored from a template hung in their set-up, and kvm_pvm does not offset
/// the guest's TSC, so a restored guest sees it jump by the template's age (docs/vmm.md).
pub const COMPAT_CMDLINE: &[&str] = &["nopv"];

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
    if let Some(fs) = &config.machine.fs {
        fs.validate()?;
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
        vmm_args.extend_from_slice(COMPAT_CMDLINE);
        vmm_args.push(arg);
    }
    let result = boot::build_cmdline(&config.cmdline, &vmm_args)
        .map_err(VmError::from)
        .and_then(|mut cmdline| {
            use arch::x86_64::layout;
            let devices = [
                (
                    machine.vsock.is_some(),
                    layout::VIRTIO_MMIO_BASE,
                    layout::VIRTIO_GSI_BASE,
                ),
                (machine.fs.is_some(), layout::FS_MMIO_BASE, layout::FS_GSI),
            ];
            for (_, base, gsi) in devices.into_iter().filter(|(present, ..)| *present) {
                cmdline
                    .add_virtio_mmio_device(
                        layout::VIRTIO_MMIO_SIZE,
                        vm_memory::GuestAddress(base),
                        gsi,
                        None,
                    )
                    .map_err(boot::BootError::Cmdline)?;
            }
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
