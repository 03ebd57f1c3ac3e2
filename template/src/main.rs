//! `nutshell-template`: makes sure the agent-ready template of a kernel, initramfs, command
//! line and VM shape is in the cache (building it once if not), and prints the
//! `nutshell-vmm` arguments that restore it: `--restore DIR --template-key KEY`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use nutshell_template::{CpuProfile, TemplateConfig, DEFAULT_CACHE_DIR};

/// Finds or builds an agent-ready template and prints how to restore it.
///
/// Output (one line): `--restore DIR --template-key KEY`. With --dir-only: DIR.
#[derive(Debug, Parser)]
#[command(name = "nutshell-template", version, about, long_about)]
struct Args {
    /// The nutshell-vmm binary.
    #[arg(long, value_name = "PATH", default_value = "nutshell-vmm")]
    vmm: PathBuf,
    /// Uncompressed vmlinux with a PVH entry.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// The agent initramfs.
    #[arg(long, value_name = "PATH")]
    initrd: PathBuf,
    /// The user's kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = 128)]
    memory_mib: u64,
    /// Give the template a virtio-fs device with this tag (restored VMs then need
    /// --shared-dir).
    #[arg(long, value_name = "TAG")]
    fs_tag: Option<String>,
    /// Guest CPU profile.
    #[arg(long, value_enum, default_value_t = ProfileArg::Auto)]
    cpu_profile: ProfileArg,
    /// The cache directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR)]
    cache: PathBuf,
    /// Seconds the template VM's agent may take to answer.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    ready_timeout: u64,
    /// Build the template VM jailed (`nutshell-vmm --jail`).
    #[arg(long)]
    jail: bool,
    /// Print only the template's directory.
    #[arg(long)]
    dir_only: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileArg {
    Auto,
    Host,
    Compat,
}

fn main() -> ExitCode {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .parse_default_env()
        .format_target(false)
        .init();
    let args = Args::parse();
    // A jailed VMM sees the files at their absolute paths only.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let config = TemplateConfig {
        vmm: absolute(args.vmm),
        kernel: absolute(args.kernel),
        initrd: absolute(args.initrd),
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        fs_tag: args.fs_tag,
        cpu_profile: match args.cpu_profile {
            ProfileArg::Auto => CpuProfile::Auto,
            ProfileArg::Host => CpuProfile::Host,
            ProfileArg::Compat => CpuProfile::Compat,
        },
        cache_dir: absolute(args.cache),
        ready_timeout: Duration::from_secs(args.ready_timeout),
        jail: args.jail,
    };
    match nutshell_template::ensure(&config) {
        Ok(t) if args.dir_only => {
            println!("{}", t.dir.display());
            ExitCode::SUCCESS
        }
        Ok(t) => {
            println!("{}", t.restore_args().join(" "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "nutshell-template: error: {}",
                nutshell_protocol::error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}
