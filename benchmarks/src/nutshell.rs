//! How the benchmark runs Nutshell: the shim and VMM built in this repository, a config of
//! the benchmark's own (guest kernel and initramfs from `target/nutshell/`, its own run
//! directory) and a VM template directory that the benchmark owns, so that the template is
//! built once (by the warm-up container) and reused by every timed pod, and by later runs: the
//! VMM keys templates by kernel, initramfs, shape and its own build, so reuse is safe.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The environment variable the shim reads its config path from.
pub const CONFIG_ENV: &str = "NUTSHELL_CONFIG";

/// The shim's binary name, as containerd looks it up on `PATH`.
pub const SHIM: &str = "containerd-shim-nutshell-v2";

/// The artifacts a Nutshell pod needs, from a cargo target directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts {
    /// `containerd-shim-nutshell-v2`.
    pub shim: PathBuf,
    /// `nutshell-vmm`.
    pub vmm: PathBuf,
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The guest initramfs with the agent as `/init`.
    pub initramfs: PathBuf,
}

impl Artifacts {
    /// The release builds and guest artifacts under `target` (what `scripts/setup.sh` makes).
    pub fn in_target(target: &Path) -> Self {
        Artifacts {
            shim: target.join("release").join(SHIM),
            vmm: target.join("release").join("nutshell-vmm"),
            kernel: target.join("nutshell").join("vmlinux"),
            initramfs: target.join("nutshell").join("initramfs.cpio"),
        }
    }

    /// The first artifact that is missing, as a reason to report.
    pub fn missing(&self) -> Option<String> {
        [&self.shim, &self.vmm, &self.kernel, &self.initramfs]
            .into_iter()
            .find(|p| !p.is_file())
            .map(|p| format!("{} is missing (scripts/setup.sh builds it)", p.display()))
    }
}

/// The shim configuration the benchmark uses (the keys of the shim's `config.toml`).
#[derive(Debug, serde::Serialize)]
struct ShimConfig<'a> {
    kernel: &'a Path,
    initramfs: &'a Path,
    vmm: &'a Path,
    run_dir: &'a Path,
    boot_timeout_secs: u64,
    rpc_timeout_secs: u64,
    templates: bool,
    template_dir: &'a Path,
}

/// The shim configuration the benchmark uses: its artifacts, a private run directory,
/// templates on in `template_dir`, a generous boot bound (a template build boots the guest).
pub fn config_toml(
    artifacts: &Artifacts,
    run_dir: &Path,
    template_dir: &Path,
) -> Result<String, toml::ser::Error> {
    toml::to_string(&ShimConfig {
        kernel: &artifacts.kernel,
        initramfs: &artifacts.initramfs,
        vmm: &artifacts.vmm,
        run_dir,
        boot_timeout_secs: 600,
        // Guest steps take seconds under an emulated guest kernel, far more with many pods idle.
        rpc_timeout_secs: 300,
        templates: true,
        template_dir,
    })
}

/// The finished templates in `dir` (directories with their `memory` and `state` files), by
/// name. Comparing the set before and after the warm-up container tells whether it built one.
pub fn templates(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join("state").is_file() && e.path().join("memory").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the warm-up did, from the templates before and after it.
pub fn warmup_note(before: &BTreeSet<String>, after: &BTreeSet<String>) -> &'static str {
    if after.difference(before).next().is_some() {
        "template build"
    } else {
        "warm-up container (template restored from the cache)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_artifacts_and_the_template_dir() {
        let a = Artifacts::in_target(Path::new("/t"));
        let cfg = config_toml(&a, Path::new("/run/x"), Path::new("/c/\"q\"/templates")).unwrap();
        assert!(cfg.contains("kernel = \"/t/nutshell/vmlinux\"\n"), "{cfg}");
        assert!(cfg.contains("initramfs = \"/t/nutshell/initramfs.cpio\"\n"));
        assert!(cfg.contains("vmm = \"/t/release/nutshell-vmm\"\n"));
        assert!(cfg.contains("run_dir = \"/run/x\"\n"));
        assert!(cfg.contains("templates = true\n"));
        assert!(cfg.contains("rpc_timeout_secs = 300\n"));
        // A quote in a path is quoted as TOML says (the serializer picks the string form).
        let parsed: toml::Table = toml::from_str(&cfg).unwrap();
        assert_eq!(
            parsed["template_dir"].as_str(),
            Some("/c/\"q\"/templates"),
            "{cfg}"
        );
    }

    #[test]
    fn missing_artifacts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::in_target(dir.path());
        assert!(a.missing().unwrap().contains(SHIM));
        for p in [&a.shim, &a.vmm, &a.kernel, &a.initramfs] {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        assert_eq!(a.missing(), None);
    }

    #[test]
    fn a_template_counts_once_its_state_is_written() {
        let dir = tempfile::tempdir().unwrap();
        assert!(templates(dir.path()).is_empty());
        assert!(templates(&dir.path().join("absent")).is_empty());
        let before = templates(dir.path());
        let t = dir.path().join("abc");
        fs::create_dir(&t).unwrap();
        fs::write(t.join("memory"), b"").unwrap();
        assert!(
            templates(dir.path()).is_empty(),
            "memory without state: unfinished"
        );
        fs::write(t.join("state"), b"").unwrap();
        let after = templates(dir.path());
        assert_eq!(after.iter().collect::<Vec<_>>(), ["abc"]);
        assert_eq!(warmup_note(&before, &after), "template build");
        assert!(warmup_note(&after, &after).contains("restored"));
    }
}
