//! Writes newc cpio archives (the initramfs format of Linux).
//!
//! ```no_run
//! # fn main() -> Result<(), nutshell_initramfs::Error> {
//! use std::path::Path;
//! let mut archive = nutshell_initramfs::with_init(Path::new("target/init"))?;
//! archive.file("etc/hostname", 0o644, b"nutshell\n".to_vec())?;
//! archive.write_file(Path::new("initramfs.cpio"))?;
//! # Ok(())
//! # }
//! ```

mod builder;
pub mod newc;

use std::path::Path;

pub use builder::{normalize, Builder, Entry, EntryKind, Error, PathProblem, IMPLIED_DIR_MODE};

/// The base every Nutshell initramfs has: `/dev` with `console` (c 5 1, so the kernel can open
/// fds 0, 1 and 2 for init) and `null` (c 1 3), `/proc`, `/sys`, `/run`, `/tmp` (1777), and
/// `/init` (mode 0755) copied from the host file `init`.
pub fn with_init(init: &Path) -> Result<Builder, Error> {
    let mut b = Builder::new();
    b.dir("dev", 0o755)?
        .char_dev("dev/console", 0o600, 5, 1)?
        .char_dev("dev/null", 0o666, 1, 3)?
        .dir("proc", 0o555)?
        .dir("sys", 0o555)?
        .dir("run", 0o755)?
        .dir("tmp", 0o1777)?
        .file_from_host("init", init, Some(0o755))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn archive_bytes(b: &Builder) -> Vec<u8> {
        let mut out = Vec::new();
        let n = b.write_to(&mut out).unwrap();
        assert_eq!(n as usize, out.len());
        out
    }

    #[test]
    fn small_archive_is_byte_exact() {
        let mut b = Builder::new();
        b.file("/a/hi", 0o644, b"hello".to_vec()).unwrap();
        let expected = [
            // "a", implied: ino 1, 040755, nlink 2, namesize 2; 110 + 2 = 112, no padding.
            "070701",
            "00000001",
            "000041ed",
            "00000000",
            "00000000",
            "00000002",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000002",
            "00000000",
            "a\0",
            // "a/hi": ino 2, 0100644, nlink 1, size 5, namesize 5; 110 + 5 = 115, 1 byte pad.
            "070701",
            "00000002",
            "000081a4",
            "00000000",
            "00000000",
            "00000001",
            "00000000",
            "00000005",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000005",
            "00000000",
            "a/hi\0\0",
            "hello\0\0\0",
            // Trailer: 110 + 11 = 121, 3 bytes pad.
            "070701",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000001",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "0000000b",
            "00000000",
            "TRAILER!!!\0\0\0\0",
        ]
        .concat();
        assert_eq!(
            String::from_utf8(archive_bytes(&b)).unwrap(),
            expected,
            "archive bytes differ"
        );
    }

    #[test]
    fn device_and_symlink_headers() {
        let mut b = Builder::new();
        b.char_dev("console", 0o600, 5, 1)
            .unwrap()
            .symlink("sh", "/bin/busybox")
            .unwrap();
        let out = archive_bytes(&b);
        let field = |record: &[u8], n: usize| {
            let start = 6 + n * 8;
            String::from_utf8(record[start..start + 8].to_vec()).unwrap()
        };
        // console: 110 + 8 = 118 -> 120 bytes, no data.
        let console = &out[..120];
        assert_eq!(field(console, 1), "00002180"); // 020600
        assert_eq!(field(console, 4), "00000001"); // nlink
        assert_eq!(field(console, 6), "00000000"); // size
        assert_eq!(field(console, 9), "00000005"); // rdevmajor
        assert_eq!(field(console, 10), "00000001"); // rdevminor
        let sh = &out[120..];
        assert_eq!(field(sh, 0), "00000002");
        assert_eq!(field(sh, 1), "0000a1ff"); // 0120777
        assert_eq!(field(sh, 6), "0000000c");
        // 110 + 3 = 113 -> 116; target 12 bytes, already aligned.
        assert_eq!(&sh[116..128], b"/bin/busybox");
        assert_eq!(&sh[128..134], b"070701");
    }

    #[test]
    fn records_are_aligned() {
        let mut b = Builder::new();
        for (i, name) in ["x", "yy", "zzz", "wwww", "vvvvv"].iter().enumerate() {
            b.file(name, 0o644, vec![b'd'; i]).unwrap();
        }
        let out = archive_bytes(&b);
        assert_eq!(out.len() % 4, 0);
        // Every record starts with the magic at a 4-byte boundary.
        let starts = out
            .windows(6)
            .enumerate()
            .filter(|(_, w)| *w == newc::MAGIC)
            .map(|(i, _)| i)
            .collect::<Vec<_>>();
        assert_eq!(starts.len(), 6);
        assert!(starts.iter().all(|s| s % 4 == 0), "{starts:?}");
    }

    #[test]
    fn parents_are_implied_once_and_first() {
        let mut b = Builder::new();
        b.file("usr/lib/x", 0o644, vec![])
            .unwrap()
            .file("usr/lib/y", 0o600, vec![])
            .unwrap()
            .dir("usr", 0o700)
            .unwrap()
            .symlink("usr/bin/sh", "busybox")
            .unwrap();
        let listing = b
            .entries()
            .iter()
            .map(|e| (e.path.as_str(), e.mode))
            .collect::<Vec<_>>();
        assert_eq!(
            listing,
            [
                ("usr", 0o700),
                ("usr/lib", 0o755),
                ("usr/lib/x", 0o644),
                ("usr/lib/y", 0o600),
                ("usr/bin", 0o755),
                ("usr/bin/sh", 0o777),
            ]
        );
        // An explicit directory may take over an implied one only once.
        assert!(matches!(b.dir("usr", 0o755), Err(Error::Duplicate { .. })));
    }

    #[test]
    fn duplicates_are_rejected() {
        let mut b = Builder::new();
        b.file("etc/hosts", 0o644, vec![]).unwrap();
        for result in [
            b.file("/etc/hosts", 0o644, vec![]).map(|_| ()),
            b.file("etc//./hosts", 0o644, vec![]).map(|_| ()),
            b.symlink("etc/hosts", "x").map(|_| ()),
            b.char_dev("etc/hosts", 0o600, 1, 3).map(|_| ()),
            b.dir("etc/hosts", 0o755).map(|_| ()),
        ] {
            assert!(
                matches!(&result, Err(Error::Duplicate { path }) if path == "etc/hosts"),
                "{result:?}"
            );
        }
        assert_eq!(b.entries().len(), 2);
    }

    #[test]
    fn bad_paths_are_rejected() {
        let mut b = Builder::new();
        for (path, problem) in [
            ("../etc", PathProblem::ParentComponent),
            ("a/../../b", PathProblem::ParentComponent),
            ("a/..", PathProblem::ParentComponent),
            ("", PathProblem::Empty),
            ("/", PathProblem::Empty),
            ("/./", PathProblem::Empty),
            ("a\0b", PathProblem::Nul),
        ] {
            let result = b.file(path, 0o644, vec![]);
            assert!(
                matches!(&result, Err(Error::InvalidPath { problem: p, .. }) if *p == problem),
                "{path:?}: {result:?}"
            );
        }
        assert!(b.entries().is_empty());
        assert_eq!(normalize("//a/./b/").unwrap(), "a/b");
    }

    #[test]
    fn other_errors() {
        let mut b = Builder::new();
        assert!(matches!(
            b.file("f", 0o100644, vec![]),
            Err(Error::InvalidMode { mode: 0o100644, .. })
        ));
        b.file("f", 0o644, vec![]).unwrap();
        assert!(matches!(
            b.file("f/g", 0o644, vec![]),
            Err(Error::ParentNotDirectory { parent, .. }) if parent == "f"
        ));
        assert!(matches!(
            b.symlink("l", ""),
            Err(Error::InvalidSymlinkTarget { .. })
        ));
        assert!(matches!(
            b.file_from_host("h", Path::new("/nonexistent/nutshell"), None),
            Err(Error::ReadHost { .. })
        ));
        assert!(matches!(
            b.file_from_host("h", Path::new("/"), None),
            Err(Error::HostNotRegularFile { .. })
        ));
        assert_eq!(b.entries().len(), 1);
    }

    #[test]
    fn output_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        fs::write(&init, b"#!/bin/sh\n").unwrap();
        let first = archive_bytes(&with_init(&init).unwrap());
        let second = archive_bytes(&with_init(&init).unwrap());
        assert_eq!(first, second);
    }

    #[test]
    fn write_file_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initramfs.cpio");
        fs::write(&out, b"old").unwrap();
        let mut b = Builder::new();
        b.file("x", 0o644, b"new".to_vec()).unwrap();
        let size = b.write_file(&out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), archive_bytes(&b));
        assert_eq!(fs::metadata(&out).unwrap().len(), size);
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn cpio(args: &[&str], dir: &Path, archive: &Path) -> String {
        let output = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(fs::File::open(archive).unwrap())
            .output()
            .expect("cpio is installed (/usr/bin/cpio)");
        assert!(
            output.status.success(),
            "cpio {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // cpio lists to stderr with -v during extraction, to stdout with -t.
        String::from_utf8(output.stdout).unwrap() + &String::from_utf8(output.stderr).unwrap()
    }

    #[test]
    fn real_cpio_lists_base_archive() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init-src");
        fs::write(&init, b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(&init, fs::Permissions::from_mode(0o600)).unwrap();
        let archive = dir.path().join("base.cpio");
        with_init(&init).unwrap().write_file(&archive).unwrap();

        let listing = cpio(&["-itv", "--quiet"], dir.path(), &archive);
        let lines = listing
            .lines()
            .map(|l| {
                let cols = l.split_whitespace().collect::<Vec<_>>();
                (cols[0], *cols.last().unwrap())
            })
            .collect::<Vec<_>>();
        assert_eq!(
            lines,
            [
                ("drwxr-xr-x", "dev"),
                ("crw-------", "dev/console"),
                ("crw-rw-rw-", "dev/null"),
                ("dr-xr-xr-x", "proc"),
                ("dr-xr-xr-x", "sys"),
                ("drwxr-xr-x", "run"),
                ("drwxrwxrwt", "tmp"),
                ("-rwxr-xr-x", "init"),
            ],
            "{listing}"
        );
        let console = listing.lines().nth(1).unwrap();
        assert!(
            console.contains(" 5,") && console.contains(" 1 "),
            "{console}"
        );
        let null = listing.lines().nth(2).unwrap();
        assert!(null.contains(" 1,") && null.contains(" 3 "), "{null}");
    }

    #[test]
    fn real_cpio_extracts_same_contents_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host-file");
        fs::write(&host, b"from the host").unwrap();
        fs::set_permissions(&host, fs::Permissions::from_mode(0o750)).unwrap();

        let mut b = Builder::new();
        b.dir("etc", 0o755)
            .unwrap()
            .file("etc/hostname", 0o644, b"nutshell\n".to_vec())
            .unwrap()
            .file("empty", 0o600, vec![])
            .unwrap()
            .file("bin/odd-size", 0o755, vec![0xa5; 4097])
            .unwrap()
            .file_from_host("bin/from-host", &host, None)
            .unwrap()
            .file_from_host("bin/forced", &host, Some(0o4711))
            .unwrap()
            .symlink("bin/sh", "from-host")
            .unwrap()
            .dir("deep/er/dir", 0o700)
            .unwrap();
        let archive = dir.path().join("test.cpio");
        b.write_file(&archive).unwrap();

        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        cpio(
            &["-idv", "--quiet", "--no-absolute-filenames"],
            &root,
            &archive,
        );

        for entry in b.entries() {
            let path = root.join(&entry.path);
            let meta = fs::symlink_metadata(&path).unwrap();
            match &entry.kind {
                EntryKind::Dir => assert!(meta.is_dir(), "{}", entry.path),
                EntryKind::File(data) => {
                    assert!(meta.is_file(), "{}", entry.path);
                    assert_eq!(&fs::read(&path).unwrap(), data, "{}", entry.path);
                }
                EntryKind::Symlink(target) => {
                    assert_eq!(fs::read_link(&path).unwrap(), Path::new(target));
                    continue;
                }
                EntryKind::CharDev { .. } => unreachable!("no device nodes in this archive"),
            }
            assert_eq!(
                meta.permissions().mode() & 0o7777,
                entry.mode,
                "{}",
                entry.path
            );
        }
        assert_eq!(
            fs::read(root.join("bin/from-host")).unwrap(),
            b"from the host"
        );
        assert_eq!(
            fs::metadata(root.join("bin/from-host"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o750
        );
    }
}
