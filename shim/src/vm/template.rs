//! The template a pod's VM is restored from (found in the cache, or built now).

use std::time::{Duration, Instant};

use super::FS_TAG;
use crate::config::Config;
use crate::pod::VmSize;

/// The template a pod's VM is restored from, found or built now; `None` (logged) when it
/// cannot be had: the VM then boots cold.
pub(super) fn pod_template(
    config: &Config,
    id: &str,
    size: VmSize,
    virtio_fs: bool,
) -> Option<nutshell_template::Template> {
    let template = nutshell_template::TemplateConfig {
        vmm: config.vmm.clone(),
        kernel: config.kernel.clone(),
        initrd: config.initramfs.clone(),
        cmdline: config.kernel_cmdline.clone(),
        vcpus: u8::try_from(size.vcpus).unwrap_or(u8::MAX),
        memory_mib: size.memory_mib,
        fs_tag: virtio_fs.then(|| FS_TAG.to_owned()),
        cpu_profile: nutshell_template::CpuProfile::Auto,
        cache_dir: config.template_dir.clone(),
        ready_timeout: Duration::from_secs(config.boot_timeout_secs),
        jail: true,
    };
    let started = Instant::now();
    match nutshell_template::ensure(&template) {
        Ok(t) => {
            log::info!(
                "sandbox {id}: template {} {} in {:.3} s",
                t.key,
                if t.built { "built" } else { "found" },
                started.elapsed().as_secs_f64()
            );
            Some(t)
        }
        Err(e) => {
            log::warn!(
                "sandbox {id}: no template ({}); booting cold",
                nutshell_protocol::error_chain(&e)
            );
            None
        }
    }
}
