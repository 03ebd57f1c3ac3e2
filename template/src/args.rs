//! `nutshell-vmm`'s command line, option by option: one builder for every caller that starts a
//! VMM (the shim's pod VMs, the template VM here, the test harness), so that a flag's name and
//! which options go together are written once.

use std::path::Path;

use crate::Template;

/// What a cold boot runs, and on how much: the guest kernel, its initramfs and command line,
/// vCPUs and memory.
#[derive(Debug, Clone, Copy)]
pub struct Guest<'a> {
    /// Guest kernel (PVH vmlinux).
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u64,
}

/// A `nutshell-vmm` command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmmArgs(Vec<String>);

impl VmmArgs {
    /// No options yet.
    pub fn new() -> Self {
        VmmArgs::default()
    }

    /// A cold boot of `guest`: `--kernel --initrd --memory-mib --vcpus --cmdline`.
    pub fn cold_boot(self, guest: &Guest<'_>) -> Self {
        self.path("--kernel", guest.kernel)
            .path("--initrd", guest.initrd)
            .opt("--memory-mib", guest.memory_mib.to_string())
            .opt("--vcpus", guest.vcpus.to_string())
            .opt("--cmdline", guest.cmdline)
    }

    /// A restore of `template` (whose shape and kernel it keeps): `--restore --template-key`.
    pub fn restore(mut self, template: &Template) -> Self {
        self.0.extend(template.restore_args());
        self
    }

    /// The hybrid vsock socket (`--vsock-uds`).
    pub fn vsock(self, uds: &Path) -> Self {
        self.path("--vsock-uds", uds)
    }

    /// The control socket (`--api-sock`).
    pub fn api_sock(self, path: &Path) -> Self {
        self.path("--api-sock", path)
    }

    /// The guest's console, into a file (`--console`).
    pub fn console(self, path: &Path) -> Self {
        self.path("--console", path)
    }

    /// A virtio-fs device exporting `dir` (`--shared-dir`), tagged `tag` (`--fs-tag`); a
    /// restored device keeps its template's tag, so a restore passes none.
    pub fn shared_dir(self, dir: &Path, tag: Option<&str>) -> Self {
        let args = self.path("--shared-dir", dir);
        match tag {
            Some(tag) => args.opt("--fs-tag", tag),
            None => args,
        }
    }

    /// The VMM jails itself (namespaces, a root of its own files, capabilities, seccomp).
    pub fn jail(self) -> Self {
        self.flag("--jail")
    }

    /// Another option with its value (`--log-level debug`).
    pub fn opt(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.push(name.to_owned());
        self.0.push(value.into());
        self
    }

    /// Another option without a value (`--nic-without-tap`).
    pub fn flag(mut self, name: &str) -> Self {
        self.0.push(name.to_owned());
        self
    }

    fn path(self, name: &str, path: &Path) -> Self {
        self.opt(name, path.to_string_lossy())
    }

    /// The arguments, in the order given.
    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_keep_their_values_and_order() {
        let guest = Guest {
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            cmdline: "quiet console=ttyS0",
            vcpus: 2,
            memory_mib: 256,
        };
        let args = VmmArgs::new()
            .jail()
            .cold_boot(&guest)
            .vsock(Path::new("/v.sock"))
            .shared_dir(Path::new("/shared"), Some("nutshell"))
            .into_vec();
        assert_eq!(
            args,
            [
                "--jail",
                "--kernel",
                "/k",
                "--initrd",
                "/i",
                "--memory-mib",
                "256",
                "--vcpus",
                "2",
                "--cmdline",
                "quiet console=ttyS0",
                "--vsock-uds",
                "/v.sock",
                "--shared-dir",
                "/shared",
                "--fs-tag",
                "nutshell",
            ]
        );
        let template = Template {
            dir: "/t/k1".into(),
            key: "k1".into(),
            built: false,
        };
        let args = VmmArgs::new()
            .restore(&template)
            .shared_dir(Path::new("/shared"), None)
            .into_vec();
        assert_eq!(
            args,
            [
                "--restore",
                "/t/k1",
                "--template-key",
                "k1",
                "--shared-dir",
                "/shared"
            ]
        );
    }
}
