//! The host's KVM: opening it with a clear error, and which flavour it is.

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// Errors of opening and checking `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The KVM device does not exist.
    #[error("{} does not exist: KVM is not available on this host (load kvm_intel or kvm_amd, or enable nested virtualization)", .0.display())]
    NoKvm(PathBuf),
    /// The KVM device exists but cannot be opened.
    #[error("cannot open {} (run as root or as a member of the kvm group)", .path.display())]
    Open {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The file is not a KVM device with the stable API.
    #[error("{} is not a KVM device with API version 12", .0.display())]
    NotKvm(PathBuf),
    /// A capability the VMM needs is missing.
    #[error("the host's KVM lacks {0:?}, which nutshell-vmm needs")]
    MissingCap(Cap),
}

/// Which KVM the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavour {
    /// Hardware virtualization (VMX or SVM), bare metal or nested.
    Hardware,
    /// `kvm_pvm`: software-nested KVM that emulates guest ring 0.
    Pvm,
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavour::Hardware => "hardware KVM",
            KvmFlavour::Pvm => "kvm_pvm (guest ring 0 emulated)",
        })
    }
}

/// Detects the flavour from the loaded kernel modules (once per process: the jail hides
/// `/sys`, so a jailed VMM asks before it enters).
pub fn detect_flavour() -> KvmFlavour {
    static FLAVOUR: std::sync::OnceLock<KvmFlavour> = std::sync::OnceLock::new();
    *FLAVOUR.get_or_init(|| flavour_from_sysfs(Path::new("/sys/module")))
}

fn flavour_from_sysfs(modules: &Path) -> KvmFlavour {
    if modules.join("kvm_pvm").exists() {
        KvmFlavour::Pvm
    } else {
        KvmFlavour::Hardware
    }
}

const REQUIRED_CAPS: &[Cap] = &[
    Cap::Irqchip,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::PitState2,
    Cap::ExtCpuid,
    Cap::ImmediateExit,
];

/// The stable KVM API version.
const KVM_API_VERSION: i32 = 12;

/// Opens `/dev/kvm` and checks the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, HostError> {
    open_kvm_at(Path::new("/dev/kvm"))
}

/// Opens the KVM device at `path` and checks the capabilities the VMM relies on.
pub fn open_kvm_at(path: &Path) -> Result<Kvm, HostError> {
    if !path.exists() {
        return Err(HostError::NoKvm(path.to_owned()));
    }
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| HostError::NotKvm(path.to_owned()))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|source| HostError::Open {
        path: path.to_owned(),
        source,
    })?;
    if kvm.get_api_version() != KVM_API_VERSION {
        return Err(HostError::NotKvm(path.to_owned()));
    }
    for cap in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(HostError::MissingCap(*cap));
        }
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_follows_the_pvm_module() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(flavour_from_sysfs(dir.path()), KvmFlavour::Hardware);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(flavour_from_sysfs(dir.path()), KvmFlavour::Pvm);
    }

    #[test]
    fn missing_or_wrong_device_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("kvm");
        let err = open_kvm_at(&missing).unwrap_err();
        assert!(matches!(err, HostError::NoKvm(_)));
        assert!(err.to_string().contains("does not exist"), "{err}");

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = open_kvm_at(&file).unwrap_err();
        assert!(matches!(err, HostError::NotKvm(_)), "{err}");
    }

    #[test]
    fn real_kvm_opens() {
        open_kvm().expect("/dev/kvm is required for the VMM tests");
    }
}
