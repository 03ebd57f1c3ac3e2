//! The shim's configuration: `/etc/nutshell/config.toml`.
//!
//! Where it is read from, first match wins: containerd's runtime option `ConfigPath`
//! (`[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nutshell.options]`), the
//! `NUTSHELL_CONFIG` environment variable, [`DEFAULT_CONFIG_PATH`]. A missing file at the
//! default path means all defaults; a missing file named explicitly is an error. Unknown keys
//! and bad values are errors that name the key.
//!
//! ```toml
//! kernel = "/usr/local/share/nutshell/vmlinux"
//! initramfs = "/usr/local/share/nutshell/initramfs.cpio"
//! vmm = "/usr/local/bin/nutshell-vmm"
//! run_dir = "/run/nutshell"
//! default_vcpus = 1
//! default_memory_mib = 256
//! max_vcpus = 8
//! max_memory_mib = 8192
//! log_level = "info"
//! kernel_cmdline = "quiet"
//! virtio_fs = "auto"        # auto | on | off
//! boot_timeout_secs = 120
//! rpc_timeout_secs = 30     # bound on one agent call (CreateContainer, Exec, ...)
//! templates = true          # start pods from an agent-ready VM template
//! template_dir = "/var/cache/nutshell/templates"
//! max_starting_vms = 2      # VMs in their start-up at once, node-wide (default: host CPUs)
//!
//! [policy]                  # what a container may ask of the host (see `policy`)
//! allowed_host_paths = ["/"]
//! refuse_privileged = false
//! refuse_node_namespaces = false
//! ```
//!
//! With `templates = true` the VMM restores each pod's VM from a template of its kernel,
//! initramfs, command line and shape (built on first use: one boot), instead of booting it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::Policy;

/// Where the configuration is read from by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nutshell/config.toml";

/// The environment variable that names another configuration file.
pub const CONFIG_ENV: &str = "NUTSHELL_CONFIG";

/// Most vCPUs a VM can have (the VMM takes a u8).
pub const VCPUS_CEILING: u32 = 254;

/// Least guest memory that boots the guest kernel and the agent.
pub const MIN_MEMORY_MIB: u64 = 64;

/// Whether the VMM gets `--shared-dir/--fs-tag` (virtio-fs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtioFs {
    /// Pass them when `nutshell-vmm --help` lists `--shared-dir`.
    Auto,
    /// Always pass them.
    On,
    /// Never pass them (containers then cannot get a rootfs).
    Off,
}

/// The configuration. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Guest kernel: uncompressed vmlinux with a PVH entry.
    pub kernel: PathBuf,
    /// Guest initramfs (uncompressed newc cpio) with nutshell-agent as `/init`.
    pub initramfs: PathBuf,
    /// The `nutshell-vmm` binary.
    pub vmm: PathBuf,
    /// Per-sandbox state: `<run_dir>/<sandbox-id>/` (sockets, console, shared directory).
    pub run_dir: PathBuf,
    /// vCPUs of a VM whose pod sets no CPU limit.
    pub default_vcpus: u32,
    /// Guest memory of a VM whose pod sets no memory limit, and the base added to a limit.
    pub default_memory_mib: u64,
    /// Most vCPUs one pod's VM may get.
    pub max_vcpus: u32,
    /// Most guest memory one pod's VM may get.
    pub max_memory_mib: u64,
    /// Level of the shim's log: error, warn, info, debug, trace.
    pub log_level: String,
    /// Extra guest kernel command line (the VMM adds what its devices need).
    pub kernel_cmdline: String,
    /// Whether the VMM exports the shared directory with virtio-fs.
    pub virtio_fs: VirtioFs,
    /// Bound on booting the VM until the agent answers.
    pub boot_timeout_secs: u64,
    /// Bound on one agent call that is not meant to block (everything but waits).
    pub rpc_timeout_secs: u64,
    /// Start VMs from agent-ready templates (restore instead of a boot).
    pub templates: bool,
    /// Where templates are kept (one directory per kernel, initramfs and shape).
    pub template_dir: PathBuf,
    /// Most VMs in their start-up (VM up to the first container created) at once on the
    /// node; more wait for a slot (see `start_gate`). Default: the host's CPU count; 0: no
    /// bound.
    pub max_starting_vms: u32,
    /// `[policy]`: which host paths, devices, privileges and namespace modes a container may
    /// ask for.
    pub policy: Policy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kernel: PathBuf::from("/usr/local/share/nutshell/vmlinux"),
            initramfs: PathBuf::from("/usr/local/share/nutshell/initramfs.cpio"),
            vmm: PathBuf::from("/usr/local/bin/nutshell-vmm"),
            run_dir: PathBuf::from("/run/nutshell"),
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
            log_level: "info".to_owned(),
            kernel_cmdline: "quiet".to_owned(),
            virtio_fs: VirtioFs::Auto,
            boot_timeout_secs: 120,
            rpc_timeout_secs: 30,
            templates: true,
            template_dir: PathBuf::from("/var/cache/nutshell/templates"),
            max_starting_vms: host_cpus(),
            policy: Policy::default(),
        }
    }
}

/// The CPUs this process may run on (1 when unknown).
fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (unknown key, wrong type).
    #[error("invalid configuration {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser says, with the key and line.
        message: String,
    },
    /// A value is out of its range.
    #[error("invalid configuration {}: {key}: {reason}", path.display())]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl Config {
    /// Parses and checks a configuration; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the configuration from `explicit` (containerd's `ConfigPath`), else
    /// `$NUTSHELL_CONFIG`, else [`DEFAULT_CONFIG_PATH`] (where a missing file means defaults).
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let (path, required) = match (explicit, from_env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// The log level as a filter.
    pub fn log_filter(&self) -> log::LevelFilter {
        self.log_level.parse().unwrap_or(log::LevelFilter::Info)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: String| ConfigError::Value {
            path: path.to_path_buf(),
            key,
            reason,
        };
        for (key, p) in [
            ("kernel", &self.kernel),
            ("initramfs", &self.initramfs),
            ("vmm", &self.vmm),
            ("run_dir", &self.run_dir),
            ("template_dir", &self.template_dir),
        ] {
            if !p.is_absolute() {
                return Err(bad(key, format!("{} is not an absolute path", p.display())));
            }
        }
        if self.max_vcpus == 0 || self.max_vcpus > VCPUS_CEILING {
            return Err(bad(
                "max_vcpus",
                format!("{} is not in 1..={VCPUS_CEILING}", self.max_vcpus),
            ));
        }
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            return Err(bad(
                "default_vcpus",
                format!(
                    "{} is not in 1..=max_vcpus ({})",
                    self.default_vcpus, self.max_vcpus
                ),
            ));
        }
        if self.max_memory_mib < MIN_MEMORY_MIB {
            return Err(bad(
                "max_memory_mib",
                format!("{} is less than {MIN_MEMORY_MIB}", self.max_memory_mib),
            ));
        }
        if self.default_memory_mib < MIN_MEMORY_MIB || self.default_memory_mib > self.max_memory_mib
        {
            return Err(bad(
                "default_memory_mib",
                format!(
                    "{} is not in {MIN_MEMORY_MIB}..=max_memory_mib ({})",
                    self.default_memory_mib, self.max_memory_mib
                ),
            ));
        }
        if self.log_level.parse::<log::LevelFilter>().is_err() {
            return Err(bad(
                "log_level",
                format!(
                    "{:?} is not one of off, error, warn, info, debug, trace",
                    self.log_level
                ),
            ));
        }
        if self.boot_timeout_secs == 0 {
            return Err(bad("boot_timeout_secs", "must be more than 0".to_owned()));
        }
        if self.rpc_timeout_secs == 0 {
            return Err(bad("rpc_timeout_secs", "must be more than 0".to_owned()));
        }
        self.policy
            .validate()
            .map_err(|(key, reason)| bad(key, reason))?;
        Ok(())
    }

    /// How long the shim waits for the agent of a new VM: the boot bound, twice over with
    /// templates (the first pod of a shape boots the template, snapshots it, then restores).
    pub fn agent_timeout(&self) -> std::time::Duration {
        let factor = if self.templates { 2 } else { 1 };
        std::time::Duration::from_secs(self.boot_timeout_secs.saturating_mul(factor))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/nutshell/config.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        // The defaults pass their own checks.
        Config::default().validate(Path::new("x")).unwrap();
    }

    #[test]
    fn good_file_parses() {
        let c = parse(
            r#"
            kernel = "/opt/k/vmlinux"
            initramfs = "/opt/k/initramfs.cpio"
            vmm = "/opt/bin/nutshell-vmm"
            run_dir = "/tmp/nutshell-test"
            default_vcpus = 2
            default_memory_mib = 128
            max_vcpus = 4
            max_memory_mib = 1024
            log_level = "debug"
            kernel_cmdline = "quiet nutshell.log=debug"
            virtio_fs = "off"
            boot_timeout_secs = 300
            rpc_timeout_secs = 90
            templates = false
            template_dir = "/var/tmp/templates"
            max_starting_vms = 0
            "#,
        )
        .unwrap();
        assert_eq!(c.kernel, Path::new("/opt/k/vmlinux"));
        assert_eq!(c.run_dir, Path::new("/tmp/nutshell-test"));
        assert_eq!((c.default_vcpus, c.max_vcpus), (2, 4));
        assert_eq!((c.default_memory_mib, c.max_memory_mib), (128, 1024));
        assert_eq!(c.log_filter(), log::LevelFilter::Debug);
        assert_eq!(c.virtio_fs, VirtioFs::Off);
        assert_eq!(c.boot_timeout_secs, 300);
        assert_eq!(c.rpc_timeout_secs, 90);
        assert!(!c.templates);
        assert_eq!(c.template_dir, Path::new("/var/tmp/templates"));
        assert_eq!(c.max_starting_vms, 0, "0: no bound");
        assert!(Config::default().max_starting_vms >= 1);
        assert_eq!(c.agent_timeout(), std::time::Duration::from_secs(300));
        assert_eq!(
            Config::default().agent_timeout(),
            std::time::Duration::from_secs(240),
            "the first pod of a shape builds the template, then restores it"
        );
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = parse("kernal = \"/x\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert!(e.to_string().contains("kernal"), "{e}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let e = parse("default_vcpus = \"two\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert!(e.to_string().contains("default_vcpus"), "{e}");
        let e = parse("virtio_fs = \"maybe\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        let e = parse("templates = \"yes\"\n").unwrap_err();
        assert!(e.to_string().contains("templates"), "{e}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        for (text, key) in [
            ("default_vcpus = 0", "default_vcpus"),
            ("default_vcpus = 9", "default_vcpus"),
            ("max_vcpus = 1000", "max_vcpus"),
            ("default_memory_mib = 16", "default_memory_mib"),
            ("max_memory_mib = 32", "max_memory_mib"),
            ("log_level = \"loud\"", "log_level"),
            ("kernel = \"vmlinux\"", "kernel"),
            ("run_dir = \"run\"", "run_dir"),
            ("boot_timeout_secs = 0", "boot_timeout_secs"),
            ("rpc_timeout_secs = 0", "rpc_timeout_secs"),
            ("template_dir = \"cache\"", "template_dir"),
        ] {
            match parse(text) {
                Err(ConfigError::Value { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_policy_section_parses_and_is_checked() {
        assert_eq!(
            parse("").unwrap().policy,
            crate::policy::Policy::default(),
            "no [policy]: today's behaviour"
        );
        let c = parse(
            r#"
            [policy]
            allowed_host_paths = ["/var/lib/kubelet/pods/{pod_uid}", "/run/x"]
            refuse_privileged = true
            refuse_node_namespaces = true
            "#,
        )
        .unwrap();
        assert_eq!(c.policy.allowed_host_paths.len(), 2);
        assert!(c.policy.refuse_privileged && c.policy.refuse_node_namespaces);
        let e = parse("[policy]\nallowed_host_path = []\n").unwrap_err();
        assert!(e.to_string().contains("allowed_host_path"), "{e}");
        match parse("[policy]\nallowed_host_paths = [\"var/lib\"]\n") {
            Err(ConfigError::Value { key, .. }) => assert_eq!(key, "policy.allowed_host_paths"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn explicit_path_must_exist_and_wins() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        assert!(matches!(
            Config::load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "default_memory_mib = 512\n").unwrap();
        assert_eq!(Config::load(Some(&file)).unwrap().default_memory_mib, 512);
    }
}
