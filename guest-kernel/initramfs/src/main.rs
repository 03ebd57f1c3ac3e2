//! `nutshell-initramfs`: writes a Nutshell guest initramfs (newc cpio).

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::Parser;

/// Writes a newc cpio initramfs for a Nutshell guest.
///
/// The archive always holds /dev/console (c 5 1), /dev/null (c 1 3), /proc, /sys, /run,
/// /tmp (1777) and /init (0755, from --init). Then come the --dir, the --file and the --symlink
/// entries, each kind in the order given; directories a path implies are created (0755) as
/// needed. Output is reproducible: mtimes, uids and gids are 0 and the order is fixed.
#[derive(Debug, Parser)]
#[command(version, after_help = EXAMPLES)]
struct Args {
    /// Host file that becomes /init (PID 1 of the guest), e.g. a static musl binary.
    #[arg(long, value_name = "PATH")]
    init: PathBuf,

    /// Where to write the archive (replaced atomically).
    #[arg(short, long, value_name = "OUT")]
    output: PathBuf,

    /// Copy a host file into the archive; MODE is octal (default: the host file's mode).
    #[arg(long = "file", value_name = "HOST:GUEST[:MODE]")]
    files: Vec<FileSpec>,

    /// Add a directory; MODE is octal (default 755).
    #[arg(long = "dir", value_name = "GUEST[:MODE]")]
    dirs: Vec<DirSpec>,

    /// Add a symbolic link GUEST pointing to TARGET.
    #[arg(long = "symlink", value_name = "GUEST:TARGET")]
    symlinks: Vec<SymlinkSpec>,
}

const EXAMPLES: &str = "\
Examples:
  nutshell-initramfs --init target/x86_64-unknown-linux-musl/release/nutshell-test-init \\
      -o target/test-initramfs.cpio
  nutshell-initramfs --init agent -o initramfs.cpio \\
      --file busybox:/bin/busybox:755 --symlink /bin/sh:busybox --dir /etc";

/// `HOST:GUEST[:MODE]`; a trailing `:MODE` is taken as a mode only if it is octal.
#[derive(Debug, Clone)]
struct FileSpec {
    host: PathBuf,
    guest: String,
    mode: Option<u32>,
}

impl FromStr for FileSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (rest, mode) = match s.rsplit_once(':') {
            Some((rest, mode)) if rest.contains(':') && is_octal(mode) => {
                (rest, Some(parse_mode(mode)?))
            }
            _ => (s, None),
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            bail!("expected HOST:GUEST[:MODE], got {s:?}");
        };
        if host.is_empty() || guest.is_empty() {
            bail!("expected HOST:GUEST[:MODE], got {s:?}");
        }
        Ok(Self {
            host: host.into(),
            guest: guest.to_owned(),
            mode,
        })
    }
}

/// `GUEST[:MODE]`.
#[derive(Debug, Clone)]
struct DirSpec {
    guest: String,
    mode: u32,
}

impl FromStr for DirSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.rsplit_once(':') {
            Some((guest, mode)) if is_octal(mode) => Ok(Self {
                guest: guest.to_owned(),
                mode: parse_mode(mode)?,
            }),
            _ => Ok(Self {
                guest: s.to_owned(),
                mode: 0o755,
            }),
        }
    }
}

/// `GUEST:TARGET`.
#[derive(Debug, Clone)]
struct SymlinkSpec {
    guest: String,
    target: String,
}

impl FromStr for SymlinkSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some((guest, target)) if !guest.is_empty() && !target.is_empty() => Ok(Self {
                guest: guest.to_owned(),
                target: target.to_owned(),
            }),
            _ => bail!("expected GUEST:TARGET, got {s:?}"),
        }
    }
}

fn is_octal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (b'0'..=b'7').contains(&b))
}

fn parse_mode(s: &str) -> Result<u32> {
    u32::from_str_radix(s, 8).with_context(|| format!("invalid octal mode {s:?}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut archive = nutshell_initramfs::with_init(&args.init)
        .with_context(|| format!("cannot use {} as /init", args.init.display()))?;
    for dir in &args.dirs {
        archive.dir(&dir.guest, dir.mode)?;
    }
    for file in &args.files {
        archive.file_from_host(&file.guest, &file.host, file.mode)?;
    }
    for link in &args.symlinks {
        archive.symlink(&link.guest, &link.target)?;
    }
    let size = archive.write_file(&args.output)?;
    println!("{}: {size} bytes", args.output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_specs() {
        let spec: FileSpec = "a/b:/bin/b:755".parse().unwrap();
        assert_eq!(
            (spec.host, spec.guest, spec.mode),
            ("a/b".into(), "/bin/b".to_owned(), Some(0o755))
        );
        let spec: FileSpec = "a/b:/bin/b".parse().unwrap();
        assert_eq!(spec.mode, None);
        // A host path with a colon still works when the mode is given.
        let spec: FileSpec = "c:d:/x:0644".parse().unwrap();
        assert_eq!(
            (spec.host, spec.guest, spec.mode),
            ("c:d".into(), "/x".to_owned(), Some(0o644))
        );
        assert!("nocolon".parse::<FileSpec>().is_err());
        assert!(":guest".parse::<FileSpec>().is_err());
    }

    #[test]
    fn dir_and_symlink_specs() {
        let dir: DirSpec = "/etc:700".parse().unwrap();
        assert_eq!((dir.guest.as_str(), dir.mode), ("/etc", 0o700));
        let dir: DirSpec = "/etc".parse().unwrap();
        assert_eq!(dir.mode, 0o755);
        let link: SymlinkSpec = "/bin/sh:busybox".parse().unwrap();
        assert_eq!(
            (link.guest.as_str(), link.target.as_str()),
            ("/bin/sh", "busybox")
        );
        assert!("/bin/sh".parse::<SymlinkSpec>().is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
