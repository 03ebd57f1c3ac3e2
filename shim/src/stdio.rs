//! Stdio of a process: bytes between containerd's FIFOs and the agent's vsock streams.
//!
//! One stream per pipe (one for a terminal, carrying the pty both ways). The shim picks the
//! guest ports and starts connecting before it sends the RPC that creates the process; the
//! agent listens on them while it handles that RPC. The copies run in threads, no RPC per
//! chunk; stdin's EOF half-closes its stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nutshell_protocol::client::{connect_hybrid, ClientError};
use nutshell_protocol::types::StdioPorts;

/// How long a stream is tried while the agent does not listen yet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// containerd's stdio paths of a process (empty: not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO (with a terminal, the pty's output).
    pub stdout: String,
    /// stderr FIFO (unused with a terminal).
    pub stderr: String,
    /// Whether the process gets a pty.
    pub terminal: bool,
}

impl StdioPaths {
    /// The guest ports for these paths, drawn from `next_port`; 0 where no path.
    pub fn ports(&self, mut next_port: impl FnMut() -> u32) -> StdioPorts {
        if self.terminal {
            let any = !self.stdin.is_empty() || !self.stdout.is_empty();
            // The agent takes the pty stream on the stdout port (agent/src/stdio.rs).
            return StdioPorts {
                stdin: 0,
                stdout: if any { next_port() } else { 0 },
                stderr: 0,
            };
        }
        let mut port = |p: &str| if p.is_empty() { 0 } else { next_port() };
        StdioPorts {
            stdin: port(&self.stdin),
            stdout: port(&self.stdout),
            stderr: port(&self.stderr),
        }
    }
}

/// The copies of one process. Dropping it cancels streams still connecting.
#[derive(Debug)]
pub struct StdioCopy {
    cancel: Arc<AtomicBool>,
    outputs_done: Mutex<Receiver<()>>,
}

impl StdioCopy {
    /// Starts connecting to `ports` through `uds` and copying to and from `paths`.
    pub fn start(uds: &Path, paths: &StdioPaths, ports: StdioPorts, id: &str) -> StdioCopy {
        let cancel = Arc::new(AtomicBool::new(false));
        let (done_tx, outputs_done) = mpsc::channel::<()>();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            if let Err(e) = std::thread::Builder::new()
                .name(format!("stdio-{name}-{id}"))
                .spawn(f)
            {
                log::error!("{id}: cannot start the {name} copy: {e}");
            }
        };
        let ctx = |port: u32| Ctx {
            uds: uds.to_path_buf(),
            port,
            cancel: Arc::clone(&cancel),
            id: id.to_owned(),
        };
        if paths.terminal {
            if ports.stdout != 0 {
                let c = ctx(ports.stdout);
                let (stdin, stdout) = (paths.stdin.clone(), paths.stdout.clone());
                let done = done_tx.clone();
                spawn("pty", Box::new(move || c.run_pty(&stdin, &stdout, done)));
            }
        } else {
            if ports.stdin != 0 {
                let c = ctx(ports.stdin);
                let path = paths.stdin.clone();
                spawn("stdin", Box::new(move || c.run_stdin(&path)));
            }
            for (name, port, path) in [
                ("stdout", ports.stdout, &paths.stdout),
                ("stderr", ports.stderr, &paths.stderr),
            ] {
                if port != 0 {
                    let c = ctx(port);
                    let path = path.clone();
                    let done = done_tx.clone();
                    spawn(name, Box::new(move || c.run_output(&path, done)));
                }
            }
        }
        StdioCopy {
            cancel,
            outputs_done: Mutex::new(outputs_done),
        }
    }

    /// Waits until the output copies reached EOF, at most `timeout`: the process's last
    /// bytes are in the FIFOs before its exit is reported.
    pub fn wait_outputs(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let rx = self.outputs_done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(()) => {}
                Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => return,
            }
        }
    }
}

impl Drop for StdioCopy {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

struct Ctx {
    uds: PathBuf,
    port: u32,
    cancel: Arc<AtomicBool>,
    id: String,
}

impl Ctx {
    /// Connects to the guest port, retrying while the agent does not listen yet.
    fn connect(&self) -> Option<UnixStream> {
        let started = Instant::now();
        let deadline = started + CONNECT_TIMEOUT;
        let mut last: Option<ClientError> = None;
        let mut attempts = 0u32;
        while !self.cancel.load(Ordering::Relaxed) && Instant::now() < deadline {
            // The handshake gets all the time left: an attempt given up while the guest is
            // slow to answer may already be the agent's accepted stream (it accepts one per
            // port), and the retry would find no listener while the process writes into a
            // stream nobody reads. A guest that does not listen yet answers with a reset, at
            // once.
            let left = deadline.saturating_duration_since(Instant::now());
            attempts += 1;
            match connect_hybrid(&self.uds, self.port, left) {
                Ok(s) => {
                    log::debug!(
                        "{}: stdio port {} connected in {:.1} ms ({attempts} attempts)",
                        self.id,
                        self.port,
                        started.elapsed().as_secs_f64() * 1000.0
                    );
                    return Some(s);
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.cancel.load(Ordering::Relaxed) {
            log::warn!(
                "{}: stdio port {} not connected: {}",
                self.id,
                self.port,
                last.map(|e| crate::error::chain(&e)).unwrap_or_default()
            );
        }
        None
    }

    // Output FIFOs are opened first, while containerd's client (ctr, the CRI) waits for the
    // Create or Exec that this copy belongs to and so is there to read: `ctr run -d` exits
    // right after Start, and a FIFO opened for writing after that never finds its reader.
    // stdin cannot wait for its writer that way (the agent wants the stream connected within
    // seconds, and ctr may open its end only later): see `open_stdin`.

    fn run_output(&self, path: &str, _done: Sender<()>) {
        let mut fifo = match OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("{}: open {path}: {e}", self.id);
                return;
            }
        };
        let Some(mut stream) = self.connect() else {
            return;
        };
        copy_logged(&mut stream, &mut fifo, &self.id, path);
        // `_done` drops here: one output finished.
    }

    fn run_stdin(&self, path: &str) {
        let Some(mut fifo) = StdinFifo::open(path, &self.id) else {
            return;
        };
        let Some(mut stream) = self.connect() else {
            return;
        };
        copy_logged(&mut fifo, &mut stream, &self.id, path);
        let _ = stream.shutdown(Shutdown::Write);
    }

    fn run_pty(&self, stdin: &str, stdout: &str, _done: Sender<()>) {
        // The stdin FIFO is opened in a thread of its own (its writer may come after the
        // output's reader); it gets the stream once connected.
        let (to_guest_tx, to_guest_rx) = mpsc::channel::<UnixStream>();
        if !stdin.is_empty() {
            let id = self.id.clone();
            let path = stdin.to_owned();
            let fifo = StdinFifo::open(&path, &id);
            let spawned = std::thread::Builder::new()
                .name(format!("stdio-pty-in-{id}"))
                .spawn(move || {
                    let Some(mut fifo) = fifo else {
                        return;
                    };
                    // The sender goes away without a stream when the connection failed.
                    if let Ok(mut to_guest) = to_guest_rx.recv() {
                        copy_logged(&mut fifo, &mut to_guest, &id, &path);
                        let _ = to_guest.shutdown(Shutdown::Write);
                    }
                });
            if let Err(e) = spawned {
                log::warn!("{}: pty stdin: {e}", self.id);
            }
        }
        let mut fifo = None;
        if !stdout.is_empty() {
            match OpenOptions::new().write(true).open(stdout) {
                Ok(f) => fifo = Some(f),
                Err(e) => log::warn!("{}: open {stdout}: {e}", self.id),
            }
        }
        let Some(mut stream) = self.connect() else {
            return;
        };
        if !stdin.is_empty() {
            match stream.try_clone() {
                Ok(to_guest) => {
                    let _ = to_guest_tx.send(to_guest);
                }
                Err(e) => log::warn!("{}: pty stdin: {e}", self.id),
            }
        }
        if let Some(mut fifo) = fifo {
            copy_logged(&mut stream, &mut fifo, &self.id, stdout);
        }
    }
}

/// containerd's stdin FIFO, read until its writer closes it.
///
/// Opened for reading with `O_NONBLOCK`, so the open never waits: a writer that is opening it,
/// or opens it later, finds a reader at once (a blocking open waits for the writer, and a
/// writer that wrote and closed before it would leave its bytes unread). Reads poll first: a
/// FIFO reports hang-up only after a writer came and went, so "no writer yet" is not EOF.
struct StdinFifo(File);

impl StdinFifo {
    fn open(path: &str, id: &str) -> Option<StdinFifo> {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => Some(StdinFifo(f)),
            Err(e) => {
                log::warn!("{id}: open {path}: {e}");
                None
            }
        }
    }
}

impl Read for StdinFifo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsFd;
        loop {
            crate::sys::wait_readable(self.0.as_fd(), None)?;
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

fn copy_logged(from: &mut impl Read, to: &mut impl Write, id: &str, path: &str) {
    match copy_unspliced(from, to) {
        Ok(n) => log::debug!("{id}: {path}: {n} bytes"),
        // The reader went away (containerd closed its end): not an error of the task.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => log::warn!("{id}: {path}: {e}"),
    }
}

/// Copies until EOF with plain reads and writes.
///
/// Not `io::copy`: between a socket and a FIFO it uses splice(2), and a splice from a socket
/// into a pipe holds the pipe's lock while it waits for the socket. Whoever else touches that
/// FIFO meanwhile (containerd reading it, or closing it when it or `ctr run -d` exits) then
/// sleeps uninterruptibly until the guest writes again: a process that never writes more left
/// `ctr` and a stopping containerd unkillable.
fn copy_unspliced(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn ports_are_drawn_per_pipe() {
        let mut next = 0x4000_0000u32;
        let mut draw = || {
            next += 1;
            next - 1
        };
        let p = StdioPaths {
            stdin: String::new(),
            stdout: "/o".into(),
            stderr: "/e".into(),
            terminal: false,
        };
        assert_eq!(
            p.ports(&mut draw),
            StdioPorts {
                stdin: 0,
                stdout: 0x4000_0000,
                stderr: 0x4000_0001
            }
        );
        let t = StdioPaths {
            stdin: "/i".into(),
            stdout: "/o".into(),
            stderr: String::new(),
            terminal: true,
        };
        assert_eq!(
            t.ports(&mut draw),
            StdioPorts {
                stdin: 0,
                stdout: 0x4000_0002,
                stderr: 0
            }
        );
        assert_eq!(
            StdioPaths::default().ports(&mut draw),
            StdioPorts::default()
        );
    }

    /// A fake VMM + agent: refuses the first attempt, then accepts `CONNECT <port>` and runs
    /// `serve` on the stream.
    fn fake_guest(
        uds: &Path,
        port: u32,
        serve: impl FnOnce(UnixStream) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(uds).unwrap();
        std::thread::spawn(move || {
            let (refused, _) = listener.accept().unwrap();
            drop(refused);
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line, format!("CONNECT {port}\n"));
            (&s).write_all(b"OK 1073741824\n").unwrap();
            serve(s);
        })
    }

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn output_stream_reaches_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let fifo = dir.path().join("stdout");
        mkfifo(&fifo);
        let guest = fake_guest(&uds, 7, |mut s| {
            s.write_all(b"hello from the guest\n").unwrap();
        });
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
        };
        let paths = StdioPaths {
            stdout: fifo.to_str().unwrap().into(),
            ..Default::default()
        };
        let copy = StdioCopy::start(
            &uds,
            &paths,
            StdioPorts {
                stdout: 7,
                ..Default::default()
            },
            "c1",
        );
        guest.join().unwrap();
        copy.wait_outputs(Duration::from_secs(10));
        assert_eq!(reader.join().unwrap(), "hello from the guest\n");
    }

    #[test]
    fn stdin_without_a_writer_yet_is_not_eof() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdin");
        mkfifo(&fifo);
        // The open returns without a writer.
        let mut reader = StdinFifo::open(fifo.to_str().unwrap(), "c1").unwrap();
        let read = std::thread::spawn(move || {
            let mut got = String::new();
            reader.read_to_string(&mut got).unwrap();
            got
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!read.is_finished(), "EOF before any writer came");
        // A writer that writes and closes at once: its bytes, then EOF.
        std::fs::write(&fifo, b"late\n").unwrap();
        assert_eq!(read.join().unwrap(), "late\n");
    }

    #[test]
    fn stdin_eof_half_closes_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let fifo = dir.path().join("stdin");
        mkfifo(&fifo);
        let (tx, rx) = mpsc::channel();
        let guest = fake_guest(&uds, 9, move |mut s| {
            let mut got = String::new();
            // read_to_string returns only at the half-close.
            s.read_to_string(&mut got).unwrap();
            tx.send(got).unwrap();
        });
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, b"input\n").unwrap())
        };
        let paths = StdioPaths {
            stdin: fifo.to_str().unwrap().into(),
            ..Default::default()
        };
        let _copy = StdioCopy::start(
            &uds,
            &paths,
            StdioPorts {
                stdin: 9,
                ..Default::default()
            },
            "c1",
        );
        writer.join().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "input\n");
        guest.join().unwrap();
    }
}
