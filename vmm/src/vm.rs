//! A microVM: KVM VM, guest memory, devices and vCPUs, from creation to the joined stop.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::cpuid::{self, CpuProfile, CpuidError};
use crate::arch::x86_64::layout::{KVM_TSS_ADDR, SERIAL_IRQ};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::arch::x86_64::pvh::{self, PvhError};
use crate::arch::x86_64::regs::{self, RegsError};
use crate::boot::{self, BootError};
use crate::devices::bus::BusError;
use crate::devices::exit_port::{ExitPort, EXIT_PORT};
use crate::devices::legacy::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::rtc::{Rtc, RTC_BASE, RTC_LEN};
use crate::devices::serial::{ConsoleSink, SerialDevice, COM1_BASE, COM1_LEN};
use crate::devices::virtio::manager::{Backend, DeviceConfig, DeviceError, DeviceManager};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{MmioBus, PioBus};
use crate::exit::{ExitHandle, VmExit};
use crate::host::{self, HostError, KvmFlavour};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::snapshot::SnapshotError;
use crate::vcpu::{self, FirstRun, Vcpu, VcpuControl, VcpuError, VcpuRunState};
use crate::vcpu_state::{SaveCaps, VcpuStateError};

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
    /// The virtio devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
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
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
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
    pub(crate) fn open(self) -> Result<ConsoleSink, VmError> {
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
    /// The virtio devices, at most one of each kind.
    pub devices: Vec<DeviceConfig>,
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
    /// The host side of each saved virtio device (a new vsock socket, the directory virtio-fs
    /// exports): each saved device needs one of its kind, and each one needs a saved device.
    pub backends: Vec<Backend>,
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
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) fd: VmFd,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) ram_size: u64,
    exit: Arc<ExitHandle>,
    first_run: Arc<FirstRun>,
    profile: CpuProfile,
    pub(crate) devices: DeviceManager,
    serial: Arc<Mutex<SerialDevice>>,
    pub(crate) cpuid_hash: u32,
    pub(crate) payload: Option<String>,
    pub(crate) template_key: Option<String>,
    /// Restored from a snapshot: each device hears so before the guest runs again.
    pub(crate) restored: bool,
}

/// The parts of a VM that a fresh boot and a restore build alike.
pub(crate) struct Parts {
    pub(crate) vcpus: u8,
    pub(crate) ram_size: u64,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) console: ConsoleSink,
    pub(crate) serial_state: Option<vm_superio::SerialState>,
    pub(crate) profile: CpuProfile,
    pub(crate) started_at: Option<Instant>,
    pub(crate) devices: Vec<DeviceConfig>,
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
                devices: config.devices,
            },
        )?;
        for vcpu in &vm.vcpus {
            regs::setup_common(vcpu.fd())?;
        }
        mptable::setup(&vm.mem, config.vcpus)?;
        Ok(vm)
    }

    pub(crate) fn build(kvm: &Kvm, parts: Parts) -> Result<Vm, VmError> {
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
        let devices = DeviceManager::attach(&fd, &mem, &mut mmio, parts.devices)?;
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
        log_cpu(parts.profile, parts.serial_state.is_some(), &tables);

        Ok(Vm {
            vcpus,
            fd,
            mem,
            ram_size: parts.ram_size,
            exit,
            first_run: FirstRun::new(parts.started_at),
            profile: parts.profile,
            devices,
            serial,
            cpuid_hash: cpuid_hash(&tables),
            payload: None,
            template_key: None,
            restored: false,
        })
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
            devices,
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
            devices,
            serial,
            cpuid_hash,
            payload,
            template_key,
            ram_size,
            fd,
            mem,
        };
        running.device_threads = running.devices.start(running.exit.as_raw_fd(), restored)?;
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

/// Logs the CPU a VM's guest gets, for a cold boot and a restore alike: the host's KVM, the
/// profile and the XSAVE state its CPUID offers (a table a guest kernel would refuse is a
/// warning).
fn log_cpu(profile: CpuProfile, restored: bool, tables: &[CpuId]) {
    let how = if restored { "restored VM" } else { "new VM" };
    let xsave = match tables.first().map(cpuid::xsave_layout) {
        Some(Ok(Some(x))) => format!("XSAVE XCR0 mask {:#x}, {} bytes", x.xcr0_mask, x.max_size),
        Some(Ok(None)) | None => "no XSAVE".to_owned(),
        Some(Err(e)) => {
            log::warn!("guest CPUID leaf 0xd is inconsistent: {e}");
            "XSAVE inconsistent".to_owned()
        }
    };
    log::info!(
        "host KVM: {}; guest CPU profile: {profile} ({how}; {xsave})",
        host::detect_flavour()
    );
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

/// A running VM. Dropping it without [`RunningVm::wait`] stops it.
#[derive(Debug)]
pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    pub(crate) controls: Vec<Arc<VcpuControl>>,
    /// Device event loops; they end once the stop is requested.
    device_threads: Vec<JoinHandle<()>>,
    exit: Arc<ExitHandle>,
    pub(crate) state: VmRunState,
    pub(crate) devices: DeviceManager,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) cpuid_hash: u32,
    pub(crate) payload: Option<String>,
    pub(crate) template_key: Option<String>,
    pub(crate) ram_size: u64,
    pub(crate) fd: VmFd,
    pub(crate) mem: GuestMemoryMmap,
}

/// How long pausing waits for every vCPU to park, and a save for its state.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

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

    /// Runs `f` on the VM's virtio device of type `D`, if it has one.
    pub fn with_device<D: VirtioDevice, R>(&self, f: impl FnOnce(&D) -> R) -> Option<R> {
        self.devices.with(f)
    }

    /// Open vsock connections (None without a vsock device).
    pub fn vsock_connections(&self) -> Option<usize> {
        self.with_device(crate::devices::virtio::vsock::Vsock::connection_count)
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
    if let Err(e) = crate::sys::wait_readable(&[fd]) {
        log::error!("cannot wait for the VM to stop: {e}");
    }
}
