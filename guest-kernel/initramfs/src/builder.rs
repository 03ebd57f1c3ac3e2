//! Collects the entries of an archive and writes them in order.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::newc::{self, Header};

/// Mode of the directories added because a path implies them.
pub const IMPLIED_DIR_MODE: u32 = 0o755;
/// Mode of the archive files that [`Builder::write_file`] creates.
const ARCHIVE_FILE_MODE: u32 = 0o644;
/// Permission bits (with setuid, setgid and sticky); the file type comes from the entry kind.
const PERMISSION_BITS: u32 = 0o7777;

/// Errors of building or writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path given for the archive is not acceptable.
    #[error("invalid archive path {path:?}: {problem}")]
    InvalidPath { path: String, problem: PathProblem },
    /// The path was added before.
    #[error("{path:?} is already in the archive")]
    Duplicate { path: String },
    /// A component of the path is already in the archive as something other than a directory.
    #[error("parent {parent:?} of {path:?} is in the archive but is not a directory")]
    ParentNotDirectory { path: String, parent: String },
    /// The mode has bits beyond the permission bits (0o7777).
    #[error("mode {mode:#o} of {path:?} has bits outside 0o7777")]
    InvalidMode { path: String, mode: u32 },
    /// newc sizes are 32-bit.
    #[error("{path:?} is {size} bytes, more than a newc archive can hold")]
    TooLarge { path: String, size: u64 },
    /// newc inode numbers are 32-bit.
    #[error("too many entries for a newc archive")]
    TooManyEntries,
    /// A symlink target is empty or holds a NUL byte.
    #[error("invalid target {target:?} for symlink {path:?}")]
    InvalidSymlinkTarget { path: String, target: String },
    /// The host file to copy into the archive cannot be read.
    #[error("cannot read host file {host}")]
    ReadHost {
        host: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The host path to copy into the archive is not a regular file.
    #[error("host path {host} is not a regular file")]
    HostNotRegularFile { host: PathBuf },
    /// Writing the archive to the given writer failed.
    #[error("cannot write the archive")]
    Write(#[source] io::Error),
    /// Writing the archive file failed.
    #[error("cannot write archive file {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a path is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// Nothing left after dropping `/` and `.` components (the root is implicit).
    #[error("no name")]
    Empty,
    /// `..` could escape the root; the kernel would refuse it anyway.
    #[error("'..' components are not allowed")]
    ParentComponent,
    /// Names are NUL-terminated in the archive.
    #[error("contains a NUL byte")]
    Nul,
}

/// What an entry is, with what the archive stores for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

impl EntryKind {
    fn type_bits(&self) -> u32 {
        match self {
            EntryKind::Dir => newc::S_IFDIR,
            EntryKind::File(_) => newc::S_IFREG,
            EntryKind::Symlink(_) => newc::S_IFLNK,
            EntryKind::CharDev { .. } => newc::S_IFCHR,
        }
    }
}

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalised path: no leading `/`, no empty, `.` or `..` components.
    pub path: String,
    /// Permission bits (0o7777 at most).
    pub mode: u32,
    pub kind: EntryKind,
    /// Added because a later path implied it; an explicit [`Builder::dir`] may still set its mode.
    implied: bool,
}

/// Builds a newc archive in memory, entry by entry, and writes it reproducibly.
///
/// Entries are written in the order they were added; the directories a path implies are added
/// (mode [`IMPLIED_DIR_MODE`]) just before it, once. Inode numbers follow that order, mtime,
/// uid and gid are 0, so the same calls always give the same bytes.
#[derive(Debug, Default, Clone)]
pub struct Builder {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The entries, in archive order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether `path` (normalised) is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.index.contains_key(&p))
    }

    /// Adds a directory. A directory that was only implied so far takes this mode instead of
    /// being a duplicate.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, Error> {
        let path = normalize(path)?;
        check_mode(&path, mode)?;
        if let Some(&i) = self.index.get(&path) {
            let entry = &mut self.entries[i];
            if entry.implied && entry.kind == EntryKind::Dir {
                entry.mode = mode;
                entry.implied = false;
                return Ok(self);
            }
            return Err(Error::Duplicate { path });
        }
        self.push(path, mode, EntryKind::Dir)
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<&mut Self, Error> {
        let path = normalize(path)?;
        check_mode(&path, mode)?;
        if u32::try_from(data.len()).is_err() {
            return Err(Error::TooLarge {
                path,
                size: data.len() as u64,
            });
        }
        self.push(path, mode, EntryKind::File(data))
    }

    /// Adds a regular file with the contents of `host` (symlinks followed). Without `mode`, the
    /// permission bits of the host file are kept.
    pub fn file_from_host(
        &mut self,
        path: &str,
        host: &Path,
        mode: Option<u32>,
    ) -> Result<&mut Self, Error> {
        let read_error = |source| Error::ReadHost {
            host: host.to_owned(),
            source,
        };
        let meta = fs::metadata(host).map_err(read_error)?;
        if !meta.is_file() {
            return Err(Error::HostNotRegularFile {
                host: host.to_owned(),
            });
        }
        let mode = mode.unwrap_or(meta.permissions().mode() & PERMISSION_BITS);
        let data = fs::read(host).map_err(read_error)?;
        self.file(path, mode, data)
    }

    /// Adds a symbolic link to `target` (stored as given, relative or absolute). Its mode is
    /// 0o777, as Linux ignores the mode of symlinks.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, Error> {
        let path = normalize(path)?;
        if target.is_empty() || target.contains('\0') {
            return Err(Error::InvalidSymlinkTarget {
                path,
                target: target.to_owned(),
            });
        }
        self.push(path, 0o777, EntryKind::Symlink(target.to_owned()))
    }

    /// Adds a character device node, e.g. `/dev/console` is `c 5 1`, `/dev/null` is `c 1 3`.
    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, Error> {
        let path = normalize(path)?;
        check_mode(&path, mode)?;
        self.push(path, mode, EntryKind::CharDev { major, minor })
    }

    /// Writes the archive, trailer included; returns the number of bytes written.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<u64, Error> {
        let mut written = 0;
        for (i, entry) in self.entries.iter().enumerate() {
            // Inode 0 is left to the trailer.
            let ino = u32::try_from(i + 1).map_err(|_| Error::TooManyEntries)?;
            let (data, rdev_major, rdev_minor): (&[u8], u32, u32) = match &entry.kind {
                EntryKind::Dir => (&[], 0, 0),
                EntryKind::File(data) => (data, 0, 0),
                EntryKind::Symlink(target) => (target.as_bytes(), 0, 0),
                EntryKind::CharDev { major, minor } => (&[], *major, *minor),
            };
            let header = Header {
                ino,
                mode: entry.kind.type_bits() | entry.mode,
                nlink: if entry.kind == EntryKind::Dir { 2 } else { 1 },
                file_size: u32::try_from(data.len()).map_err(|_| Error::TooLarge {
                    path: entry.path.clone(),
                    size: data.len() as u64,
                })?,
                rdev_major,
                rdev_minor,
            };
            written +=
                newc::write_record(&mut w, &header, &entry.path, data).map_err(Error::Write)?;
        }
        written += newc::write_trailer(&mut w).map_err(Error::Write)?;
        w.flush().map_err(Error::Write)?;
        Ok(written)
    }

    /// Writes the archive to `path` atomically (a temporary file in the same directory, synced,
    /// then renamed), mode 0o644; returns its size.
    pub fn write_file(&self, path: &Path) -> Result<u64, Error> {
        let file_error = |source| Error::WriteFile {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(file_error)?;
        let mut out = BufWriter::new(tmp.as_file());
        let size = match self.write_to(&mut out) {
            Ok(size) => size,
            Err(Error::Write(source)) => return Err(file_error(source)),
            Err(e) => return Err(e),
        };
        drop(out);
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(ARCHIVE_FILE_MODE))
            .map_err(file_error)?;
        tmp.as_file().sync_all().map_err(file_error)?;
        tmp.persist(path).map_err(|e| file_error(e.error))?;
        Ok(size)
    }

    /// Adds `path` after the directories it implies.
    fn push(&mut self, path: String, mode: u32, kind: EntryKind) -> Result<&mut Self, Error> {
        if self.index.contains_key(&path) {
            return Err(Error::Duplicate { path });
        }
        self.add_parents(&path)?;
        self.index.insert(path.clone(), self.entries.len());
        self.entries.push(Entry {
            path,
            mode,
            kind,
            implied: false,
        });
        Ok(self)
    }

    fn add_parents(&mut self, path: &str) -> Result<(), Error> {
        let parents = path
            .match_indices('/')
            .map(|(i, _)| &path[..i])
            .collect::<Vec<_>>();
        // Check all before adding any, so a failed call leaves the builder as it was.
        for parent in &parents {
            if let Some(&i) = self.index.get(*parent) {
                if self.entries[i].kind != EntryKind::Dir {
                    return Err(Error::ParentNotDirectory {
                        path: path.to_owned(),
                        parent: (*parent).to_owned(),
                    });
                }
            }
        }
        for parent in parents {
            if !self.index.contains_key(parent) {
                self.index.insert(parent.to_owned(), self.entries.len());
                self.entries.push(Entry {
                    path: parent.to_owned(),
                    mode: IMPLIED_DIR_MODE,
                    kind: EntryKind::Dir,
                    implied: true,
                });
            }
        }
        Ok(())
    }
}

/// Normalises an archive path: drops leading `/`, empty and `.` components; rejects `..`, NUL
/// bytes and paths with nothing left.
pub fn normalize(path: &str) -> Result<String, Error> {
    let invalid = |problem| Error::InvalidPath {
        path: path.to_owned(),
        problem,
    };
    if path.contains('\0') {
        return Err(invalid(PathProblem::Nul));
    }
    let mut parts = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(invalid(PathProblem::ParentComponent)),
            name => parts.push(name),
        }
    }
    if parts.is_empty() {
        return Err(invalid(PathProblem::Empty));
    }
    Ok(parts.join("/"))
}

fn check_mode(path: &str, mode: u32) -> Result<(), Error> {
    if mode & !PERMISSION_BITS != 0 {
        return Err(Error::InvalidMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}
