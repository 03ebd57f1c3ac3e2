//! The VMM's command line (the shim/VMM contract) and what the VMM binary supports.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nutshell_template::{Guest, VmmArgs};

use super::{SandboxPaths, FS_TAG, NET_FD};
use crate::config::Config;
use crate::pod::VmSize;

/// Whether the VMM binary accepts `--shared-dir` (asked once per process).
pub(super) fn vmm_supports_shared_dir(vmm: &Path) -> bool {
    static SUPPORT: OnceLock<bool> = OnceLock::new();
    *SUPPORT.get_or_init(|| {
        let child = Command::new(vmm)
            .arg("--help")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            return false;
        };
        let mut help = String::new();
        let read = child
            .stdout
            .take()
            .map(|mut out| out.read_to_string(&mut help));
        // The crate's reaper may have reaped it already; that is fine.
        let _ = child.wait();
        matches!(read, Some(Ok(_))) && help.contains("--shared-dir")
    })
}

/// The VMM's command line for a sandbox: a cold boot of the configured kernel, or with
/// `template` a restore of it; `net_mac`: the VM has a NIC with this MAC on the tap at
/// [`NET_FD`] (a restored NIC keeps the template's MAC, and the agent sets the pod's).
pub fn vmm_args(
    config: &Config,
    paths: &SandboxPaths,
    size: VmSize,
    virtio_fs: bool,
    net_mac: Option<&str>,
    template: Option<&nutshell_template::Template>,
) -> Vec<String> {
    let args = VmmArgs::new().jail();
    let mut args = match template {
        Some(t) => args.restore(t),
        None => args.cold_boot(&Guest {
            kernel: &config.kernel,
            initrd: &config.initramfs,
            cmdline: &config.kernel_cmdline,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
        }),
    }
    .vsock(&paths.vsock())
    .api_sock(&paths.api())
    .console(&paths.console())
    .opt(
        "--log-level",
        config.log_filter().to_string().to_lowercase(),
    );
    // A restored device keeps the template's tag and MAC.
    let cold = template.is_none();
    if virtio_fs {
        args = args.shared_dir(&paths.shared(), cold.then_some(FS_TAG));
    }
    if let Some(mac) = net_mac {
        args = args.opt("--net-fd", NET_FD.to_string());
        if cold {
            args = args.opt("--net-mac", mac);
        }
    }
    args.into_vec()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn vmm_command_line_follows_the_contract() {
        let config = Config {
            run_dir: "/run/nutshell".into(),
            ..Config::default()
        };
        let paths = SandboxPaths::new(&config.run_dir, "pod1");
        let size = VmSize {
            vcpus: 2,
            memory_mib: 512,
        };
        let template = nutshell_template::Template {
            dir: "/var/cache/nutshell/templates/k1".into(),
            key: "k1".into(),
            built: false,
        };
        let args = vmm_args(&config, &paths, size, true, None, Some(&template)).join(" ");
        for want in [
            "--restore /var/cache/nutshell/templates/k1 --template-key k1",
            "--vsock-uds /run/nutshell/pod1/vsock.sock",
            "--api-sock /run/nutshell/pod1/vmm.sock",
            "--shared-dir /run/nutshell/pod1/shared",
            "--console /run/nutshell/pod1/console.log",
            "--jail",
        ] {
            assert!(args.contains(want), "{want} missing in {args}");
        }
        for unwanted in [
            "--kernel",
            "--initrd",
            "--memory-mib",
            "--vcpus",
            "--cmdline",
            "--fs-tag",
        ] {
            assert!(
                !args.contains(unwanted),
                "{unwanted} with --restore: {args}"
            );
        }
        let args = vmm_args(
            &config,
            &paths,
            size,
            true,
            Some("02:42:0a:00:00:05"),
            Some(&template),
        )
        .join(" ");
        assert!(
            args.contains("--net-fd 3") && !args.contains("--net-mac"),
            "{args}"
        );
        let args = vmm_args(&config, &paths, size, true, None, None).join(" ");
        for want in [
            "--kernel /usr/local/share/nutshell/vmlinux",
            "--initrd /usr/local/share/nutshell/initramfs.cpio",
            "--memory-mib 512",
            "--vcpus 2",
            "--vsock-uds /run/nutshell/pod1/vsock.sock",
            "--shared-dir /run/nutshell/pod1/shared",
            "--fs-tag nutshell",
            "--console /run/nutshell/pod1/console.log",
            "--api-sock /run/nutshell/pod1/vmm.sock",
            "--jail",
        ] {
            assert!(args.contains(want), "{want} missing in {args}");
        }
        assert!(!args.contains("--restore"), "{args}");
        let args = vmm_args(&config, &paths, size, false, None, None).join(" ");
        assert!(!args.contains("--shared-dir") && !args.contains("--fs-tag"));
        let cold = config;
        let args = vmm_args(&cold, &paths, size, true, None, None).join(" ");
        assert!(
            !args.contains("--net-fd"),
            "no NIC without a pod network: {args}"
        );
        let args = vmm_args(&cold, &paths, size, true, Some("02:42:0a:00:00:05"), None).join(" ");
        assert!(
            args.contains("--net-fd 3 --net-mac 02:42:0a:00:00:05"),
            "{args}"
        );
    }
}
