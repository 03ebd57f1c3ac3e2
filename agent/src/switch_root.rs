//! PID 1 leaves the initramfs before anything else.
//!
//! The kernel unpacks the initramfs into `rootfs`, the root of the mount tree, which
//! `pivot_root(2)` refuses to move: containers could then only enter their roots with a move
//! mount and `chroot` (runc's `--no-pivot`), which a process with `CAP_SYS_CHROOT` can leave. So
//! PID 1 copies the initramfs into a tmpfs, deletes the originals (freeing their memory), moves
//! the tmpfs onto `/`, chroots into it and executes itself again from there, as `switch_root`
//! does. Containers then enter their roots with `pivot_root`.
//!
//! The second run knows it by [`SWITCHED_ENV`]. If anything fails the agent logs why and goes
//! on from the initramfs (containers then use the move-mount fallback).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};

/// Set in the environment of the second run, after the switch.
pub const SWITCHED_ENV: &str = "NUTSHELL_AGENT_SWITCHED";

/// Where the tmpfs is prepared, on the initramfs.
const NEW_ROOT: &str = "/.nutshell-root";

/// The agent's path in the initramfs (and in the new root).
const INIT: &str = "/init";

/// Whether this process runs after the switch; removes the marker from the environment.
pub fn already_switched() -> bool {
    let switched = std::env::var_os(SWITCHED_ENV).is_some();
    // PID 1 is single-threaded here: nothing reads the environment concurrently.
    std::env::remove_var(SWITCHED_ENV);
    switched
}

/// Copies the initramfs into a tmpfs, makes it the root and executes `/init` from it. Returns
/// only on failure.
pub fn switch_to_tmpfs() -> io::Error {
    match try_switch() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn ctx(what: &str, path: &Path) -> impl FnOnce(io::Error) -> io::Error {
    let msg = format!("{what} {}", path.display());
    move |e| io::Error::new(e.kind(), format!("{msg}: {e}"))
}

fn nix_ctx(what: &str, path: &Path) -> impl FnOnce(nix::Error) -> io::Error {
    let msg = format!("{what} {}", path.display());
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{msg}: {e}"))
}

fn try_switch() -> io::Result<std::convert::Infallible> {
    let new_root = Path::new(NEW_ROOT);
    let root_dev = fs::symlink_metadata("/")
        .map_err(ctx("stat", Path::new("/")))?
        .dev();
    fs::create_dir(new_root).map_err(ctx("create", new_root))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(nix_ctx("mount tmpfs on", new_root))?;
    copy_tree(Path::new("/"), new_root, root_dev)?;
    // The originals are no longer needed: free their memory (the running binary's pages stay
    // until the exec below).
    remove_tree(Path::new("/"), root_dev);
    std::env::set_current_dir(new_root).map_err(ctx("chdir", new_root))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(nix_ctx("move onto /:", new_root))?;
    nix::unistd::chroot(".").map_err(nix_ctx("chroot", new_root))?;
    std::env::set_current_dir("/").map_err(ctx("chdir", Path::new("/")))?;
    std::env::set_var(SWITCHED_ENV, "1");
    let init = CString::new(INIT).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let err = nix::unistd::execv(&init, std::slice::from_ref(&init));
    // The exec failed: without an agent binary in the new root nothing can go on.
    std::env::remove_var(SWITCHED_ENV);
    Err(nix_ctx("execute", Path::new(INIT))(err.unwrap_err()))
}

/// Copies every entry of `from` (files, directories, symlinks, device nodes) on device `dev`
/// into `to`, with modes and owners; skips `to` itself and other file systems.
fn copy_tree(from: &Path, to: &Path, dev: u64) -> io::Result<()> {
    for entry in fs::read_dir(from).map_err(ctx("read", from))? {
        let entry = entry.map_err(ctx("read", from))?;
        let src = entry.path();
        if src == Path::new(NEW_ROOT) {
            continue;
        }
        let meta = fs::symlink_metadata(&src).map_err(ctx("stat", &src))?;
        if meta.dev() != dev {
            continue;
        }
        let dst = to.join(entry.file_name());
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&dst).map_err(ctx("create", &dst))?;
            copy_tree(&src, &dst, dev)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&src).map_err(ctx("read link", &src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(ctx("create link", &dst))?;
        } else if ft.is_file() {
            fs::copy(&src, &dst).map_err(ctx("copy", &src))?;
        } else {
            let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
            mknod(
                &dst,
                kind,
                Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(nix_ctx("create node", &dst))?;
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))
            .map_err(ctx("chown", &dst))?;
        if !ft.is_symlink() {
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(ctx("chmod", &dst))?;
        }
    }
    Ok(())
}

/// Removes what `dir` holds on device `dev`, except the new root; failures are logged (the
/// switch does not depend on them).
fn remove_tree(dir: &Path, dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == Path::new(NEW_ROOT) {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        let removed = if meta.is_dir() {
            remove_tree(&path, dev);
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            log::debug!("switch root: cannot remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn copy_keeps_files_links_dirs_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        let to = dir.path().join("to");
        fs::create_dir_all(from.join("etc/sub")).unwrap();
        fs::create_dir(&to).unwrap();
        fs::write(from.join("init"), b"agent").unwrap();
        fs::set_permissions(from.join("init"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(from.join("etc/sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink("etc/sub/f", from.join("link")).unwrap();
        let dev = fs::symlink_metadata(&from).unwrap().dev();
        copy_tree(&from, &to, dev).unwrap();
        assert_eq!(fs::read(to.join("init")).unwrap(), b"agent");
        assert_eq!(
            fs::metadata(to.join("init")).unwrap().mode() & 0o7777,
            0o750
        );
        assert_eq!(fs::read(to.join("etc/sub/f")).unwrap(), b"x");
        assert_eq!(
            fs::read_link(to.join("link")).unwrap(),
            Path::new("etc/sub/f")
        );
        remove_tree(&from, dev);
        assert_eq!(fs::read_dir(&from).unwrap().count(), 0);
        assert_eq!(
            fs::read(to.join("init")).unwrap(),
            b"agent",
            "the copy stays"
        );
    }
}
