//! The tap a virtio-net device runs on: a descriptor the VMM is handed (the shim opens the tap in
//! the pod's network namespace; the VMM opens nothing by name), checked to be a tap with a
//! virtio-net header, and configured for the offloads the guest driver acked.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::sys;

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
        let (name, flags) = sys::tun_get_iff(&fd).map_err(|e| TapError::NotTun(raw, e))?;
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotTap(raw));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(TapError::NoVnetHeader(raw));
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::PacketInfo(raw));
        }
        sys::tun_set_vnet_hdr_size(&fd, VNET_HDR_LEN as libc::c_int)
            .map_err(ioctl_err("set the virtio-net header size"))?;
        let set_nonblock = fcntl(&fd, FcntlArg::F_GETFL).and_then(|fl| {
            let fl = OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK;
            fcntl(&fd, FcntlArg::F_SETFL(fl))
        });
        set_nonblock.map_err(|e| ioctl_err("set O_NONBLOCK")(e.into()))?;
        Ok(Tap { fd, name })
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
        sys::tun_set_offload(&self.fd, flags).map_err(ioctl_err("set offloads (TUNSETOFFLOAD)"))
    }

    /// Reads one frame (header included) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(&self.fd, buf)?)
    }

    /// Writes one frame (header included).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(&self.fd, frame)?)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
