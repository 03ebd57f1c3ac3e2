//! The tap a virtio-net device runs on: a descriptor the VMM is handed (the shim opens the tap in
//! the pod's network namespace; the VMM opens nothing by name), checked to be a tap with a
//! virtio-net header, and configured for the offloads the guest driver acked.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes of the `virtio_net_hdr_v1` (with `num_buffers`) before every frame the tap reads or
/// writes: the header of virtio 1.x.
pub const VNET_HDR_LEN: usize = 12;

/// Errors of taking over a tap descriptor.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The descriptor is not a tun/tap device.
    #[error("descriptor {0} is not a tap device (TUNGETIFF failed)")]
    NotTun(RawFd, #[source] io::Error),
    /// It is a tun (layer 3) device, not a tap.
    #[error("descriptor {0} is a tun device, not a tap (IFF_TAP unset)")]
    NotTap(RawFd),
    /// The tap was created without `IFF_VNET_HDR`.
    #[error("the tap of descriptor {0} has no virtio-net header (create it with IFF_VNET_HDR)")]
    NoVnetHeader(RawFd),
    /// The tap was created with packet information (`IFF_NO_PI` unset).
    #[error("the tap of descriptor {0} prepends packet information (create it with IFF_NO_PI)")]
    PacketInfo(RawFd),
    /// An ioctl or fcntl on the tap failed.
    #[error("cannot {what} on the tap")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as the tun ioctls use it: the name, then the flags.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn zeroed() -> IfReq {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }
}

/// A tap descriptor in non-blocking mode with a 12-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn ioctl_err(what: &'static str) -> impl FnOnce(io::Error) -> TapError {
    move |source| TapError::Io { what, source }
}

impl Tap {
    /// Takes over `fd`: checks it is a tap with `IFF_VNET_HDR` and `IFF_NO_PI`, sets the
    /// header size and non-blocking mode.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq::zeroed();
        // SAFETY: TUNGETIFF writes one `struct ifreq` (which `IfReq` lays out in full) into the
        // buffer it is given; `req` lives for the call.
        let r = unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TapError::NotTun(raw, io::Error::last_os_error()));
        }
        let flags = libc::c_int::from(req.flags);
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotTap(raw));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(TapError::NoVnetHeader(raw));
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::PacketInfo(raw));
        }
        let len = req
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid for the call.
        if unsafe { libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &size as *const libc::c_int) } < 0 {
            return Err(ioctl_err("set the virtio-net header size")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
        let set = unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            fl >= 0 && libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0
        };
        if !set {
            return Err(ioctl_err("set O_NONBLOCK")(io::Error::last_os_error()));
        }
        Ok(Tap { fd, name })
    }

    /// Takes over descriptor number `fd`, which this process inherited (`--net-fd`).
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in the process owns or closes.
    pub unsafe fn from_inherited(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: the caller guarantees `fd` is open and owned by no one else.
        Tap::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Creates a (non-persistent) tap named `name` in the calling thread's network namespace,
    /// with `IFF_VNET_HDR | IFF_NO_PI`: what the shim does for a pod, for tests.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        let fd = nutshell_protocol::netlink::create_tap(name)
            .map_err(ioctl_err("create the tap (TUNSETIFF)"))?;
        Tap::from_fd(fd)
    }

    /// A second descriptor of the same tap (for a restore that may fail and leave the tap to
    /// a cold boot).
    pub fn try_clone(&self) -> Result<Tap, TapError> {
        Ok(Tap {
            fd: self
                .fd
                .try_clone()
                .map_err(ioctl_err("duplicate the descriptor"))?,
            name: self.name.clone(),
        })
    }

    /// The tap's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the tap may hand the guest (`TUN_F_*`): checksums left to the guest,
    /// TSO frames, as the driver acked them. Without them the host kernel finishes checksums
    /// and segments frames before they reach the tap's reader.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(ioctl_err("set offloads (TUNSETOFFLOAD)")(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Reads one frame (header included) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into `buf`, which is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (header included).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write(2) from `frame`, which is valid for `frame.len()` bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
