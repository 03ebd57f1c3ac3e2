//! The VMM's command line (the shim/VMM contract) and what the VMM binary supports.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

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
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let mut args = vec![
        // The VMM jails itself (namespaces, a root of its own files, capabilities, seccomp).
        "--jail".to_owned(),
    ];
    match template {
        Some(t) => args.extend(t.restore_args()),
        None => args.extend([
            "--kernel".to_owned(),
            p(&config.kernel),
            "--initrd".to_owned(),
            p(&config.initramfs),
            "--memory-mib".to_owned(),
            size.memory_mib.to_string(),
            "--vcpus".to_owned(),
            size.vcpus.to_string(),
            "--cmdline".to_owned(),
            config.kernel_cmdline.clone(),
        ]),
    }
    args.extend([
        "--vsock-uds".to_owned(),
        p(&paths.vsock()),
        "--api-sock".to_owned(),
        p(&paths.api()),
        "--console".to_owned(),
        p(&paths.console()),
        "--log-level".to_owned(),
        config.log_filter().to_string().to_lowercase(),
    ]);
    if virtio_fs {
        args.extend(["--shared-dir".to_owned(), p(&paths.shared())]);
        if template.is_none() {
            args.extend(["--fs-tag".to_owned(), FS_TAG.to_owned()]);
        }
    }
    if let Some(mac) = net_mac {
        args.extend(["--net-fd".to_owned(), NET_FD.to_string()]);
        if template.is_none() {
            args.extend(["--net-mac".to_owned(), mac.to_owned()]);
        }
    }
    args
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
