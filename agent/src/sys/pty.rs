//! Terminals (the pty ioctls a container's terminal needs) and passing a descriptor over a
//! Unix socket.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Makes the terminal on `fd` the controlling terminal of the calling session leader.
pub fn set_controlling_terminal(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal) and touches no memory.
    if unsafe { libc::ioctl(fd, libc::TIOCSCTTY as _, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the window size of the terminal on `fd`.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ as _, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unlocks the slave of the pty master `master` (what unlockpt(3) does).
pub fn unlock_pty(master: BorrowedFd<'_>) -> io::Result<()> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which lives for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK as _, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The number N of the pty whose master is `master` (its slave is `pts/N` of its devpts); fails
/// (ENOTTY) on anything that is not a pty.
pub fn pty_number(master: BorrowedFd<'_>) -> io::Result<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int to the pointer, which lives for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN as _, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// Opens the slave of the pty master `master` through the devpts instance the master came from
/// (TIOCGPTPEER, Linux 4.13+): no path lookup, so no other file can stand in for it. `flags`
/// are open flags (`O_RDWR | O_NOCTTY | O_CLOEXEC`).
pub fn open_pty_peer(master: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: TIOCGPTPEER takes the open flags as an integer argument and returns a new
    // descriptor or -1; it touches no memory of ours.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The most descriptors one SCM_RIGHTS message can carry (the kernel's SCM_MAX_FD).
const SCM_MAX_FD: usize = 253;

/// Sends `fd` over the Unix socket `sock` (SCM_RIGHTS, with a one-byte payload).
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd.as_raw_fd()];
    let payload = [0u8; 1];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(&payload)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives exactly one descriptor from the next message on the Unix socket `sock`, without
/// waiting (the peer sent it before it reported so on another channel). The received
/// descriptors are close-on-exec. A message with no descriptor or with more than one is an
/// error (`InvalidData`), and every descriptor that came with it is closed; so is EOF.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let mut payload = [0u8; 16];
    // Room for the most a message can carry, so that the kernel never truncates the control
    // data (it would install the descriptors that fit and nix would then refuse to list them).
    // The kernel also truncates when this process runs out of descriptors; the ones it did
    // install then stay open, which only an agent already at its descriptor limit can meet.
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [io::IoSliceMut::new(&mut payload)];
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received: Vec<OwnedFd> = Vec::new();
    let mut other = false;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmRights(fds) => {
                // SAFETY: the kernel installed these descriptors in this process for this
                // message; nothing else knows them, so each gets exactly one owner here.
                received.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
            _ => other = true,
        }
    }
    if msg.bytes == 0 && received.is_empty() {
        return Err(invalid(
            "the peer closed the socket without sending a descriptor".into(),
        ));
    }
    if other {
        return Err(invalid("unexpected control data".into()));
    }
    if received.len() != 1 {
        return Err(invalid(format!(
            "expected one descriptor, got {}",
            received.len()
        )));
    }
    Ok(received.remove(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
    };

    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn send_raw(sock: &OwnedFd, payload: &[u8], fds: &[RawFd]) {
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
        sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(payload)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn a_descriptor_crosses_a_socketpair() {
        let (a, b) = pair();
        let (r, w) = nix::unistd::pipe().unwrap();
        send_fd(a.as_fd(), w.as_fd()).unwrap();
        drop(w);
        let got = recv_fd(b.as_fd()).unwrap();
        let flags = nix::fcntl::fcntl(&got, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received without close-on-exec"
        );
        std::fs::File::from(got).write_all(b"through").unwrap();
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "through");
    }

    #[test]
    fn nothing_sent_is_an_error_at_once() {
        let (_a, b) = pair();
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }

    #[test]
    fn a_closed_peer_or_a_message_without_descriptor_is_refused() {
        let (a, b) = pair();
        send_raw(&a, b"x", &[]);
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(a);
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn several_descriptors_are_refused_and_closed() {
        let (a, b) = pair();
        let (r1, w1) = nix::unistd::pipe().unwrap();
        let (r2, w2) = nix::unistd::pipe().unwrap();
        send_raw(&a, b"x", &[w1.as_raw_fd(), w2.as_raw_fd()]);
        drop((w1, w2));
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("got 2"), "{err}");
        // Both write ends are closed: the received copies too, nothing leaked.
        for r in [r1, r2] {
            let mut buf = [0u8; 1];
            assert_eq!(nix::unistd::read(&r, &mut buf).unwrap(), 0);
        }
    }
}
