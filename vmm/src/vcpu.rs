//! vCPU threads: run the guest, serve its port I/O, report why they stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::{MmioBus, PioBus};
use crate::exit::{ExitHandle, VmExit};
use crate::vcpu_state::{SaveCaps, VcpuState, VcpuStateError};

/// Errors of creating and starting vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM refused the vCPU.
    #[error("cannot create vCPU {index}")]
    Create {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused the CPUID.
    #[error("cannot set the CPUID of vCPU {index}")]
    Cpuid {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {index}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Signal that interrupts `KVM_RUN` so that a vCPU thread sees a stop request.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static KICK_HANDLER: Once = Once::new();

/// Installs the (empty) kick handler, once per process: the signal's only job is to make
/// `KVM_RUN` return `EINTR` instead of killing the process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    let mut result = Ok(());
    KICK_HANDLER.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::Signal);
    });
    result
}

/// Logs the host-side start cost once, when the boot vCPU first enters the guest.
#[derive(Debug)]
pub struct FirstRun {
    since: Option<Instant>,
    done: AtomicBool,
}

impl FirstRun {
    /// Measures from `since` (the VMM's start), if given.
    pub fn new(since: Option<Instant>) -> Arc<Self> {
        Arc::new(FirstRun {
            since,
            done: AtomicBool::new(false),
        })
    }

    fn mark(&self) {
        if let Some(since) = self.since {
            if !self.done.swap(true, Ordering::Relaxed) {
                log::info!(
                    "first KVM_RUN {:.2} ms after VMM start",
                    since.elapsed().as_secs_f64() * 1e3
                );
            }
        }
    }
}

/// Where a vCPU thread is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Running the guest (or about to).
    Running,
    /// Out of `KVM_RUN`, parked, its state readable.
    Paused,
    /// The thread ended.
    Exited,
}

#[derive(Debug)]
struct ControlInner {
    state: VcpuRunState,
    /// The owner wants the thread parked.
    pause: bool,
    /// The owner wants the parked thread's state.
    save: bool,
    saved: Option<Result<VcpuState, VcpuStateError>>,
}

/// How the VM's owner pauses, resumes and reads one vCPU thread. The thread acknowledges every
/// change of state through the condition variable.
#[derive(Debug)]
pub struct VcpuControl {
    index: u8,
    inner: Mutex<ControlInner>,
    changed: Condvar,
}

/// How long a parked vCPU thread waits before it looks at the stop request again.
const PARK_POLL: Duration = Duration::from_millis(50);

impl VcpuControl {
    fn new(index: u8) -> Arc<Self> {
        Arc::new(VcpuControl {
            index,
            inner: Mutex::new(ControlInner {
                state: VcpuRunState::Running,
                pause: false,
                save: false,
                saved: None,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ControlInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The thread's state as last acknowledged.
    pub fn state(&self) -> VcpuRunState {
        self.lock().state
    }

    /// Asks the thread to park (the caller kicks it out of `KVM_RUN`).
    pub fn request_pause(&self) {
        self.lock().pause = true;
    }

    /// Asks a parked thread to run the guest again.
    pub fn request_resume(&self) {
        self.lock().pause = false;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` until the thread is `Paused` or `Exited`; returns the state then.
    pub fn wait_parked(&self, timeout: Duration) -> VcpuRunState {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |c| c.state == VcpuRunState::Running)
            .unwrap_or_else(|e| e.into_inner());
        guard.state
    }

    /// Waits up to `timeout` until the thread left `Paused`.
    pub fn wait_unparked(&self, timeout: Duration) -> VcpuRunState {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |c| c.state == VcpuRunState::Paused)
            .unwrap_or_else(|e| e.into_inner());
        guard.state
    }

    /// Has the parked thread read its state; `None` when it is not parked or did not answer
    /// within `timeout`.
    pub fn save(&self, timeout: Duration) -> Option<Result<VcpuState, VcpuStateError>> {
        let mut guard = self.lock();
        if guard.state != VcpuRunState::Paused {
            return None;
        }
        guard.save = true;
        guard.saved = None;
        self.changed.notify_all();
        let (mut guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |c| {
                c.saved.is_none() && c.state == VcpuRunState::Paused
            })
            .unwrap_or_else(|e| e.into_inner());
        guard.save = false;
        guard.saved.take()
    }

    fn set_state(&self, state: VcpuRunState) {
        self.lock().state = state;
        self.changed.notify_all();
    }
}

/// One vCPU, before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    exit: Arc<ExitHandle>,
    control: Arc<VcpuControl>,
    caps: Arc<SaveCaps>,
}

impl Vcpu {
    /// Creates vCPU `index` with the given CPUID.
    pub fn new(
        vm: &VmFd,
        index: u8,
        cpuid: &CpuId,
        bus: Arc<PioBus>,
        mmio: Arc<MmioBus>,
        exit: Arc<ExitHandle>,
        caps: Arc<SaveCaps>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        fd.set_cpuid2(cpuid)
            .map_err(|source| VcpuError::Cpuid { index, source })?;
        Ok(Vcpu {
            index,
            fd,
            bus,
            mmio,
            exit,
            control: VcpuControl::new(index),
            caps,
        })
    }

    /// How the owner pauses, resumes and reads this vCPU once its thread runs.
    pub fn control(&self) -> Arc<VcpuControl> {
        self.control.clone()
    }

    /// The KVM vCPU, for setting its initial state.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Starts the vCPU's thread.
    pub fn start(self, first_run: Arc<FirstRun>) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&first_run))
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self, first_run: &FirstRun) {
        crate::jail::drop_thread_capabilities();
        crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Vcpu);
        while !self.exit.is_requested() {
            if self.control.lock().pause {
                self.park();
                continue;
            }
            if self.index == 0 {
                first_run.mark();
            }
            if let Some(reason) = self.run_once() {
                self.exit.request(reason);
            }
        }
        self.control.set_state(VcpuRunState::Exited);
        if log::log_enabled!(log::Level::Debug) {
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            log::debug!("vCPU {} stopped at guest rip {rip:#x}", self.index);
        }
    }

    /// Parks the thread until resumed or stopped, serving state reads meanwhile.
    fn park(&mut self) {
        // The exit just served may have left an I/O completion pending: KVM finishes it on the
        // next KVM_RUN. With `immediate_exit` that entry completes it and returns EINTR at
        // once, so the registers read while parked are the whole truth.
        self.fd.set_kvm_immediate_exit(1);
        if let Some(reason) = self.run_once() {
            self.exit.request(reason);
        }
        self.fd.set_kvm_immediate_exit(0);
        let mut guard = self.control.lock();
        guard.state = VcpuRunState::Paused;
        self.control.changed.notify_all();
        while guard.pause && !self.exit.is_requested() {
            if guard.save && guard.saved.is_none() {
                guard.saved = Some(VcpuState::save(self.index, &self.fd, &self.caps));
                self.control.changed.notify_all();
            }
            guard = self
                .control
                .changed
                .wait_timeout(guard, PARK_POLL)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        guard.state = VcpuRunState::Running;
        self.control.changed.notify_all();
    }

    /// Runs the guest until its next exit and serves it. Returns a reason when the VM must stop.
    fn run_once(&mut self) -> Option<VmExit> {
        let index = self.index;
        let error = |detail: String| {
            Some(VmExit::KvmError {
                vcpu: index,
                detail,
            })
        };
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.bus.read(u64::from(port), data) {
                    crate::ratelimited!(
                        log::Level::Debug,
                        "vCPU {index}: read of unused port {port:#x}"
                    );
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.bus.write(u64::from(port), data) {
                    crate::ratelimited!(
                        log::Level::Debug,
                        "vCPU {index}: write to unused port {port:#x}"
                    );
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    crate::ratelimited!(
                        log::Level::Debug,
                        "vCPU {index}: read of unused MMIO {addr:#x}"
                    );
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    crate::ratelimited!(
                        log::Level::Debug,
                        "vCPU {index}: write to unused MMIO {addr:#x}"
                    );
                }
                None
            }
            Ok(VcpuExit::Shutdown) => {
                log::error!("vCPU {index}: triple fault; {}", self.registers_summary());
                Some(VmExit::TripleFault { vcpu: index })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(VmExit::Reset),
                KVM_SYSTEM_EVENT_CRASH => Some(VmExit::GuestPanic),
                other => error(format!("unknown KVM system event {other}")),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => error(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
            )),
            Ok(VcpuExit::InternalError) => {
                let suberror = self.internal_suberror();
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                error(format!(
                    "KVM internal error {suberror} at guest rip {rip:#x} (on kvm_pvm: an instruction its emulator cannot handle; see host dmesg)"
                ))
            }
            Ok(VcpuExit::Hlt) => error("vCPU halted with no way to wake it".to_string()),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => error(format!("unexpected KVM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => error(format!("KVM_RUN failed: {e}")),
        }
    }

    /// The registers that say where a guest died, as KVM left them (on AMD, KVM resets the
    /// VMCB after a shutdown intercept, so there they are the reset state, not the fault's).
    fn registers_summary(&self) -> String {
        let regs = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        };
        format!("registers as KVM left them: {regs}")
    }

    fn internal_suberror(&mut self) -> u32 {
        crate::sys::internal_error_suberror(self.fd.get_kvm_run()).unwrap_or(0)
    }
}
