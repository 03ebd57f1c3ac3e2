//! Slow lane: hybrid vsock with the real guest kernel. The test init echoes one connection on
//! guest port 1024, then connects to host port 1025 (`<uds>_1025`) and says hello.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nutshell_tests::GuestBoot;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Connects through the hybrid vsock socket, retrying until the guest listens.
fn connect_guest(uds: &std::path::Path, port: u32, deadline: Instant) -> UnixStream {
    loop {
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "guest never accepted on port {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn hybrid_vsock_echo_and_guest_initiated_connection() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let host_listener = UnixListener::bind(dir.path().join("vsock.sock_1025")).unwrap();
    let mut vm = GuestBoot::new("test-initramfs.cpio")
        .cmdline("quiet nutshell_test.action=vsock-echo")
        .vsock(&uds)
        .spawn()
        .unwrap();
    vm.wait_for_console("NUTSHELL_TEST_INIT uptime=", BOOT_TIMEOUT)
        .unwrap();

    let mut conn = connect_guest(&uds, 1024, Instant::now() + Duration::from_secs(60));
    // Round trips of a small message: the RPC-free latency over hybrid vsock.
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..50u32 {
        let msg = format!("ping {i:08}\n");
        let t = Instant::now();
        conn.write_all(msg.as_bytes()).unwrap();
        conn.read_exact(&mut buf[..msg.len()]).unwrap();
        rtts.push(t.elapsed());
        assert_eq!(&buf[..msg.len()], msg.as_bytes());
    }
    rtts.sort();
    // Bulk: 4 MiB through the echo, written and read concurrently.
    let bulk: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut writer = conn.try_clone().unwrap();
    let to_send = bulk.clone();
    let t = Instant::now();
    let w = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    conn.read_to_end(&mut echoed).unwrap();
    let bulk_time = t.elapsed();
    w.join().unwrap();
    assert!(
        echoed == bulk,
        "echo differs: {} of {} bytes",
        echoed.len(),
        bulk.len()
    );
    eprintln!(
        "vsock echo: round trip median {:.1} us (min {:.1}, max {:.1}); 4 MiB echoed in {:.2} s ({:.1} MiB/s each way)",
        rtts[rtts.len() / 2].as_secs_f64() * 1e6,
        rtts[0].as_secs_f64() * 1e6,
        rtts[rtts.len() - 1].as_secs_f64() * 1e6,
        bulk_time.as_secs_f64(),
        4.0 / bulk_time.as_secs_f64()
    );

    host_listener.set_nonblocking(false).unwrap();
    let (from_guest, _) = host_listener.accept().unwrap();
    from_guest
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(from_guest.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "hello-from-guest\n");
    drop(from_guest);

    let out = vm.wait(Duration::from_secs(60)).unwrap();
    out.assert_status(0);
    assert!(out.console.contains("vsock-echo done"), "{}", out.console);
    assert!(!uds.exists(), "the VMM removes its socket on exit");
}
