//! `nutshell-bench-probe`: the loops the benchmark runs inside a container, each bounded by a
//! count and a time limit, each printing `name value` lines. Built static (musl, by
//! scripts/setup.sh): a dynamically linked program costs seconds of page faults to start in a
//! guest whose kernel is emulated, paid by every probe container.
//!
//! - `faults MIB ROUNDS [SECS]`: allocate MIB MiB (32 MiB at a time), touch every page, free it,
//!   ROUNDS times (one page fault per 4 KiB page): `faults_per_s`.
//! - `syscalls COUNT [SECS]`: `getpid` COUNT times, 1-byte reads of `/dev/zero` COUNT times:
//!   `getpid_per_s`, `read_per_s`.
//! - `compute MIB`: SHA-256 over a 1 MiB buffer MIB times, no system call between the marker
//!   lines `compute_start` and `compute_done`; then `compute_mib_per_s` by the container's own
//!   clock (two clock reads).
//! - `files DIR COUNT [SECS]`: create, write 4 KiB, close and later unlink COUNT files in DIR:
//!   `create_per_s`, `unlink_per_s`.
//! - `echo-server PORT`: a TCP echo server on every address of the container (the network
//!   workload's request/response peer): every connection is echoed, byte for byte, on a
//!   thread of its own with `TCP_NODELAY`, until the container is stopped. Prints
//!   `echo_listening PORT` once it accepts.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
/// No timed loop runs longer than this (or SECS, the optional last argument), whatever the
/// count.
const DEFAULT_LIMIT: Duration = Duration::from_secs(10);

fn arg(args: &[String], i: usize) -> Result<u64, String> {
    args.get(i)
        .ok_or_else(|| format!("argument {i} missing"))?
        .parse::<u64>()
        .map_err(|e| format!("argument {i}: {e}"))
}

/// The optional time limit in seconds at `args[i]`.
fn limit(args: &[String], i: usize) -> Result<Duration, String> {
    match args.get(i) {
        None => Ok(DEFAULT_LIMIT),
        Some(_) => Ok(Duration::from_secs(arg(args, i)?.max(1))),
    }
}

fn per_s(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The page-fault loop maps at most this much at once, so that it runs in a small VM (a pod's
/// guest has 256 MiB by default) as it does on the host.
const FAULT_CHUNK_MIB: u64 = 32;

fn faults(mib: u64, rounds: u64, limit: Duration) -> Result<(), String> {
    let mib = mib.min(4096);
    let chunk_mib = mib.clamp(1, FAULT_CHUNK_MIB);
    let bytes = usize::try_from(chunk_mib * 1024 * 1024).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut touched = 0u64;
    'rounds: for _ in 0..rounds {
        for _ in 0..mib.div_ceil(chunk_mib) {
            // A zeroed allocation this large is a fresh anonymous mapping: every first write to
            // a page is a page fault, and dropping it unmaps it again.
            let mut buf = vec![0u8; bytes];
            for i in (0..bytes).step_by(PAGE) {
                buf[i] = 1;
                touched += 1;
                if touched.is_multiple_of(256) && start.elapsed() > limit {
                    break 'rounds;
                }
            }
            std::hint::black_box(&buf);
        }
    }
    println!("faults_per_s {:.1}", per_s(touched, start.elapsed()));
    Ok(())
}

fn syscalls(count: u64, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut n = 0;
    while n < count && (n % 256 != 0 || start.elapsed() < limit) {
        std::hint::black_box(std::process::id());
        n += 1;
    }
    println!("getpid_per_s {:.1}", per_s(n, start.elapsed()));
    let mut zero = std::fs::File::open("/dev/zero").map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    let start = Instant::now();
    let mut n = 0;
    while n < count && (n % 256 != 0 || start.elapsed() < limit) {
        zero.read_exact(&mut byte).map_err(|e| e.to_string())?;
        n += 1;
    }
    println!("read_per_s {:.1}", per_s(n, start.elapsed()));
    Ok(())
}

fn compute(mib: u64) -> Result<(), String> {
    use sha2::Digest;
    let buf: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "compute_start").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut digest = [0u8; 32];
    for _ in 0..mib {
        let mut h = sha2::Sha256::new();
        h.update(digest);
        h.update(&buf);
        digest = h.finalize().into();
    }
    let elapsed = start.elapsed();
    writeln!(out, "compute_done {:02x}{:02x}", digest[0], digest[1]).map_err(|e| e.to_string())?;
    writeln!(out, "compute_mib_per_s {:.1}", per_s(mib, elapsed)).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())
}

fn files(dir: &str, count: u64, limit: Duration) -> Result<(), String> {
    let base = std::path::Path::new(dir).join(format!("probe-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    let data = [0x5au8; PAGE];
    let start = Instant::now();
    let mut created = 0;
    while created < count && start.elapsed() < limit {
        let mut f =
            std::fs::File::create(base.join(created.to_string())).map_err(|e| e.to_string())?;
        f.write_all(&data).map_err(|e| e.to_string())?;
        created += 1;
    }
    println!("create_per_s {:.1}", per_s(created, start.elapsed()));
    let start = Instant::now();
    for i in 0..created {
        std::fs::remove_file(base.join(i.to_string())).map_err(|e| e.to_string())?;
    }
    println!("unlink_per_s {:.1}", per_s(created, start.elapsed()));
    std::fs::remove_dir(&base).map_err(|e| e.to_string())
}

/// Writes back what `conn` sends until it closes. `TCP_NODELAY`: each answer leaves at once,
/// as a request/response server's does, not after Nagle's wait for the previous one's ACK.
fn echo(mut conn: std::net::TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn echo_server(port: u64) -> Result<(), String> {
    let port = u16::try_from(port).map_err(|e| format!("port {port}: {e}"))?;
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| format!("listen on port {port}: {e}"))?;
    println!("echo_listening {port}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                std::thread::spawn(move || echo(conn));
            }
            Err(e) => eprintln!("nutshell-bench-probe: accept: {e}"),
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("faults") => arg(&args, 2).and_then(|m| faults(m, arg(&args, 3)?, limit(&args, 4)?)),
        Some("syscalls") => arg(&args, 2).and_then(|n| syscalls(n, limit(&args, 3)?)),
        Some("compute") => arg(&args, 2).and_then(compute),
        Some("files") => match args.get(2) {
            Some(dir) => arg(&args, 3).and_then(|n| files(dir, n, limit(&args, 4)?)),
            None => Err("files DIR COUNT [SECS]".to_owned()),
        },
        Some("echo-server") => arg(&args, 2).and_then(echo_server),
        _ => Err(
            "usage: nutshell-bench-probe faults MIB ROUNDS [SECS] | syscalls COUNT [SECS] | compute MIB \
             | files DIR COUNT [SECS] | echo-server PORT"
                .to_owned(),
        ),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nutshell-bench-probe: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
