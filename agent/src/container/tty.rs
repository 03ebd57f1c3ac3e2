//! A container's terminal: a pty whose slave becomes the process's controlling terminal, and
//! two copy threads between the master and the caller's stdin/stdout descriptors.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::syscall;
use super::ContainerError;

/// The agent's side of a container terminal.
#[derive(Debug)]
pub struct Pty {
    master: OwnedFd,
    /// Dropping it (close_stdin, remove) stops the stdin copy thread.
    stop_stdin: Option<OwnedFd>,
}

impl Pty {
    /// Opens a pty and starts the copy threads; returns the slave for the child. Without a
    /// separate `stdin`, `stdout` carries the terminal both ways (the agent's stdio streams
    /// give one stream for a terminal).
    pub fn open(
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
    ) -> Result<(Pty, OwnedFd), ContainerError> {
        let io = |what: &'static str| {
            move |e: nix::Error| ContainerError::Io {
                what,
                source: e.into(),
            }
        };
        let pty = nix::pty::openpty(None, None).map_err(io("openpty"))?;
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io("fcntl"))?;
        }
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
                let master_in = pty.master.try_clone().map_err(|e| ContainerError::Io {
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
        let master_out = pty.master.try_clone().map_err(|e| ContainerError::Io {
            what: "dup pty",
            source: e,
        })?;
        spawn_thread("pty-out", move || copy_output(master_out, stdout, done_w))?;
        Ok((
            Pty {
                master: pty.master,
                stop_stdin,
            },
            pty.slave,
        ))
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
