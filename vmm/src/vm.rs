//! A microVM: KVM VM, guest memory, devices and vCPUs, from creation to the joined stop.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_irqchip, kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::cpuid::{self, CpuProfile, CpuidError};
use crate::arch::x86_64::layout::{
    FS_GSI, FS_MMIO_BASE, KVM_TSS_ADDR, SERIAL_IRQ, VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::arch::x86_64::pvh::{self, PvhError};
use crate::arch::x86_64::regs::{self, RegsError};
use crate::boot::{self, BootError};
use crate::devices::bus::BusError;
use crate::devices::exit_port::{ExitPort, EXIT_PORT};
use crate::devices::legacy::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::rtc::{Rtc, RTC_BASE, RTC_LEN};
use crate::devices::serial::{ConsoleSink, SerialDevice, COM1_BASE, COM1_LEN};
use crate::devices::virtio::fs::{self as virtio_fs, Fs, FsConfig, FsError};
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::vsock::{self, Vsock, VsockConfig, VsockError};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::{MmioBus, PioBus};
use crate::exit::{ExitHandle, VmExit};
use crate::host::{self, HostError, KvmFlavour};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::snapshot::{self, SnapshotError, SnapshotHeader, VmState};
use crate::vcpu::{self, FirstRun, Vcpu, VcpuControl, VcpuError, VcpuRunState};
use crate::vcpu_state::{SaveCaps, VcpuState, VcpuStateError};

/// Errors of building and starting a VM, one per step.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// `/dev/kvm` is unusable.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A KVM VM-level ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// PVH boot information.
    #[error(transparent)]
    Pvh(#[from] PvhError),
    /// Initial vCPU state.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Device bus layout.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The console output cannot be opened.
    #[error("cannot open console output {}", .path.display())]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The vsock device.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The virtio-fs device.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Writing or reading a snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Saving or restoring a vCPU.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// A device's state cannot be saved or restored (no support yet, busy, or invalid).
    #[error("virtio device state")]
    DeviceState(#[from] crate::devices::virtio::state::DeviceStateError),
    /// An operation the VM's current state does not allow.
    #[error("cannot {op} a VM that is {state}")]
    IllegalTransition {
        /// What was asked.
        op: &'static str,
        /// The VM's state.
        state: VmRunState,
    },
    /// A vCPU did not park (or answer) in time.
    #[error("vCPU {index} did not {what} within {timeout:?}")]
    VcpuTimeout {
        /// vCPU index.
        index: u8,
        /// Pause or save.
        what: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// A device thread could not start.
    #[error("cannot start the {what} thread")]
    DeviceThread {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Most bytes of guest console kept in a console file; the rest is dropped.
pub const CONSOLE_FILE_LIMIT: u64 = 64 << 20;

/// Where the guest console goes.
pub enum Console {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated, holding at most [`CONSOLE_FILE_LIMIT`] bytes.
    File(PathBuf),
    /// Any writer (tests).
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Console::Stdout => f.write_str("Stdout"),
            Console::File(p) => f.debug_tuple("File").field(p).finish(),
            Console::Writer(_) => f.write_str("Writer"),
        }
    }
}

impl Console {
    fn open(self) -> Result<ConsoleSink, VmError> {
        Ok(match self {
            Console::Stdout => ConsoleSink::new(Box::new(std::io::stdout())),
            Console::File(path) => ConsoleSink::new(Box::new(
                std::fs::File::create(&path).map_err(|source| VmError::Console { path, source })?,
            ))
            .with_limit(CONSOLE_FILE_LIMIT),
            Console::Writer(w) => ConsoleSink::new(w),
        })
    }
}

/// Which CPU profile to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuProfileChoice {
    /// Compat on `kvm_pvm`, host everywhere else.
    #[default]
    Auto,
    /// Force one.
    Fixed(CpuProfile),
}

impl CpuProfileChoice {
    /// The profile this choice means on this host.
    pub fn resolve(self) -> CpuProfile {
        match self {
            CpuProfileChoice::Fixed(p) => p,
            CpuProfileChoice::Auto if host::detect_flavour() == KvmFlavour::Pvm => {
                CpuProfile::Compat
            }
            CpuProfileChoice::Auto => CpuProfile::Host,
        }
    }
}

/// What the VM is made of, before any boot payload.
#[derive(Debug)]
pub struct MachineConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest console.
    pub console: Console,
    /// CPU feature profile.
    pub cpu_profile: CpuProfileChoice,
    /// When the VMM started, to log the host-side start cost.
    pub started_at: Option<Instant>,
    /// A virtio-vsock device (hybrid vsock over a Unix socket), if any.
    pub vsock: Option<VsockConfig>,
    /// A virtio-fs device exporting a host directory, if any.
    pub fs: Option<FsConfig>,
}

/// Smallest guest the VMM accepts: room for boot data below 1 MiB and a kernel above it.
pub const MIN_MEMORY_MIB: u64 = 8;
/// Largest guest the VMM accepts.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// What a snapshot is restored with: where its console goes, and what the caller expects.
#[derive(Debug)]
pub struct RestoreConfig {
    /// Guest console.
    pub console: Console,
    /// CPU feature profile; must give the CPUID the snapshot was taken with.
    pub cpu_profile: CpuProfileChoice,
    /// When the VMM started, to log the host-side start cost.
    pub started_at: Option<Instant>,
    /// Refuse the snapshot unless it has this many vCPUs.
    pub expect_vcpus: Option<u8>,
    /// Refuse the snapshot unless it has this much memory.
    pub expect_memory_mib: Option<u64>,
    /// Refuse the snapshot unless it was made for this template key.
    pub expect_template_key: Option<String>,
    /// The new host Unix socket of the vsock device (needed when the snapshot has one).
    pub vsock_uds: Option<PathBuf>,
    /// The directory the restored virtio-fs device exports (needed when the snapshot has one).
    pub shared_dir: Option<PathBuf>,
}

/// Whether a started VM runs or is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRunState {
    /// vCPUs run the guest.
    Running,
    /// Every vCPU is parked outside `KVM_RUN`.
    Paused,
    /// A vCPU thread ended: the VM is stopping.
    Stopped,
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmRunState::Running => "running",
            VmRunState::Paused => "paused",
            VmRunState::Stopped => "stopped",
        })
    }
}

/// A VM with memory, devices and vCPUs, not yet running.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPUs, then the VM, then its memory.
    vcpus: Vec<Vcpu>,
    fd: VmFd,
    mem: GuestMemoryMmap,
    ram_size: u64,
    exit: Arc<ExitHandle>,
    first_run: Arc<FirstRun>,
    profile: CpuProfile,
    vsock: Option<Arc<Mutex<Vsock>>>,
    fs: Option<Arc<Mutex<Fs>>>,
    /// virtio-mmio transports, in slot order.
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
    cpuid_hash: u32,
    payload: Option<String>,
    template_key: Option<String>,
    /// Restored from a snapshot: the guest gets a vsock transport reset once it runs.
    restored: bool,
}

/// The parts of a VM that a fresh boot and a restore build alike.
struct Parts {
    vcpus: u8,
    ram_size: u64,
    mem: GuestMemoryMmap,
    console: ConsoleSink,
    serial_state: Option<vm_superio::SerialState>,
    profile: CpuProfile,
    started_at: Option<Instant>,
    vsock: Option<VsockConfig>,
    fs: Option<FsConfig>,
}

impl Vm {
    /// Creates the VM: KVM VM with in-kernel irqchip and PIT, memory, devices, vCPUs.
    pub fn new(config: MachineConfig) -> Result<Vm, VmError> {
        if config.vcpus == 0 {
            return Err(VmError::Config("at least one vCPU is needed".into()));
        }
        if config.vcpus > mptable::MAX_CPUS {
            return Err(VmError::Config(format!(
                "at most {} vCPUs are supported, {} asked",
                mptable::MAX_CPUS,
                config.vcpus
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
            return Err(VmError::Config(format!(
                "guest memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB, {} MiB asked",
                config.memory_mib
            )));
        }
        let kvm = host::open_kvm()?;
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max_vcpus {
            return Err(VmError::Config(format!(
                "this host's KVM allows at most {max_vcpus} vCPUs, {} asked",
                config.vcpus
            )));
        }
        let profile = config.cpu_profile.resolve();
        log::info!(
            "host KVM: {}; guest CPU profile: {profile}",
            host::detect_flavour()
        );

        let ram_size = config.memory_mib << 20;
        let vm = Vm::build(
            &kvm,
            Parts {
                vcpus: config.vcpus,
                ram_size,
                mem: memory::create(ram_size)?,
                console: config.console.open()?,
                serial_state: None,
                profile,
                started_at: config.started_at,
                vsock: config.vsock,
                fs: config.fs,
            },
        )?;
        for vcpu in &vm.vcpus {
            regs::setup_common(vcpu.fd())?;
        }
        mptable::setup(&vm.mem, config.vcpus)?;
        Ok(vm)
    }

    fn build(kvm: &Kvm, parts: Parts) -> Result<Vm, VmError> {
        let fd = create_vm(kvm)?;
        let mem = parts.mem;
        memory::register(&fd, &mem)?;

        let exit = ExitHandle::new().map_err(VmError::EventFd)?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        fd.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let serial = match &parts.serial_state {
            None => SerialDevice::new(serial_irq, parts.console),
            Some(state) => {
                SerialDevice::from_state(state, serial_irq, parts.console).ok_or_else(|| {
                    SnapshotError::Inconsistent("the serial receive FIFO is overfull".into())
                })?
            }
        };
        let serial = Arc::new(Mutex::new(serial));
        let bus = Arc::new(build_bus(&exit, serial.clone())?);
        let mut mmio = MmioBus::default();
        let mut virtio = Vec::new();
        let vsock = parts
            .vsock
            .as_ref()
            .map(|c| add_vsock(&fd, &mem, &mut mmio, c))
            .transpose()?
            .map(|(device, transport)| {
                virtio.push(transport);
                device
            });
        let fs = parts
            .fs
            .as_ref()
            .map(|c| add_fs(&fd, &mem, &mut mmio, c))
            .transpose()?
            .map(|(device, transport)| {
                virtio.push(transport);
                device
            });
        let mmio = Arc::new(mmio);

        let caps = Arc::new(SaveCaps::probe(kvm));
        let supported = cpuid::supported(kvm)?;
        let mut vcpus = Vec::with_capacity(parts.vcpus.into());
        let mut tables = Vec::with_capacity(parts.vcpus.into());
        for index in 0..parts.vcpus {
            let table = cpuid::for_vcpu(&supported, parts.profile, index, parts.vcpus)?;
            let vcpu = Vcpu::new(
                &fd,
                index,
                &table,
                bus.clone(),
                mmio.clone(),
                exit.clone(),
                caps.clone(),
            )?;
            vcpus.push(vcpu);
            tables.push(table);
        }

        Ok(Vm {
            vcpus,
            fd,
            mem,
            ram_size: parts.ram_size,
            exit,
            first_run: FirstRun::new(parts.started_at),
            profile: parts.profile,
            vsock,
            fs,
            virtio,
            serial,
            cpuid_hash: cpuid_hash(&tables),
            payload: None,
            template_key: None,
            restored: false,
        })
    }

    /// Restores a VM from the snapshot directory `dir`, not yet running. Everything that must
    /// match (magic, checksums, format and VMM versions, shape, CPUID) is checked before any
    /// state is set; a refused snapshot leaves nothing behind.
    pub fn restore(dir: &Path, config: RestoreConfig) -> Result<Vm, VmError> {
        let bytes = snapshot::read_file(&dir.join(snapshot::STATE_FILE))?;
        let (header, rest) = snapshot::decode_header(&bytes)?;
        check_shape(&header, &config)?;
        if let Some(expected) = &config.expect_template_key {
            if header.template_key.as_ref() != Some(expected) {
                return Err(SnapshotError::TemplateKey {
                    found: header.template_key.clone().unwrap_or_else(|| "none".into()),
                    expected: expected.clone(),
                }
                .into());
            }
        }
        let memory_path = dir.join(snapshot::MEMORY_FILE);
        let (memory_crc, memory_len) = snapshot::file_crc(&memory_path)?;
        if memory_len != header.memory_size {
            return Err(SnapshotError::MemorySize {
                found: memory_len,
                expected: header.memory_size,
            }
            .into());
        }
        if memory_crc != header.memory_crc {
            return Err(SnapshotError::MemoryChecksum {
                found: memory_crc,
                expected: header.memory_crc,
            }
            .into());
        }
        let state = snapshot::decode_state(&header, rest)?;
        let memory_mib = header.memory_size >> 20;
        if header.vcpus == 0
            || header.vcpus > mptable::MAX_CPUS
            || !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib)
            || memory_mib << 20 != header.memory_size
        {
            return Err(SnapshotError::Inconsistent(format!(
                "{} vCPUs, {} bytes of memory",
                header.vcpus, header.memory_size
            ))
            .into());
        }

        let vsock = restore_vsock_config(&state, config.vsock_uds.as_deref())?;
        let fs = restore_fs_config(&state, config.shared_dir.as_deref())?;
        let kvm = host::open_kvm()?;
        let profile = config.cpu_profile.resolve();
        let mut vm = Vm::build(
            &kvm,
            Parts {
                vcpus: header.vcpus,
                ram_size: header.memory_size,
                mem: memory::create_from_file(header.memory_size, &memory_path)?,
                console: config.console.open()?,
                serial_state: Some((&state.serial).into()),
                profile,
                started_at: config.started_at,
                vsock,
                fs,
            },
        )?;
        if vm.cpuid_hash != header.cpuid_hash {
            return Err(SnapshotError::Cpuid {
                found: header.cpuid_hash,
                expected: vm.cpuid_hash,
            }
            .into());
        }
        if vm.virtio.len() != state.virtio.len() {
            return Err(SnapshotError::Inconsistent(format!(
                "{} virtio devices saved, {} built",
                state.virtio.len(),
                vm.virtio.len()
            ))
            .into());
        }
        for (transport, saved) in vm.virtio.iter().zip(&state.virtio) {
            transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(saved)?;
        }
        vm.set_vm_state(&state)?;
        for (vcpu, saved) in vm.vcpus.iter().zip(&state.vcpus) {
            saved.restore(vcpu.fd())?;
        }
        vm.payload = header.payload;
        vm.template_key = header.template_key;
        vm.restored = true;
        Ok(vm)
    }

    fn set_vm_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in &state.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("restore the irqchip"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("restore the PIT"))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(kvm_err("restore the clock"))?;
        Ok(())
    }

    /// Names what was loaded into the VM (kernel and initrd, a program), for the snapshot
    /// header.
    pub fn set_payload(&mut self, payload: impl Into<String>) {
        self.payload = Some(payload.into());
    }

    /// Marks the VM as a template for `key`: its snapshots carry the key, and a restore that
    /// expects another key refuses them.
    pub fn set_template_key(&mut self, key: impl Into<String>) {
        self.template_key = Some(key.into());
    }

    /// What was loaded into the VM, if known (kept across snapshots).
    pub fn payload(&self) -> Option<&str> {
        self.payload.as_deref()
    }

    /// The CPU profile in use.
    pub fn cpu_profile(&self) -> CpuProfile {
        self.profile
    }

    /// The handle through which anyone can stop the VM.
    pub fn exit_handle(&self) -> Arc<ExitHandle> {
        self.exit.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Loads a Linux kernel (PVH), an optional initrd and the command line, and points the boot
    /// vCPU at the PVH entry.
    pub fn load_linux(
        &mut self,
        kernel: &std::path::Path,
        initrd: Option<&std::path::Path>,
        cmdline: &linux_loader::cmdline::Cmdline,
    ) -> Result<(), VmError> {
        let loaded = boot::load_kernel(&self.mem, self.ram_size, kernel)?;
        let initrd = initrd
            .map(|path| boot::load_initrd(&self.mem, self.ram_size, loaded.end, path))
            .transpose()?;
        boot::write_cmdline(&self.mem, cmdline)?;
        let start_info = pvh::setup(&self.mem, self.ram_size, initrd)?;
        regs::setup_pvh_boot(self.boot_vcpu()?.fd(), &self.mem, loaded.entry, start_info)?;
        Ok(())
    }

    /// Copies `code` to `addr` and starts the boot vCPU there in 64-bit long mode, with the
    /// first GiB identity-mapped (page tables at 0x9000). For tests that run tiny programs.
    pub fn load_long_mode_program(&mut self, code: &[u8], addr: u64) -> Result<(), VmError> {
        use vm_memory::Bytes;
        self.mem
            .write_slice(code, GuestAddress(addr))
            .map_err(|e| VmError::Config(format!("program does not fit: {e}")))?;
        regs::setup_long_mode(
            self.boot_vcpu()?.fd(),
            &self.mem,
            GuestAddress(0x9000),
            GuestAddress(addr),
        )?;
        Ok(())
    }

    fn boot_vcpu(&self) -> Result<&Vcpu, VmError> {
        self.vcpus
            .first()
            .ok_or_else(|| VmError::Config("the VM has no vCPU".into()))
    }

    /// Starts every vCPU thread.
    pub fn start(self) -> Result<RunningVm, VmError> {
        vcpu::install_kick_handler()?;
        let Vm {
            vcpus,
            fd,
            mem,
            ram_size,
            exit,
            first_run,
            vsock,
            fs,
            virtio,
            serial,
            cpuid_hash,
            payload,
            template_key,
            restored,
            ..
        } = self;
        let mut running = RunningVm {
            threads: Vec::with_capacity(vcpus.len()),
            controls: vcpus.iter().map(Vcpu::control).collect(),
            device_threads: Vec::new(),
            exit,
            state: VmRunState::Running,
            virtio,
            vsock: vsock.clone(),
            serial,
            cpuid_hash,
            payload,
            template_key,
            ram_size,
            fd,
            mem,
        };
        if let Some(dev) = vsock {
            if restored {
                // The host sockets of the snapshotted VM are gone: the guest drops the
                // connections it believes open (there were none at the snapshot, but this also
                // makes it read the CID again).
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send_transport_reset();
            }
            let thread =
                vsock::event_loop::spawn(dev, running.exit.as_raw_fd()).map_err(|source| {
                    VmError::DeviceThread {
                        what: "vsock",
                        source,
                    }
                })?;
            running.device_threads.push(thread);
        }
        if let Some(dev) = fs {
            let thread =
                virtio_fs::event_loop::spawn(dev, running.exit.as_raw_fd()).map_err(|source| {
                    VmError::DeviceThread {
                        what: "virtio-fs",
                        source,
                    }
                })?;
            running.device_threads.push(thread);
        }
        for vcpu in vcpus {
            match vcpu.start(first_run.clone()) {
                Ok(handle) => running.threads.push(handle),
                Err(e) => {
                    running
                        .exit
                        .request(VmExit::Stopped("a vCPU thread failed to start".into()));
                    running.stop_threads();
                    return Err(e.into());
                }
            }
        }
        Ok(running)
    }
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    fd.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("set the TSS address"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit)
        .map_err(kvm_err("create the in-kernel PIT"))?;
    Ok(fd)
}

/// The CPUID hash a VM with `vcpus` vCPUs and `profile` would have on this host (what a
/// snapshot's header records and a restore compares).
pub fn guest_cpuid_hash(profile: CpuProfile, vcpus: u8) -> Result<u32, VmError> {
    let kvm = host::open_kvm()?;
    let supported = cpuid::supported(&kvm)?;
    let tables = (0..vcpus)
        .map(|index| cpuid::for_vcpu(&supported, profile, index, vcpus))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(cpuid_hash(&tables))
}

/// CRC-32 of the serialised CPUID tables: equal hashes mean the guest sees the same CPU.
fn cpuid_hash(tables: &[CpuId]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for table in tables {
        for entry in table.as_slice() {
            for word in [
                entry.function,
                entry.index,
                entry.flags,
                entry.eax,
                entry.ebx,
                entry.ecx,
                entry.edx,
            ] {
                hasher.update(&word.to_le_bytes());
            }
        }
    }
    hasher.finalize()
}

fn check_shape(header: &SnapshotHeader, config: &RestoreConfig) -> Result<(), SnapshotError> {
    if let Some(vcpus) = config.expect_vcpus {
        if vcpus != header.vcpus {
            return Err(SnapshotError::Shape {
                what: "vCPUs",
                found: header.vcpus.into(),
                expected: vcpus.into(),
            });
        }
    }
    if let Some(mib) = config.expect_memory_mib {
        if mib << 20 != header.memory_size {
            return Err(SnapshotError::Shape {
                what: "MiB of memory",
                found: header.memory_size >> 20,
                expected: mib,
            });
        }
    }
    Ok(())
}

/// The vsock device a restore re-creates: the saved CID on the new host socket `uds`.
fn restore_vsock_config(
    state: &VmState,
    uds: Option<&Path>,
) -> Result<Option<VsockConfig>, VmError> {
    use crate::devices::virtio::state::DeviceKind;
    let cid = state.virtio.iter().find_map(|t| match t.device.kind {
        DeviceKind::Vsock { guest_cid } => Some(guest_cid),
        _ => None,
    });
    match (cid, uds) {
        (Some(guest_cid), Some(uds)) => Ok(Some(VsockConfig {
            guest_cid,
            uds_path: uds.to_path_buf(),
        })),
        (Some(_), None) => Err(VmError::Config(
            "the snapshot has a vsock device: a new host socket (--vsock-uds) is needed".into(),
        )),
        (None, Some(_)) => Err(VmError::Config(
            "the snapshot has no vsock device; --vsock-uds cannot be used with it".into(),
        )),
        (None, None) => Ok(None),
    }
}

/// The virtio-fs device a restore re-creates: the saved tag, exporting the new `shared_dir`.
fn restore_fs_config(
    state: &VmState,
    shared_dir: Option<&Path>,
) -> Result<Option<FsConfig>, VmError> {
    use crate::devices::virtio::state::DeviceKind;
    let tag = state.virtio.iter().find_map(|t| match &t.device.kind {
        DeviceKind::Fs { tag } => Some(tag.clone()),
        _ => None,
    });
    match (tag, shared_dir) {
        (Some(tag), Some(dir)) => Ok(Some(FsConfig {
            shared_dir: dir.to_path_buf(),
            tag,
        })),
        (Some(tag), None) => Err(VmError::Config(format!(
            "the snapshot has a virtio-fs device (tag {tag:?}): a shared directory (--shared-dir) is needed"
        ))),
        (None, Some(_)) => Err(VmError::Config(
            "the snapshot has no virtio-fs device; --shared-dir cannot be used with it".into(),
        )),
        (None, None) => Ok(None),
    }
}

fn build_bus(exit: &Arc<ExitHandle>, serial: Arc<Mutex<SerialDevice>>) -> Result<PioBus, VmError> {
    let mut bus = PioBus::default();
    bus.insert(COM1_BASE.into(), COM1_LEN.into(), serial)?;
    bus.insert(
        I8042_BASE.into(),
        I8042_LEN.into(),
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    bus.insert(
        EXIT_PORT.into(),
        1,
        Arc::new(Mutex::new(ExitPort(exit.clone()))),
    )?;
    bus.insert(
        RTC_BASE.into(),
        RTC_LEN.into(),
        Arc::new(Mutex::new(Rtc::default())),
    )?;
    Ok(bus)
}

/// A virtio-mmio transport on the MMIO bus, shared with the VM for snapshots.
type SharedTransport = Arc<Mutex<MmioTransport>>;

/// Attaches a virtio device on a virtio-mmio transport at `base` with interrupt `gsi`; its
/// queue notifications become ioeventfds.
fn add_virtio<D: VirtioDevice + 'static>(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut MmioBus,
    device: D,
    base: u64,
    gsi: u32,
) -> Result<(Arc<Mutex<D>>, SharedTransport), VmError> {
    let device = Arc::new(Mutex::new(device));
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    fd.register_irqfd(&irqfd, gsi)
        .map_err(kvm_err("register a virtio irqfd"))?;
    let notify = kvm_ioctls::IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY);
    {
        let d = device.lock().unwrap_or_else(|e| e.into_inner());
        for (index, evt) in d.queue_events().iter().enumerate() {
            fd.register_ioevent(evt, &notify, index as u32)
                .map_err(kvm_err("register a virtio queue ioeventfd"))?;
        }
    }
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device.clone(),
        mem.clone(),
        Interrupt::new(irqfd),
    )));
    mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
    Ok((device, transport))
}

/// The first virtio-mmio device: vsock at `VIRTIO_MMIO_BASE`, GSI `VIRTIO_GSI_BASE`.
fn add_vsock(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut MmioBus,
    config: &VsockConfig,
) -> Result<(Arc<Mutex<Vsock>>, SharedTransport), VmError> {
    add_virtio(
        fd,
        mem,
        mmio,
        Vsock::new(config)?,
        VIRTIO_MMIO_BASE,
        VIRTIO_GSI_BASE,
    )
}

/// virtio-fs: the MMIO slot and GSI after the vsock one (`FS_MMIO_BASE`, `FS_GSI`).
fn add_fs(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut MmioBus,
    config: &FsConfig,
) -> Result<(Arc<Mutex<Fs>>, SharedTransport), VmError> {
    add_virtio(fd, mem, mmio, Fs::new(config)?, FS_MMIO_BASE, FS_GSI)
}

/// A running VM. Dropping it without [`RunningVm::wait`] stops it.
#[derive(Debug)]
pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    controls: Vec<Arc<VcpuControl>>,
    /// Device event loops; they end once the stop is requested.
    device_threads: Vec<JoinHandle<()>>,
    exit: Arc<ExitHandle>,
    state: VmRunState,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    serial: Arc<Mutex<SerialDevice>>,
    cpuid_hash: u32,
    payload: Option<String>,
    template_key: Option<String>,
    ram_size: u64,
    fd: VmFd,
    mem: GuestMemoryMmap,
}

/// How long pausing waits for every vCPU to park, and a save for its state.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a stopping vCPU thread is kicked until it leaves `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

impl RunningVm {
    /// The handle through which anyone can stop the VM.
    pub fn exit_handle(&self) -> Arc<ExitHandle> {
        self.exit.clone()
    }

    /// Whether the VM runs or is paused.
    pub fn state(&self) -> VmRunState {
        self.state
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.controls.len()
    }

    /// Guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Marks the VM as a template for `key` (see [`Vm::set_template_key`]).
    pub fn set_template_key(&mut self, key: impl Into<String>) {
        self.template_key = Some(key.into());
    }

    /// Open vsock connections (None without a vsock device).
    pub fn vsock_connections(&self) -> Option<usize> {
        self.vsock.as_ref().map(|v| {
            v.lock()
                .unwrap_or_else(|e| e.into_inner())
                .connection_count()
        })
    }

    /// Takes every vCPU out of `KVM_RUN` and parks it; returns once all acknowledged.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.state != VmRunState::Running {
            return Err(VmError::IllegalTransition {
                op: "pause",
                state: self.state,
            });
        }
        for c in &self.controls {
            c.request_pause();
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut stopped = false;
        for (c, t) in self.controls.iter().zip(&self.threads) {
            loop {
                // A kick outside KVM_RUN is lost: kick until the thread acknowledges.
                let _ = t.kill(vcpu::kick_signal());
                match c.wait_parked(KICK_INTERVAL) {
                    VcpuRunState::Paused => break,
                    VcpuRunState::Exited => {
                        stopped = true;
                        break;
                    }
                    VcpuRunState::Running if Instant::now() >= deadline => {
                        self.resume_all();
                        return Err(VmError::VcpuTimeout {
                            index: c.index(),
                            what: "pause",
                            timeout: PAUSE_TIMEOUT,
                        });
                    }
                    VcpuRunState::Running => {}
                }
            }
        }
        if stopped || self.exit.is_requested() {
            self.resume_all();
            self.state = VmRunState::Stopped;
            return Err(VmError::IllegalTransition {
                op: "pause",
                state: self.state,
            });
        }
        self.state = VmRunState::Paused;
        Ok(())
    }

    /// Lets every paused vCPU run the guest again.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.state != VmRunState::Paused {
            return Err(VmError::IllegalTransition {
                op: "resume",
                state: self.state,
            });
        }
        self.resume_all();
        self.state = VmRunState::Running;
        Ok(())
    }

    fn resume_all(&self) {
        for c in &self.controls {
            c.request_resume();
        }
        for c in &self.controls {
            c.wait_unparked(PAUSE_TIMEOUT);
        }
    }

    /// Writes the complete state of the paused VM to the directory `dir` (created if needed):
    /// `memory` first, then `state`, which makes the snapshot valid.
    pub fn snapshot(&self, dir: &Path) -> Result<(), VmError> {
        if self.state != VmRunState::Paused {
            return Err(VmError::IllegalTransition {
                op: "snapshot",
                state: self.state,
            });
        }
        // Device threads are held off for the whole snapshot (they could otherwise write
        // guest memory after their state was saved), and every device is asked first, so
        // that a refusal (a busy or unsupported device) leaves nothing on disk.
        let devices: Vec<_> = self
            .virtio
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).device())
            .collect();
        let guards: Vec<_> = devices
            .iter()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut virtio = Vec::with_capacity(guards.len());
        for (transport, device) in self.virtio.iter().zip(&guards) {
            let state = device.save_state()?;
            virtio.push(
                transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .save_with(state),
            );
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let state_path = dir.join(snapshot::STATE_FILE);
        // An old state must not describe the new memory.
        match std::fs::remove_file(&state_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&state_path)(e).into())
            }
            _ => {}
        }

        let mut vcpus = Vec::with_capacity(self.controls.len());
        for c in &self.controls {
            let saved: VcpuState = c.save(PAUSE_TIMEOUT).ok_or(VmError::VcpuTimeout {
                index: c.index(),
                what: "save its state",
                timeout: PAUSE_TIMEOUT,
            })??;
            vcpus.push(saved);
        }
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in 0..3 {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("read the irqchip"))?;
            irqchips.push(chip);
        }
        let pit = self.fd.get_pit2().map_err(kvm_err("read the PIT"))?;
        let mut clock = self.fd.get_clock().map_err(kvm_err("read the clock"))?;
        // The restored clock goes on from the saved value: no realtime or TSC adjustment.
        clock.flags = 0;
        let serial = (&self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state())
            .into();

        let memory_path = dir.join(snapshot::MEMORY_FILE);
        self.write_memory(&memory_path)?;
        let (memory_crc, _) = snapshot::file_crc(&memory_path)?;
        let header = SnapshotHeader {
            vmm_version: snapshot::VMM_VERSION.into(),
            cpuid_hash: self.cpuid_hash,
            memory_size: self.ram_size,
            vcpus: self.controls.len() as u8,
            payload: self.payload.clone(),
            memory_crc,
            template_key: self.template_key.clone(),
        };
        let state = VmState {
            irqchips,
            pit,
            clock,
            serial,
            vcpus,
            virtio,
        };
        let bytes = snapshot::encode(&header, &state)?;
        snapshot::write_file_atomic(&state_path, &[&bytes])?;
        drop(guards);
        Ok(())
    }

    fn write_memory(&self, path: &Path) -> Result<(), SnapshotError> {
        use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryRegion};
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        use std::io::{Seek, SeekFrom, Write};
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        // Pages of zeros become holes: the file takes disk space only for what the guest wrote.
        const PAGE: usize = 4096;
        let mut page = [0u8; PAGE];
        let mut size = 0u64;
        for region in self.mem.iter() {
            for offset in (0..region.len()).step_by(PAGE) {
                let len = PAGE.min((region.len() - offset) as usize);
                self.mem
                    .read_slice(&mut page[..len], region.start_addr().unchecked_add(offset))
                    .map_err(|e| io(std::io::Error::other(e)))?;
                if page[..len].iter().all(|b| *b == 0) {
                    file.seek(SeekFrom::Current(len as i64)).map_err(io)?;
                } else {
                    file.write_all(&page[..len]).map_err(io)?;
                }
                size += len as u64;
            }
        }
        file.set_len(size).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Waits until the VM stops for any reason, joins every vCPU thread, returns the reason.
    pub fn wait(mut self) -> VmExit {
        wait_readable(self.exit.as_raw_fd());
        if let Some(r) = memory::resident_kib(&self.mem) {
            log::info!(
                "host memory at exit: guest RAM touched {} KiB, VMM itself {} KiB",
                r.guest,
                r.total.saturating_sub(r.guest)
            );
        }
        self.stop_threads();
        self.exit
            .reason()
            .unwrap_or_else(|| VmExit::Stopped("no reason recorded".into()))
    }

    /// Kicks vCPU threads out of `KVM_RUN` until all have seen the stop request, joins them.
    fn stop_threads(&mut self) {
        if !self.exit.is_requested() {
            self.exit.request(VmExit::Stopped("VM dropped".into()));
        }
        // Parked vCPUs see the stop request when woken.
        for c in &self.controls {
            c.request_resume();
        }
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                // ESRCH only means the thread ended in between.
                let _ = t.kill(vcpu::kick_signal());
            }
            std::thread::sleep(KICK_INTERVAL);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        for t in self.device_threads.drain(..) {
            if t.join().is_err() {
                log::error!("a device thread panicked");
            }
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Blocks until `fd` is readable (or polling fails for good).
fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r > 0 || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
            return;
        }
    }
}
