//! The filesystem the guest talks to: fuse-backend-rs's passthrough behind a guard that checks
//! every guest-chosen name and size and bounds what the guest can hold open.
//!
//! The passthrough already opens everything relative to inode file descriptors (`O_PATH`,
//! `O_NOFOLLOW`) beneath the shared root and refuses to open anything but regular files and
//! directories; the guard does not rely on that alone:
//!
//! - names: empty, `.`, `..`, longer than 255 bytes or containing `/` are refused in every
//!   operation that takes a name (NUL cannot occur: names arrive as C strings);
//! - device nodes: `mknod` of character or block devices and `RENAME_WHITEOUT` are refused;
//! - sizes: reads and writes above [`MAX_IO_SIZE`] are refused; a directory read takes at most
//!   [`MAX_READDIR_SIZE`] of host directory entries (the server already refuses asks above 1 MiB);
//! - counts: at most [`MAX_INODES`] inodes the guest holds a lookup reference on (each is an
//!   `O_PATH` descriptor on the host) and [`MAX_HANDLES`] open files and directories;
//! - DAX mappings and ioctls are not offered.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::PassthroughFs;

/// Largest read or write one request may ask for (also what INIT advertises: 256 pages).
pub const MAX_IO_SIZE: u32 = 1 << 20;
/// Most bytes of host directory entries read for one READDIR(PLUS); bigger asks get fewer
/// entries.
pub const MAX_READDIR_SIZE: u32 = 64 * 1024;
/// Most inodes the guest may hold a lookup reference on at once.
pub const MAX_INODES: usize = 16 * 1024;
/// Most files and directories the guest may hold open at once.
pub const MAX_HANDLES: usize = 4 * 1024;
/// Longest name component (as Linux's NAME_MAX).
const NAME_MAX: usize = 255;

const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// Checks one path component chosen by the guest.
pub fn check_name(name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        crate::ratelimited!(
            log::Level::Warn,
            "virtio-fs: guest used an invalid name {name:?}; refused"
        );
        return Err(err(libc::EINVAL));
    }
    if bytes.len() > NAME_MAX {
        return Err(err(libc::ENAMETOOLONG));
    }
    Ok(())
}

/// What the guest holds: lookup counts per inode and the number of open handles.
#[derive(Debug, Default)]
struct Holdings {
    lookups: HashMap<u64, u64>,
    handles: usize,
    /// The guest sent INIT (it mounted the filesystem) and no DESTROY since.
    mounted: bool,
}

/// The passthrough filesystem behind the guard.
pub struct GuardedFs {
    inner: PassthroughFs,
    held: Mutex<Holdings>,
    max_inodes: usize,
    max_handles: usize,
}

impl std::fmt::Debug for GuardedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.held();
        f.debug_struct("GuardedFs")
            .field("inodes", &held.lookups.len())
            .field("handles", &held.handles)
            .finish()
    }
}

impl GuardedFs {
    /// Guards `inner` with the default limits.
    pub fn new(inner: PassthroughFs) -> Self {
        Self::with_limits(inner, MAX_INODES, MAX_HANDLES)
    }

    /// Guards `inner` with the given limits (tests use small ones).
    pub fn with_limits(inner: PassthroughFs, max_inodes: usize, max_handles: usize) -> Self {
        GuardedFs {
            inner,
            held: Mutex::new(Holdings::default()),
            max_inodes,
            max_handles,
        }
    }

    fn held(&self) -> MutexGuard<'_, Holdings> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of inodes the guest holds a reference on (the root not counted).
    pub fn inode_count(&self) -> usize {
        self.held().lookups.len()
    }

    /// Number of open handles.
    pub fn handle_count(&self) -> usize {
        self.held().handles
    }

    /// Whether a FUSE session is open: the guest sent INIT and has not sent DESTROY.
    pub fn is_mounted(&self) -> bool {
        self.held().mounted
    }

    /// Whether one more reference on `inode` is within the limit; takes it if so.
    fn take_lookup(&self, inode: u64) -> bool {
        if inode == ROOT_ID || inode == 0 {
            return true;
        }
        let mut held = self.held();
        if let Some(n) = held.lookups.get_mut(&inode) {
            *n = n.saturating_add(1);
            return true;
        }
        if held.lookups.len() >= self.max_inodes {
            return false;
        }
        held.lookups.insert(inode, 1);
        true
    }

    /// Records the entry the passthrough returned, or undoes it when over the limit.
    fn account_entry(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if self.take_lookup(entry.inode) {
            Ok(entry)
        } else {
            self.inner.forget(ctx, entry.inode, 1);
            crate::ratelimited!(
                log::Level::Warn,
                "virtio-fs: guest holds {} inodes; lookup refused",
                self.max_inodes
            );
            Err(err(libc::ENFILE))
        }
    }

    fn drop_lookups(&self, inode: u64, count: u64) {
        let mut held = self.held();
        if let Some(n) = held.lookups.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                held.lookups.remove(&inode);
            }
        }
    }

    fn take_handle(&self) -> io::Result<()> {
        let mut held = self.held();
        if held.handles >= self.max_handles {
            crate::ratelimited!(
                log::Level::Warn,
                "virtio-fs: guest holds {} open handles; open refused",
                self.max_handles
            );
            return Err(err(libc::ENFILE));
        }
        held.handles += 1;
        Ok(())
    }

    fn put_handle(&self) {
        let mut held = self.held();
        held.handles = held.handles.saturating_sub(1);
    }
}

/// Forwards calls that take no name and no size to the passthrough unchanged.
macro_rules! forward {
    ($($name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(
            fn $name(&self $(, $arg: $ty)*) -> $ret {
                self.inner.$name($($arg),*)
            }
        )*
    };
}

impl FileSystem for GuardedFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let opts = self.inner.init(capable)?;
        self.held().mounted = true;
        // Requests of up to MAX_IO_SIZE (256 pages), parallel lookups and reads, and open with
        // O_TRUNC in one request. Not EXPORT_SUPPORT (it makes the guest look up `..`, which
        // the guard refuses), not DAX, not POSIX ACLs (no xattrs).
        let wanted = FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::ATOMIC_O_TRUNC;
        Ok((opts | wanted) & !FsOptions::PERFILE_DAX)
    }

    fn destroy(&self) {
        self.inner.destroy();
        let mut held = self.held();
        held.lookups.clear();
        held.handles = 0;
        held.mounted = false;
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.account_entry(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.drop_lookups(inode, count);
        self.inner.forget(ctx, inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in &requests {
            self.drop_lookups(*inode, *count);
        }
        self.inner.batch_forget(ctx, requests);
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        check_name(name)?;
        if linkname.to_bytes().len() >= libc::PATH_MAX as usize {
            return Err(err(libc::ENAMETOOLONG));
        }
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.account_entry(ctx, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => {
                crate::ratelimited!(
                    log::Level::Warn,
                    "virtio-fs: guest mknod of mode {mode:#o} refused"
                );
                return Err(err(libc::EPERM));
            }
        }
        let entry = self.inner.mknod(ctx, parent, name, mode, rdev, umask)?;
        self.account_entry(ctx, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.account_entry(ctx, entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_name(oldname)?;
        check_name(newname)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(err(libc::EINVAL));
        }
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        check_name(newname)?;
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.account_entry(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.take_handle()?;
        let result = self.inner.open(ctx, inode, flags, fuse_flags);
        if !matches!(result, Ok((Some(_), _, _))) {
            self.put_handle();
        }
        result.map(|(handle, opts, passthrough)| (handle, opts | keep_cache(flags), passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        check_name(name)?;
        self.take_handle()?;
        match self.inner.create(ctx, parent, name, args) {
            Ok((entry, handle, opts, passthrough)) => {
                if handle.is_none() {
                    self.put_handle();
                }
                match self.account_entry(ctx, entry) {
                    Ok(entry) => Ok((entry, handle, opts, passthrough)),
                    Err(e) => {
                        if let Some(h) = handle {
                            let _ = self
                                .inner
                                .release(ctx, entry.inode, 0, h, false, false, None);
                            self.put_handle();
                        }
                        Err(e)
                    }
                }
            }
            Err(e) => {
                self.put_handle();
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        if size > MAX_IO_SIZE {
            crate::ratelimited!(log::Level::Warn, "virtio-fs: {size}-byte read refused");
            return Err(err(libc::EINVAL));
        }
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        if size > MAX_IO_SIZE {
            crate::ratelimited!(log::Level::Warn, "virtio-fs: {size}-byte write refused");
            return Err(err(libc::EINVAL));
        }
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.put_handle();
        Ok(())
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.take_handle()?;
        let result = self.inner.opendir(ctx, inode, flags);
        if !matches!(result, Ok((Some(_), _))) {
            self.put_handle();
        }
        result
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.put_handle();
        Ok(())
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let size = size.min(MAX_READDIR_SIZE);
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let size = size.min(MAX_READDIR_SIZE);
        let mut guarded = |dirent: DirEntry, entry: Entry| -> io::Result<usize> {
            // Over the limit: report a full buffer, and the passthrough drops its reference.
            if !self.take_lookup(entry.inode) {
                return Ok(0);
            }
            let written = add_entry(dirent, entry);
            if !matches!(written, Ok(n) if n > 0) {
                self.drop_lookups(entry.inode, 1);
            }
            written
        };
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut guarded)
    }

    fn setxattr(&self, _: &Context, _: u64, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn getxattr(&self, _: &Context, _: u64, _: &CStr, _: u32) -> io::Result<GetxattrReply> {
        Err(err(libc::ENOSYS))
    }

    fn listxattr(&self, _: &Context, _: u64, _: u32) -> io::Result<ListxattrReply> {
        Err(err(libc::ENOSYS))
    }

    fn removexattr(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _: &Context,
        _: u64,
        _: u64,
        _: u32,
        _: u32,
        _: IoctlData,
        _: u32,
    ) -> io::Result<IoctlData<'_>> {
        Err(err(libc::ENOTTY))
    }

    forward! {
        getattr(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)>;
        setattr(&self, ctx: &Context, inode: u64, attr: stat64, handle: Option<u64>, valid: SetattrValid) -> io::Result<(stat64, Duration)>;
        readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>>;
        flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()>;
        fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()>;
        fallocate(&self, ctx: &Context, inode: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()>;
        statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64>;
        fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()>;
        access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()>;
        lseek(&self, ctx: &Context, inode: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64>;
        getlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<FileLock>;
        setlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        setlkw(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
    }
}

/// `FOPEN_KEEP_CACHE` for an open that only reads. Without it the guest kernel drops the file's
/// page cache at every open, so every process start read its binary and libraries over
/// virtio-fs again and re-faulted every page: `fio --version` took 87 s in a guest whose kernel
/// mode is emulated. The guest still sees the host's changes: with `AUTO_INVAL_DATA` it drops
/// cached data when a refreshed attribute (1 s timeout) shows a new mtime or size, and an open
/// for writing still starts from an empty cache.
pub fn keep_cache(flags: u32) -> OpenOptions {
    if flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32 {
        OpenOptions::KEEP_CACHE
    } else {
        OpenOptions::empty()
    }
}
