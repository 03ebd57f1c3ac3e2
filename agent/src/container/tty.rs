//! A container's terminal, allocated the way runc does it: the child opens the container's own
//! `/dev/ptmx` after its root is set up ([`open_in_container`]), makes the slave its controlling
//! terminal and stdio, and passes the master to the agent over a Unix socket (SCM_RIGHTS). The
//! pty is thus one of the container's devpts, and `ttyname()` inside finds it under `/dev/pts`.
//! The agent checks what it received ([`Pty::attach`]) and runs two copy threads between the
//! master and the caller's stdin/stdout descriptors.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{Mode, SFlag};

use super::step::StepResult;
use super::ContainerError;
use crate::sys as syscall;

/// Device number of a pty master: every open of `ptmx` (`/dev/ptmx` or `pts/ptmx`) is c 5:2.
const PTMX_MAJOR: u32 = 5;
const PTMX_MINOR: u32 = 2;

/// In the child, after its root file system is in place and before its credentials change:
/// opens a pty in the container's devpts, makes the slave stdin, stdout, stderr and the
/// controlling terminal (the caller is a session leader), and sends the master over `socket`.
/// The slave is given to `uid`, the user the process runs as (as runc does for its stdio), so
/// that it can open its terminal by name, as its owner.
pub fn open_in_container(socket: BorrowedFd<'_>, uid: u32) -> StepResult {
    let master: OwnedFd = nix::fcntl::open(
        "/dev/ptmx",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("terminal: open /dev/ptmx in the container: {e}"))?;
    if !is_pty_master(master.as_fd()) {
        return Err("terminal: /dev/ptmx in the container is not a pty multiplexer".into());
    }
    syscall::unlock_pty(master.as_fd()).map_err(|e| format!("terminal: unlock the pty: {e}"))?;
    let slave = syscall::open_pty_peer(
        master.as_fd(),
        libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
    )
    .map_err(|e| format!("terminal: open the pty slave: {e}"))?;
    nix::unistd::fchown(slave.as_fd(), Some(nix::unistd::Uid::from_raw(uid)), None)
        .map_err(|e| format!("terminal: give the pty to uid {uid}: {e}"))?;
    for target in 0..3 {
        syscall::dup_onto(slave.as_fd(), target).map_err(|e| format!("dup the terminal: {e}"))?;
    }
    syscall::set_controlling_terminal(0)
        .map_err(|e| format!("set the controlling terminal: {e}"))?;
    syscall::send_fd(socket, master.as_fd())
        .map_err(|e| format!("terminal: send the pty to the agent: {e}"))?;
    // Both are close-on-exec as well; the container must hold neither the master nor a copy of
    // the slave beyond 0-2 (the master's reader sees EOF only when the last slave closes).
    drop(slave);
    drop(master);
    Ok(())
}

/// Whether `fd` is the master side of a pty: the ptmx device number, and the pty number
/// readable (TIOCGPTN).
fn is_pty_master(fd: BorrowedFd<'_>) -> bool {
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return false;
    };
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFCHR
        && libc::major(st.st_rdev) == PTMX_MAJOR
        && libc::minor(st.st_rdev) == PTMX_MINOR
        && syscall::pty_number(fd).is_ok()
}

/// Refuses anything but a pty master (what the agent receives comes from the container).
pub fn check_master(fd: BorrowedFd<'_>) -> Result<(), ContainerError> {
    if is_pty_master(fd) {
        Ok(())
    } else {
        Err(ContainerError::Setup(
            "terminal: the child sent something other than a pty master".into(),
        ))
    }
}

/// The agent's side of a container terminal.
#[derive(Debug)]
pub struct Pty {
    master: OwnedFd,
    /// Dropping it (close_stdin, remove) stops the stdin copy thread.
    stop_stdin: Option<OwnedFd>,
}

impl Pty {
    /// Takes the pty master the child sent and starts the copy threads. `master` comes from
    /// the container: anything but a pty master is refused. Without a separate `stdin`,
    /// `stdout` carries the terminal both ways (the agent's stdio streams give one stream for
    /// a terminal).
    pub fn attach(
        master: OwnedFd,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
    ) -> Result<Pty, ContainerError> {
        check_master(master.as_fd())?;
        let io = |what: &'static str| {
            move |e: nix::Error| ContainerError::Io {
                what,
                source: e.into(),
            }
        };
        let stdin = match (stdin, &stdout) {
            (Some(stdin), _) => Some(stdin),
            (None, Some(stdout)) => Some(stdout.try_clone().map_err(|e| ContainerError::Io {
                what: "dup the terminal stream",
                source: e,
            })?),
            (None, None) => None,
        };
        // Closed when the output ends: the input thread then drops its copy of the stream too,
        // so that the host sees EOF.
        let (done_r, done_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io("pipe"))?;
        let stop_stdin = match stdin {
            Some(stdin) => {
                let (stop_r, stop_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io("pipe"))?;
                let master_in = master.try_clone().map_err(|e| ContainerError::Io {
                    what: "dup pty",
                    source: e,
                })?;
                spawn_thread("pty-in", move || {
                    copy_input(stdin, master_in, stop_r, done_r)
                })?;
                Some(stop_w)
            }
            None => None,
        };
        let master_out = master.try_clone().map_err(|e| ContainerError::Io {
            what: "dup pty",
            source: e,
        })?;
        spawn_thread("pty-out", move || copy_output(master_out, stdout, done_w))?;
        Ok(Pty { master, stop_stdin })
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ContainerError> {
        syscall::set_window_size(self.master.as_fd(), rows, cols).map_err(|e| ContainerError::Io {
            what: "set the window size",
            source: e,
        })
    }

    /// Stops copying stdin into the terminal and closes the agent's stdin descriptor.
    pub fn close_stdin(&mut self) {
        self.stop_stdin = None;
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ContainerError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| ContainerError::Io {
            what: "spawn a pty thread",
            source: e,
        })
}

/// Master → stdout until the last slave closes (EIO) or stdout goes away; without stdout the
/// output is drained so that the process never blocks on a full terminal.
fn copy_output(master: OwnedFd, stdout: Option<OwnedFd>, _done: OwnedFd) {
    let mut master = File::from(master);
    let mut stdout = stdout.map(File::from);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match master.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if let Some(out) = stdout.as_mut() {
            if out.write_all(&buf[..n]).is_err() {
                stdout = None;
            }
        }
    }
}

/// stdin → master until stdin ends, or `stop` or `done` is closed.
fn copy_input(stdin: OwnedFd, master: OwnedFd, stop: OwnedFd, done: OwnedFd) {
    let mut master = File::from(master);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let mut fds = [
            PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(done.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
        }
        if fds[1..]
            .iter()
            .any(|f| f.revents().is_some_and(|r| !r.is_empty()))
        {
            return;
        }
        let n = match nix::unistd::read(&stdin, &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => continue,
            Err(_) => return,
        };
        if master.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_a_pty_master_is_accepted() {
        let pty = nix::pty::openpty(None, None).unwrap();
        assert!(check_master(pty.master.as_fd()).is_ok());
        // A slave: neither the ptmx device number nor TIOCGPTN (ENOTTY).
        assert!(check_master(pty.slave.as_fd()).is_err());
        let (r, w) = nix::unistd::pipe().unwrap();
        assert!(check_master(r.as_fd()).is_err());
        assert!(check_master(w.as_fd()).is_err());
        let null = File::open("/dev/null").unwrap();
        assert!(check_master(null.as_fd()).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_master(a.as_fd()).is_err());
    }

    #[test]
    fn attach_refuses_a_non_pty() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = Pty::attach(r, None, None).unwrap_err();
        assert!(err.to_string().contains("pty master"), "{err}");
    }
}
