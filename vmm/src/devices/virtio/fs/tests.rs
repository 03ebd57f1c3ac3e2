#![allow(clippy::unwrap_used)]

//! The device driven through mock queues with FUSE messages built here, against a real
//! temporary directory on the host.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, Dirent, EntryOut, GetattrIn, InHeader, InitIn, MkdirIn, MknodIn, Opcode,
    OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In, SetattrIn, WriteIn, WriteOut,
};
use fuse_backend_rs::api::filesystem::{FsOptions, ROOT_ID};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MOCK_QUEUE_SIZE: u16 = 256;
const REQ_ADDR: u64 = 0x10_0000;
const REPLY_ADDR: u64 = 0x40_0000;
const REPLY_LEN: u32 = 0x20_0000;
const FATTR_MODE: u32 = 1 << 0;
const FATTR_SIZE: u32 = 1 << 3;

struct Harness {
    mem: &'static GuestMemoryMmap,
    req: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Fs,
    dir: tempfile::TempDir,
    next_desc: u16,
    seen: u16,
    unique: u64,
}

/// A reply: the FUSE error (0 or a negative errno) and the body after the out header.
#[derive(Debug)]
struct Reply {
    error: i32,
    body: Vec<u8>,
}

impl Reply {
    fn ok(self) -> Vec<u8> {
        assert_eq!(self.error, 0, "request failed: {}", self.error);
        self.body
    }

    fn obj<T: ByteValued>(self) -> T {
        let body = self.ok();
        T::from_slice(&body[..std::mem::size_of::<T>()])
            .copied()
            .unwrap()
    }
}

fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn body(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

impl Harness {
    fn new() -> Harness {
        Self::with(GuardedFs::new)
    }

    fn with(guard: impl FnOnce(PassthroughFs) -> GuardedFs) -> Harness {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        ));
        let hiprio = MockSplitQueue::create(mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        let req = MockSplitQueue::create(mem, GuestAddress(0x2_0000), MOCK_QUEUE_SIZE);
        let dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            shared_dir: dir.path().to_owned(),
            tag: "nutshell".into(),
        };
        let mut dev = Fs::with_fs(&config, guard).unwrap();
        let queues = vec![
            hiprio.create_queue::<Queue>().unwrap(),
            req.create_queue::<Queue>().unwrap(),
        ];
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.activate(mem.clone(), VIRTIO_F_VERSION_1, queues, irq)
            .unwrap();
        let mut h = Harness {
            mem,
            req,
            dev,
            dir,
            next_desc: 0,
            seen: 0,
            unique: 1,
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: (FsOptions::BIG_WRITES
                | FsOptions::MAX_PAGES
                | FsOptions::EXPORT_SUPPORT
                | FsOptions::POSIX_ACL)
                .bits() as u32,
        };
        let out: fuse_backend_rs::abi::fuse_abi::InitOut =
            h.call(Opcode::Init, 0, init.as_slice()).obj();
        assert_eq!(out.major, 7);
        assert_eq!(out.max_write, guard::MAX_IO_SIZE, "1 MiB writes");
        assert_eq!(out.max_pages, 256);
        let flags = FsOptions::from_bits_truncate(u64::from(out.flags));
        assert!(!flags.contains(FsOptions::EXPORT_SUPPORT));
        assert!(!flags.contains(FsOptions::POSIX_ACL));
        h
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// Puts one chain of raw descriptors on the request queue and serves it; returns the
    /// used length, or None if the chain was not returned.
    fn push_chain(&mut self, descs: &[(u64, u32, u16)]) -> Option<u32> {
        let start = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(
                    *addr,
                    *len,
                    flags | next,
                    start + i as u16 + 1,
                ))
            })
            .collect();
        // Store the descriptors and publish the head in the avail ring (wrapping, which the
        // mock's own helper does not do).
        for (i, desc) in raw.iter().enumerate() {
            self.req
                .desc_table()
                .store(start + i as u16, *desc)
                .unwrap();
        }
        let avail = self.req.avail_addr();
        let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot = 4 + u64::from(idx % MOCK_QUEUE_SIZE) * 2;
        self.mem
            .write_obj(start, avail.unchecked_add(slot))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        self.next_desc = (start + 4) % MOCK_QUEUE_SIZE;
        self.dev.process_queues();
        let used = self.req.used().idx().load();
        if used == self.seen {
            return None;
        }
        assert_eq!(used, self.seen.wrapping_add(1), "one chain in, one out");
        let elem = self
            .req
            .used()
            .ring()
            .ref_at(usize::from(self.seen % MOCK_QUEUE_SIZE))
            .unwrap()
            .load();
        self.seen = used;
        assert_eq!(elem.id(), u32::from(start));
        Some(elem.len())
    }

    /// Sends one FUSE request; returns the reply.
    fn call(&mut self, opcode: Opcode, nodeid: u64, payload: &[u8]) -> Reply {
        let unique = self.unique;
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + payload.len()) as u32,
            opcode: opcode as u32,
            unique,
            nodeid,
            ..InHeader::default()
        };
        let request = [header.as_slice(), payload].concat();
        self.mem
            .write_slice(&request, GuestAddress(REQ_ADDR))
            .unwrap();
        // Poison the reply area so that a stale reply cannot pass.
        self.mem
            .write_slice(&[0xa5; 64], GuestAddress(REPLY_ADDR))
            .unwrap();
        let len = self
            .push_chain(&[
                (REQ_ADDR, request.len() as u32, 0),
                (REPLY_ADDR, REPLY_LEN, F_WRITE),
            ])
            .expect("the chain is returned");
        let mut out = OutHeader::default();
        self.mem
            .read_slice(out.as_mut_slice(), GuestAddress(REPLY_ADDR))
            .unwrap();
        assert_eq!(out.unique, unique);
        assert_eq!(out.len, len, "used length is the reply length");
        let hdr = std::mem::size_of::<OutHeader>();
        let mut body = vec![0u8; len as usize - hdr];
        self.mem
            .read_slice(&mut body, GuestAddress(REPLY_ADDR + hdr as u64))
            .unwrap();
        Reply {
            error: out.error,
            body,
        }
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        self.call(Opcode::Lookup, parent, &cstr(name))
    }

    fn entry(&mut self, parent: u64, name: &str) -> EntryOut {
        self.lookup(parent, name).obj()
    }

    fn open(&mut self, inode: u64, flags: i32) -> u64 {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call(Opcode::Open, inode, open.as_slice())
            .obj::<OpenOut>()
            .fh
    }

    fn read(&mut self, inode: u64, fh: u64, offset: u64, size: u32) -> Reply {
        let read = ReadIn {
            fh,
            offset,
            size,
            ..ReadIn::default()
        };
        self.call(Opcode::Read, inode, read.as_slice())
    }

    fn write(&mut self, inode: u64, fh: u64, offset: u64, data: &[u8]) -> u32 {
        let write = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..WriteIn::default()
        };
        self.call(Opcode::Write, inode, &body(&[write.as_slice(), data]))
            .obj::<WriteOut>()
            .size
    }

    fn release(&mut self, inode: u64, fh: u64, opcode: Opcode) {
        let release = ReleaseIn {
            fh,
            ..ReleaseIn::default()
        };
        self.call(opcode, inode, release.as_slice()).ok();
    }

    fn getattr(&mut self, inode: u64) -> AttrOut {
        self.call(Opcode::Getattr, inode, GetattrIn::default().as_slice())
            .obj()
    }

    fn setattr(&mut self, inode: u64, set: SetattrIn) -> Reply {
        self.call(Opcode::Setattr, inode, set.as_slice())
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> Reply {
        let mkdir = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        self.call(
            Opcode::Mkdir,
            parent,
            &body(&[mkdir.as_slice(), &cstr(name)]),
        )
    }

    fn create(&mut self, parent: u64, name: &str) -> (EntryOut, u64) {
        let create = CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let reply = self
            .call(
                Opcode::Create,
                parent,
                &body(&[create.as_slice(), &cstr(name)]),
            )
            .ok();
        let entry = *EntryOut::from_slice(&reply[..std::mem::size_of::<EntryOut>()]).unwrap();
        let open = *OpenOut::from_slice(&reply[std::mem::size_of::<EntryOut>()..]).unwrap();
        (entry, open.fh)
    }

    /// Names in directory `inode` (READDIR of up to 64 KiB).
    fn list(&mut self, inode: u64) -> Vec<String> {
        let fh = self
            .call(Opcode::Opendir, inode, OpenIn::default().as_slice())
            .obj::<OpenOut>()
            .fh;
        let raw = self.read_dir(inode, fh, 64 * 1024).ok();
        self.release(inode, fh, Opcode::Releasedir);
        let mut names = Vec::new();
        let mut at = 0;
        let size = std::mem::size_of::<Dirent>();
        while at + size <= raw.len() {
            let d = *Dirent::from_slice(&raw[at..at + size]).unwrap();
            let name = &raw[at + size..at + size + d.namelen as usize];
            names.push(String::from_utf8_lossy(name).into_owned());
            at += (size + d.namelen as usize + 7) & !7;
        }
        names.sort();
        names
    }

    fn read_dir(&mut self, inode: u64, fh: u64, size: u32) -> Reply {
        let read = ReadIn {
            fh,
            size,
            ..ReadIn::default()
        };
        self.call(Opcode::Readdir, inode, read.as_slice())
    }
}

fn errno(e: i32) -> i32 {
    -e
}

#[test]
fn init_lookup_getattr() {
    let mut h = Harness::new();
    std::fs::write(h.path("hello.txt"), b"hello from the host").unwrap();
    let e = h.entry(ROOT_ID, "hello.txt");
    assert_ne!(e.nodeid, ROOT_ID);
    assert_eq!(e.attr.size, 19);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let attr = h.getattr(e.nodeid);
    assert_eq!(attr.attr.size, 19);
    assert_eq!(
        attr.attr.ino,
        std::fs::metadata(h.path("hello.txt")).unwrap().ino()
    );
    assert_eq!(h.lookup(ROOT_ID, "missing").error, errno(libc::ENOENT));
    assert_eq!(h.dev.filesystem().inode_count(), 1);
    // FORGET (no reply) drops the guest's reference.
    let forget = fuse_backend_rs::abi::fuse_abi::ForgetIn { nlookup: 1 };
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + 8) as u32,
        opcode: Opcode::Forget as u32,
        unique: 99,
        nodeid: e.nodeid,
        ..InHeader::default()
    };
    let request = [header.as_slice(), forget.as_slice()].concat();
    h.mem.write_slice(&request, GuestAddress(REQ_ADDR)).unwrap();
    let len = h.push_chain(&[(REQ_ADDR, request.len() as u32, 0)]);
    assert_eq!(len, Some(0), "FORGET has no reply");
    assert_eq!(h.dev.filesystem().inode_count(), 0);
}

#[test]
fn config_space_has_tag_and_one_request_queue() {
    let h = Harness::new();
    let mut config = [0xffu8; 40];
    h.dev.read_config(0, &mut config);
    assert_eq!(&config[..8], b"nutshell");
    assert!(config[8..36].iter().all(|b| *b == 0));
    assert_eq!(u32::from_le_bytes(config[36..40].try_into().unwrap()), 1);
    let mut beyond = [0xffu8; 4];
    h.dev.read_config(1000, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    assert_eq!(h.dev.device_type(), 26);
    assert_eq!(h.dev.queue_max_sizes().len(), 2);
}

#[test]
fn bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let cfg = |path: &Path, tag: &str| FsConfig {
        shared_dir: path.to_owned(),
        tag: tag.into(),
    };
    assert!(matches!(
        Fs::new(&cfg(&dir.path().join("missing"), "t")),
        Err(FsError::SharedDir { .. })
    ));
    assert!(matches!(
        Fs::new(&cfg(&file, "t")),
        Err(FsError::NotADirectory(_))
    ));
    assert!(matches!(
        Fs::new(&cfg(dir.path(), "")),
        Err(FsError::Tag(_))
    ));
    assert!(matches!(
        Fs::new(&cfg(dir.path(), &"x".repeat(37))),
        Err(FsError::Tag(_))
    ));
    assert!(Fs::new(&cfg(dir.path(), &"x".repeat(36))).is_ok());
}

#[test]
fn open_read_write_release() {
    let mut h = Harness::new();
    std::fs::write(h.path("data"), b"0123456789").unwrap();
    let e = h.entry(ROOT_ID, "data");
    let fh = h.open(e.nodeid, libc::O_RDWR);
    assert_eq!(h.dev.filesystem().handle_count(), 1);
    assert_eq!(h.read(e.nodeid, fh, 2, 4).ok(), b"2345");
    assert_eq!(h.write(e.nodeid, fh, 10, b"abcdef"), 6);
    // A read past the end returns what there is.
    assert_eq!(h.read(e.nodeid, fh, 8, 100).ok(), b"89abcdef");
    h.release(e.nodeid, fh, Opcode::Release);
    assert_eq!(h.dev.filesystem().handle_count(), 0);
    assert_eq!(std::fs::read(h.path("data")).unwrap(), b"0123456789abcdef");
    // The handle is gone.
    assert_ne!(h.read(e.nodeid, fh, 0, 4).error, 0);
}

#[test]
fn read_only_opens_keep_the_guest_page_cache() {
    let mut h = Harness::new();
    std::fs::write(h.path("lib.so"), b"code").unwrap();
    let e = h.entry(ROOT_ID, "lib.so");
    let keep = fuse_backend_rs::abi::fuse_abi::OpenOptions::KEEP_CACHE.bits();
    for (flags, kept) in [
        (libc::O_RDONLY, true),
        (libc::O_RDONLY | libc::O_CLOEXEC, true),
        (libc::O_RDWR, false),
        (libc::O_WRONLY, false),
    ] {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let out = h
            .call(Opcode::Open, e.nodeid, open.as_slice())
            .obj::<OpenOut>();
        assert_eq!(out.open_flags & keep != 0, kept, "flags {flags:#o}");
        h.release(e.nodeid, out.fh, Opcode::Release);
    }
    assert_eq!(h.dev.filesystem().handle_count(), 0);
}

#[test]
fn create_mkdir_readdir_setattr_rename_unlink_rmdir() {
    let mut h = Harness::new();
    let (file, fh) = h.create(ROOT_ID, "new.txt");
    assert_eq!(h.write(file.nodeid, fh, 0, b"created in the guest"), 20);
    h.release(file.nodeid, fh, Opcode::Release);
    assert_eq!(
        std::fs::read(h.path("new.txt")).unwrap(),
        b"created in the guest"
    );

    let dir: EntryOut = h.mkdir(ROOT_ID, "sub").obj();
    assert!(h.path("sub").is_dir());
    assert_eq!(dir.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(h.list(ROOT_ID), ["new.txt", "sub"]);

    // SETATTR: truncate and chmod.
    let truncated: AttrOut = h
        .setattr(
            file.nodeid,
            SetattrIn {
                valid: FATTR_SIZE,
                size: 7,
                ..SetattrIn::default()
            },
        )
        .obj();
    assert_eq!(truncated.attr.size, 7);
    assert_eq!(std::fs::read(h.path("new.txt")).unwrap(), b"created");
    h.setattr(
        file.nodeid,
        SetattrIn {
            valid: FATTR_MODE,
            mode: libc::S_IFREG | 0o600,
            ..SetattrIn::default()
        },
    )
    .ok();
    let mode = std::fs::metadata(h.path("new.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // RENAME2 into the subdirectory.
    let rename = Rename2In {
        newdir: dir.nodeid,
        flags: 0,
        padding: 0,
    };
    h.call(
        Opcode::Rename2,
        ROOT_ID,
        &body(&[rename.as_slice(), &cstr("new.txt"), &cstr("moved.txt")]),
    )
    .ok();
    assert!(!h.path("new.txt").exists());
    assert_eq!(std::fs::read(h.path("sub/moved.txt")).unwrap(), b"created");
    assert_eq!(h.list(dir.nodeid), ["moved.txt"]);

    // RENAME_WHITEOUT would make a device node: refused.
    let whiteout = Rename2In {
        newdir: ROOT_ID,
        flags: 4,
        padding: 0,
    };
    let r = h.call(
        Opcode::Rename2,
        dir.nodeid,
        &body(&[whiteout.as_slice(), &cstr("moved.txt"), &cstr("back.txt")]),
    );
    assert_eq!(r.error, errno(libc::EINVAL));

    assert_eq!(
        h.call(Opcode::Rmdir, ROOT_ID, &cstr("sub")).error,
        errno(libc::ENOTEMPTY)
    );
    h.call(Opcode::Unlink, dir.nodeid, &cstr("moved.txt")).ok();
    assert!(!h.path("sub/moved.txt").exists());
    h.call(Opcode::Rmdir, ROOT_ID, &cstr("sub")).ok();
    assert!(!h.path("sub").exists());
    assert!(h.list(ROOT_ID).is_empty());
}

#[test]
fn dot_dot_and_bad_names_are_refused() {
    let mut h = Harness::new();
    std::fs::create_dir(h.path("d")).unwrap();
    for name in ["..", ".", "", "d/..", "../etc", "a/b"] {
        assert_eq!(
            h.lookup(ROOT_ID, name).error,
            errno(libc::EINVAL),
            "lookup {name:?}"
        );
    }
    let d = h.entry(ROOT_ID, "d");
    assert_eq!(h.lookup(d.nodeid, "..").error, errno(libc::EINVAL));
    assert_eq!(
        h.mkdir(ROOT_ID, "..").error,
        errno(libc::EINVAL),
        "mkdir .."
    );
    assert_eq!(h.mkdir(ROOT_ID, "x/y").error, errno(libc::EINVAL));
    assert_eq!(
        h.lookup(ROOT_ID, &"n".repeat(256)).error,
        errno(libc::ENAMETOOLONG)
    );
    // A name with a NUL inside is cut at the NUL by the C string: it names "d".
    let e: EntryOut = h.call(Opcode::Lookup, ROOT_ID, b"d\0/../../etc\0").obj();
    assert_eq!(e.nodeid, d.nodeid);
    // Device nodes are refused; a FIFO is fine.
    let mknod = |mode: u32| MknodIn {
        mode,
        rdev: libc::makedev(1, 3) as u32,
        umask: 0,
        padding: 0,
    };
    let r = h.call(
        Opcode::Mknod,
        ROOT_ID,
        &body(&[mknod(libc::S_IFCHR | 0o666).as_slice(), &cstr("mem")]),
    );
    assert_eq!(r.error, errno(libc::EPERM));
    assert!(!h.path("mem").exists());
    let r = h.call(
        Opcode::Mknod,
        ROOT_ID,
        &body(&[mknod(libc::S_IFBLK | 0o666).as_slice(), &cstr("blk")]),
    );
    assert_eq!(r.error, errno(libc::EPERM));
    h.call(
        Opcode::Mknod,
        ROOT_ID,
        &body(&[mknod(libc::S_IFIFO | 0o644).as_slice(), &cstr("fifo")]),
    )
    .ok();
    assert!(h.path("fifo").exists());
    // Extended attributes are not passed to the host.
    let r = h.call(
        Opcode::Getxattr,
        d.nodeid,
        &body(&[&[0u8; 8], &cstr("user.x")]),
    );
    assert_eq!(r.error, errno(libc::ENOSYS));
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let mut h = Harness::new();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("/etc", h.path("etc")).unwrap();
    std::os::unix::fs::symlink("../../../../../../..", h.path("up")).unwrap();
    std::os::unix::fs::symlink(&secret, h.path("secret")).unwrap();

    for name in ["etc", "up", "secret"] {
        let link = h.entry(ROOT_ID, name);
        assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        // Resolving beneath the link fails: the host does not follow it.
        let r = h.lookup(link.nodeid, "passwd");
        assert_ne!(r.error, 0, "lookup through {name}");
        // Opening it fails.
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        assert_ne!(h.call(Opcode::Open, link.nodeid, open.as_slice()).error, 0);
        assert_ne!(
            h.call(Opcode::Opendir, link.nodeid, open.as_slice()).error,
            0
        );
    }
    // READLINK gives the guest the text, for the guest to resolve in its own namespace.
    let link = h.entry(ROOT_ID, "etc");
    assert_eq!(h.call(Opcode::Readlink, link.nodeid, &[]).ok(), b"/etc");

    // chmod and truncate through the link do not reach the target.
    let link = h.entry(ROOT_ID, "secret");
    let _ = h.setattr(
        link.nodeid,
        SetattrIn {
            valid: FATTR_MODE,
            mode: 0o777,
            ..SetattrIn::default()
        },
    );
    let _ = h.setattr(
        link.nodeid,
        SetattrIn {
            valid: FATTR_SIZE,
            size: 0,
            ..SetattrIn::default()
        },
    );
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");

    // A symlink the guest makes is created as a link, and is not followed either.
    let sym: EntryOut = h
        .call(
            Opcode::Symlink,
            ROOT_ID,
            &body(&[&cstr("guestlink"), &cstr("/etc/shadow")]),
        )
        .obj();
    assert_eq!(
        std::fs::read_link(h.path("guestlink")).unwrap(),
        Path::new("/etc/shadow")
    );
    let open = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    assert_ne!(h.call(Opcode::Open, sym.nodeid, open.as_slice()).error, 0);
    // Creating a file "through" a symlinked directory fails instead of writing in /etc.
    let etc = h.entry(ROOT_ID, "etc");
    let create = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let r = h.call(
        Opcode::Create,
        etc.nodeid,
        &body(&[create.as_slice(), &cstr("nutshell-escape")]),
    );
    assert_ne!(r.error, 0);
    assert!(!Path::new("/etc/nutshell-escape").exists());
}

#[test]
fn renamed_directory_keeps_its_handle_inside_the_root() {
    // Handle-based access: a directory moved after lookup is still reached through its inode
    // fd, and a path-based race (replacing it with a symlink) does not redirect the guest.
    let mut h = Harness::new();
    std::fs::create_dir(h.path("a")).unwrap();
    std::fs::write(h.path("a/f"), b"inside").unwrap();
    let a = h.entry(ROOT_ID, "a");
    std::fs::rename(h.path("a"), h.path("b")).unwrap();
    std::os::unix::fs::symlink("/etc", h.path("a")).unwrap();
    let f = h.entry(a.nodeid, "f");
    let fh = h.open(f.nodeid, libc::O_RDONLY);
    assert_eq!(h.read(f.nodeid, fh, 0, 64).ok(), b"inside");
    assert_ne!(h.lookup(a.nodeid, "passwd").error, 0);
}

#[test]
fn oversize_requests_are_refused() {
    let mut h = Harness::new();
    std::fs::write(h.path("big"), vec![7u8; 4096]).unwrap();
    let e = h.entry(ROOT_ID, "big");
    let fh = h.open(e.nodeid, libc::O_RDWR);
    let r = h.read(e.nodeid, fh, 0, guard::MAX_IO_SIZE + 1);
    assert_ne!(r.error, 0, "a read above 1 MiB is refused");
    assert_ne!(h.read(e.nodeid, fh, 0, u32::MAX).error, 0);
    // A write above 1 MiB is refused and does not touch the file.
    let write = WriteIn {
        fh,
        size: guard::MAX_IO_SIZE + 1,
        ..WriteIn::default()
    };
    let r = h.call(Opcode::Write, e.nodeid, &body(&[write.as_slice(), b"big"]));
    assert_eq!(r.error, errno(libc::EINVAL));
    assert_eq!(std::fs::read(h.path("big")).unwrap(), vec![7u8; 4096]);
    // A write whose header claims more than the chain holds writes only what the chain holds.
    let write = WriteIn {
        fh,
        size: 1 << 20,
        ..WriteIn::default()
    };
    let r = h.call(
        Opcode::Write,
        e.nodeid,
        &body(&[write.as_slice(), b"short"]),
    );
    assert_eq!(r.obj::<WriteOut>().size, 5);
    let content = std::fs::read(h.path("big")).unwrap();
    assert_eq!(content.len(), 4096);
    assert_eq!(&content[..6], b"short\x07");
    // READDIR above 1 MiB is refused; a large one is clamped to 64 KiB.
    let dh = h
        .call(Opcode::Opendir, ROOT_ID, OpenIn::default().as_slice())
        .obj::<OpenOut>()
        .fh;
    assert_ne!(h.read_dir(ROOT_ID, dh, u32::MAX).error, 0);
    for i in 0..3000 {
        std::fs::write(h.path(&format!("file-with-a-long-name-{i:05}")), b"").unwrap();
    }
    let r = h.read_dir(ROOT_ID, dh, 512 * 1024).ok();
    assert!(
        r.len() > guard::MAX_READDIR_SIZE as usize / 2,
        "{}",
        r.len()
    );
    // The host reads 64 KiB of its own dirents; FUSE dirents are a little longer.
    assert!(
        r.len() <= 2 * guard::MAX_READDIR_SIZE as usize,
        "{}",
        r.len()
    );
    // Still serving.
    assert_eq!(h.read(e.nodeid, fh, 6, 3).ok(), [7, 7, 7]);
}

#[test]
fn malformed_chains_are_returned_and_the_device_keeps_serving() {
    let mut h = Harness::new();
    std::fs::write(h.path("f"), b"x").unwrap();
    // A descriptor outside guest RAM.
    assert_eq!(
        h.push_chain(&[(0x7fff_0000_0000, 64, 0), (REPLY_ADDR, 4096, F_WRITE)]),
        Some(0)
    );
    // A reply buffer outside guest RAM.
    let header = InHeader {
        len: 40 + 2,
        opcode: Opcode::Lookup as u32,
        unique: 5,
        nodeid: ROOT_ID,
        ..InHeader::default()
    };
    let request = [header.as_slice(), b"f\0"].concat();
    h.mem.write_slice(&request, GuestAddress(REQ_ADDR)).unwrap();
    assert_eq!(
        h.push_chain(&[(REQ_ADDR, 42, 0), (0x7fff_0000_0000, 4096, F_WRITE)]),
        Some(0)
    );
    // A descriptor running past the end of RAM.
    assert_eq!(
        h.push_chain(&[(0xff_f000, 0x10_0000, 0), (REPLY_ADDR, 4096, F_WRITE)]),
        Some(0)
    );
    // Shorter than a FUSE header.
    assert_eq!(
        h.push_chain(&[(REQ_ADDR, 8, 0), (REPLY_ADDR, 4096, F_WRITE)]),
        Some(0)
    );
    // No room for a reply.
    assert_eq!(h.push_chain(&[(REQ_ADDR, 42, 0)]), Some(0));
    // A header whose length is huge.
    let header = InHeader {
        len: u32::MAX,
        opcode: Opcode::Lookup as u32,
        unique: 6,
        nodeid: ROOT_ID,
        ..InHeader::default()
    };
    let request = [header.as_slice(), b"f\0"].concat();
    h.mem.write_slice(&request, GuestAddress(REQ_ADDR)).unwrap();
    let len = h
        .push_chain(&[(REQ_ADDR, 42, 0), (REPLY_ADDR, 4096, F_WRITE)])
        .unwrap();
    if len > 0 {
        let mut out = OutHeader::default();
        h.mem
            .read_slice(out.as_mut_slice(), GuestAddress(REPLY_ADDR))
            .unwrap();
        assert_ne!(out.error, 0);
    }
    // An unknown opcode gets ENOSYS.
    assert_eq!(
        h.call(Opcode::MaxOpcode, ROOT_ID, &[]).error,
        errno(libc::ENOSYS)
    );
    // Unknown inode numbers are an error, not a panic.
    assert_ne!(h.getattr_err(0xdead_beef), 0);
    // The device still serves well-formed requests.
    assert_eq!(h.entry(ROOT_ID, "f").attr.size, 1);
}

impl Harness {
    fn getattr_err(&mut self, inode: u64) -> i32 {
        self.call(Opcode::Getattr, inode, GetattrIn::default().as_slice())
            .error
    }
}

#[test]
fn open_handles_and_inodes_are_capped() {
    let mut h = Harness::with(|inner| GuardedFs::with_limits(inner, 3, 2));
    for name in ["a", "b", "c", "d"] {
        std::fs::write(h.path(name), name).unwrap();
    }
    let a = h.entry(ROOT_ID, "a");
    let b = h.entry(ROOT_ID, "b");
    let c = h.entry(ROOT_ID, "c");
    // A second lookup of a held inode is fine; a fourth inode is not.
    assert_eq!(h.entry(ROOT_ID, "a").nodeid, a.nodeid);
    assert_eq!(h.lookup(ROOT_ID, "d").error, errno(libc::ENFILE));
    let fa = h.open(a.nodeid, libc::O_RDONLY);
    let _fb = h.open(b.nodeid, libc::O_RDONLY);
    let open = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    assert_eq!(
        h.call(Opcode::Open, c.nodeid, open.as_slice()).error,
        errno(libc::ENFILE)
    );
    h.release(a.nodeid, fa, Opcode::Release);
    let fc = h.open(c.nodeid, libc::O_RDONLY);
    assert_eq!(h.read(c.nodeid, fc, 0, 8).ok(), b"c");
    assert_eq!(h.dev.filesystem().handle_count(), 2);
    assert_eq!(h.dev.filesystem().inode_count(), 3);
}

#[test]
fn reset_releases_what_the_guest_held() {
    let mut h = Harness::new();
    std::fs::write(h.path("f"), b"x").unwrap();
    let e = h.entry(ROOT_ID, "f");
    let _fh = h.open(e.nodeid, libc::O_RDONLY);
    assert_eq!(h.dev.filesystem().handle_count(), 1);
    h.dev.reset();
    assert_eq!(h.dev.filesystem().handle_count(), 0);
    assert_eq!(h.dev.filesystem().inode_count(), 0);
    assert_eq!(
        h.dev.process_queues(),
        0,
        "an inactive device serves nothing"
    );
}

#[test]
fn readdirplus_entries_count_as_lookups_and_respect_the_cap() {
    let mut h = Harness::with(|inner| GuardedFs::with_limits(inner, 3, 8));
    for i in 0..5 {
        std::fs::write(h.path(&format!("f{i}")), b"").unwrap();
    }
    let fh = h
        .call(Opcode::Opendir, ROOT_ID, OpenIn::default().as_slice())
        .obj::<OpenOut>()
        .fh;
    let read = ReadIn {
        fh,
        size: 64 * 1024,
        ..ReadIn::default()
    };
    let raw = h.call(Opcode::Readdirplus, ROOT_ID, read.as_slice()).ok();
    // Each direntplus is an EntryOut, a Dirent and the padded name.
    let mut names = Vec::new();
    let mut at = 0;
    let fixed = std::mem::size_of::<EntryOut>() + std::mem::size_of::<Dirent>();
    while at + fixed <= raw.len() {
        let d =
            *Dirent::from_slice(&raw[at + std::mem::size_of::<EntryOut>()..at + fixed]).unwrap();
        names.push(
            String::from_utf8_lossy(&raw[at + fixed..at + fixed + d.namelen as usize]).into_owned(),
        );
        at += (fixed + d.namelen as usize + 7) & !7;
    }
    assert_eq!(names.len(), 3, "the directory read stops at the inode cap");
    assert_eq!(h.dev.filesystem().inode_count(), 3);
    // Nothing beyond the cap is reachable until the guest forgets something.
    let other = (0..5)
        .map(|i| format!("f{i}"))
        .find(|n| !names.contains(n))
        .unwrap();
    assert_eq!(h.lookup(ROOT_ID, &other).error, errno(libc::ENFILE));
    assert_eq!(
        h.entry(ROOT_ID, &names[0]).attr.size,
        0,
        "held ones still are"
    );
}

/// Host-side cost of the device alone (no guest): 32 MiB written and read in 1 MiB requests,
/// 500 small files created, through the mock queue. Prints the figures; asserts only the data.
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_device_throughput() {
    let mut h = Harness::new();
    let (file, fh) = h.create(ROOT_ID, "bench.bin");
    let chunk = vec![0x5au8; 1 << 20];
    let t = std::time::Instant::now();
    for i in 0..32u64 {
        assert_eq!(h.write(file.nodeid, fh, i << 20, &chunk), 1 << 20);
    }
    let write_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for i in 0..32u64 {
        assert_eq!(
            h.read(file.nodeid, fh, i << 20, 1 << 20).ok().len(),
            1 << 20
        );
    }
    let read_s = t.elapsed().as_secs_f64();
    h.release(file.nodeid, fh, Opcode::Release);
    let t = std::time::Instant::now();
    for i in 0..500 {
        let (e, fh) = h.create(ROOT_ID, &format!("small{i}"));
        h.write(e.nodeid, fh, 0, &[b'x'; 100]);
        h.release(e.nodeid, fh, Opcode::Release);
    }
    let create_s = t.elapsed().as_secs_f64();
    eprintln!(
        "virtio-fs device alone: write {:.0} MiB/s, read {:.0} MiB/s, 500 files (create+write+release) in {:.3} s",
        32.0 / write_s,
        32.0 / read_s,
        create_s
    );
}

#[test]
fn snapshot_is_refused_while_mounted_and_keeps_the_tag() {
    use crate::devices::virtio::state::{DeviceKind, DeviceStateError};
    let mut h = Harness::new();
    // The harness sent INIT: the guest has the filesystem mounted.
    assert!(h.dev.filesystem().is_mounted());
    match h.dev.save_state() {
        Err(DeviceStateError::Busy(why)) => assert!(why.contains("mounted"), "{why}"),
        other => panic!("a mounted virtio-fs must refuse a snapshot, got {other:?}"),
    }
    // The guest unmounts: DESTROY ends the session and the device can be saved. (The server
    // reports a used length of 0 for DESTROY, so `call`'s reply checks do not apply.)
    let header = InHeader {
        len: std::mem::size_of::<InHeader>() as u32,
        opcode: Opcode::Destroy as u32,
        unique: 1000,
        ..InHeader::default()
    };
    h.mem
        .write_slice(header.as_slice(), GuestAddress(REQ_ADDR))
        .unwrap();
    h.push_chain(&[
        (REQ_ADDR, header.as_slice().len() as u32, 0),
        (REPLY_ADDR, REPLY_LEN, F_WRITE),
    ])
    .expect("the chain is returned");
    assert!(!h.dev.filesystem().is_mounted());
    let saved = h.dev.save_state().unwrap();
    assert_eq!(
        saved.kind,
        DeviceKind::Fs {
            tag: "nutshell".into()
        }
    );
    assert_eq!(saved.queues.len(), 2, "both queues are live");
    h.dev.restore_state(&saved.kind).unwrap();
    assert!(matches!(
        h.dev.restore_state(&DeviceKind::Fs {
            tag: "other".into()
        }),
        Err(DeviceStateError::Invalid(_))
    ));
    assert!(matches!(
        h.dev.restore_state(&DeviceKind::Vsock { guest_cid: 3 }),
        Err(DeviceStateError::Invalid(_))
    ));
}

#[test]
fn special_files_are_never_opened_and_a_fifo_cannot_block_the_server() {
    let dir_of = std::sync::Arc::new(std::sync::Mutex::new(None::<std::path::PathBuf>));
    let (tx, rx) = std::sync::mpsc::channel();
    let seen = dir_of.clone();
    std::thread::spawn(move || {
        let mut h = Harness::new();
        *seen.lock().unwrap() = Some(h.dir.path().to_owned());
        // A FIFO the guest makes, and a socket the host has there.
        let mknod = MknodIn {
            mode: libc::S_IFIFO | 0o666,
            rdev: 0,
            umask: 0,
            padding: 0,
        };
        h.call(
            Opcode::Mknod,
            ROOT_ID,
            &body(&[mknod.as_slice(), &cstr("fifo")]),
        )
        .ok();
        let _listener = std::os::unix::net::UnixListener::bind(h.path("sock")).unwrap();
        let mut errors = Vec::new();
        for name in ["fifo", "sock"] {
            let e = h.entry(ROOT_ID, name);
            for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
                let open = OpenIn {
                    flags: flags as u32,
                    fuse_flags: 0,
                };
                errors.push((
                    name,
                    "open",
                    h.call(Opcode::Open, e.nodeid, open.as_slice()).error,
                ));
            }
            let opendir = h.call(Opcode::Opendir, e.nodeid, OpenIn::default().as_slice());
            errors.push((name, "opendir", opendir.error));
            // Truncation opens the file on the host.
            let set = SetattrIn {
                valid: FATTR_SIZE,
                size: 0,
                ..SetattrIn::default()
            };
            errors.push((name, "truncate", h.setattr(e.nodeid, set).error));
            // CREATE without O_EXCL of an existing name opens what is there.
            let create = CreateIn {
                flags: libc::O_RDONLY as u32,
                mode: libc::S_IFREG | 0o644,
                umask: 0,
                fuse_flags: 0,
            };
            let r = h.call(
                Opcode::Create,
                ROOT_ID,
                &body(&[create.as_slice(), &cstr(name)]),
            );
            errors.push((name, "create", r.error));
        }
        // The server still answers.
        let _ = h.getattr(ROOT_ID);
        let _ = tx.send(errors);
    });
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(errors) => {
            for (name, what, error) in errors {
                assert_ne!(error, 0, "{what} of the {name} succeeded");
            }
        }
        Err(_) => {
            // Unblock a server stuck in open(2) of the FIFO, then fail.
            if let Some(dir) = dir_of.lock().unwrap().clone() {
                let _ = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join("fifo"));
            }
            panic!("the server blocked on a special file");
        }
    }
}

mod generated {
    //! Generated FUSE requests: any opcode, node and body; the device answers or returns each
    //! chain, never panics, and keeps serving.

    use proptest::prelude::*;

    use super::*;

    fn request() -> impl Strategy<Value = (u32, u64, Vec<u8>, Option<u32>)> {
        (
            prop_oneof![1u32..=52, 4096u32..4100, any::<u32>()],
            prop_oneof![Just(ROOT_ID), Just(0u64), 2u64..8, any::<u64>()],
            proptest::collection::vec(any::<u8>(), 0..300),
            // A header length that lies, sometimes.
            proptest::option::of(any::<u32>()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn any_fuse_request_is_answered_or_returned(
            requests in proptest::collection::vec(request(), 1..12)
        ) {
            let mut h = Harness::new();
            std::fs::write(h.path("file"), b"content").unwrap();
            std::fs::create_dir(h.path("dir")).unwrap();
            for (i, (opcode, nodeid, payload, len)) in requests.into_iter().enumerate() {
                let header = InHeader {
                    len: len.unwrap_or((std::mem::size_of::<InHeader>() + payload.len()) as u32),
                    opcode,
                    unique: 1000 + i as u64,
                    nodeid,
                    ..InHeader::default()
                };
                let request = [header.as_slice(), &payload].concat();
                h.mem.write_slice(&request, GuestAddress(REQ_ADDR)).unwrap();
                let used = h.push_chain(&[
                    (REQ_ADDR, request.len() as u32, 0),
                    (REPLY_ADDR, REPLY_LEN, F_WRITE),
                ]);
                if let Some(used) = used {
                    prop_assert!(used <= REPLY_LEN);
                }
            }
            // Still serving: a well-formed request gets its own reply.
            let r = h.call(Opcode::Getattr, ROOT_ID, GetattrIn::default().as_slice());
            prop_assert!(r.error <= 0);
        }
    }
}
