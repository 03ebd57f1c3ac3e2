#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::packet::{op, Header, HDR_SIZE, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::devices::virtio::state::DeviceKind;

const GUEST_CID: u64 = 3;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RX_BUF: u32 = 4096;
/// Where packets the guest sends are written, and how much room they have.
const TX_DATA: u64 = 0x10_0000;
const TX_DATA_SIZE: u64 = 0x60_0000;

struct Harness {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    ev: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Vsock,
    dir: tempfile::TempDir,
    rx_desc: u16,
    tx_desc: u16,
    rx_seen: u16,
    tx_data: u64,
}

impl Harness {
    fn new() -> Harness {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        ));
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 64);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 64);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x2_0000), 64);
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.path().join("v.sock"),
        })
        .unwrap();
        let queues = vec![
            rx.create_queue::<Queue>().unwrap(),
            tx.create_queue::<Queue>().unwrap(),
            ev.create_queue::<Queue>().unwrap(),
        ];
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.activate(mem.clone(), VIRTIO_F_VERSION_1, queues, irq)
            .unwrap();
        Harness {
            mem,
            rx,
            tx,
            ev,
            dev,
            dir,
            rx_desc: 0,
            tx_desc: 0,
            rx_seen: 0,
            tx_data: TX_DATA,
        }
    }

    fn uds(&self) -> std::path::PathBuf {
        self.dir.path().join("v.sock")
    }

    fn guest_hdr(&self, src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Header::default()
        }
    }

    /// Puts raw descriptors on the TX queue as one chain.
    fn push_tx_descs(&mut self, descs: &[(u64, u32, u16)]) {
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(
                    *addr,
                    *len,
                    flags | next,
                    self.tx_desc + i as u16 + 1,
                ))
            })
            .collect();
        self.tx.add_desc_chains(&raw, self.tx_desc).unwrap();
        self.tx_desc += n;
    }

    /// Sends a packet as a header descriptor and a payload descriptor (as Linux 6.1 does).
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        self.send_raw(hdr, payload);
    }

    /// Sends a packet whose header is taken as it is (its length may lie).
    fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        let at = self.tx_data;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + HDR_SIZE as u64))
            .unwrap();
        // Packets are consumed by `process_tx` below: the area is reused after a while.
        self.tx_data = TX_DATA + (self.tx_data - TX_DATA + 0x2_0000) % TX_DATA_SIZE;
        if payload.is_empty() {
            self.push_tx_descs(&[(at, HDR_SIZE as u32, 0)]);
        } else {
            self.push_tx_descs(&[
                (at, HDR_SIZE as u32, 0),
                (at + HDR_SIZE as u64, payload.len() as u32, 0),
            ]);
        }
        self.dev.process_tx();
    }

    fn rx_addr(index: u16) -> u64 {
        0x80_0000 + u64::from(index) * 0x2000
    }

    /// Offers `n` RX buffers of `RX_BUF` bytes.
    fn give_rx(&mut self, n: u16) {
        for _ in 0..n {
            let raw = RawDescriptor::from(SplitDescriptor::new(
                Self::rx_addr(self.rx_desc),
                RX_BUF,
                F_WRITE,
                0,
            ));
            self.rx.add_desc_chains(&[raw], self.rx_desc).unwrap();
            self.rx_desc += 1;
        }
    }

    /// Runs the host side and RX, returns the packets the guest received.
    fn receive(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.dev.process_host_events();
        self.dev.process_rx();
        let mut out = Vec::new();
        let used = self.rx.used().idx().load();
        while self.rx_seen != used {
            let elem = self
                .rx
                .used()
                .ring()
                .ref_at(usize::from(self.rx_seen % 64))
                .unwrap()
                .load();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = Self::rx_addr(elem.id() as u16);
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(elem.len(), HDR_SIZE as u32 + hdr.len);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_SIZE as u64))
                .unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Guest-initiated connection from guest port `src` to host port `dst`, with a listener.
    fn guest_connect(&mut self, src: u32, dst: u32) -> UnixStream {
        let mut path = self.uds().into_os_string();
        path.push(format!("_{dst}"));
        let listener = UnixListener::bind(&path).unwrap();
        self.send(self.guest_hdr(src, dst, op::REQUEST), &[]);
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let got = self.receive();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, op::RESPONSE);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (dst, src));
        stream
    }
}

#[test]
fn guest_connects_and_data_flows_both_ways_then_host_eof_is_shutdown() {
    let mut h = Harness::new();
    h.give_rx(8);
    let mut host = h.guest_connect(5000, 1025);

    h.send(h.guest_hdr(5000, 1025, op::RW), b"ping");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    host.write_all(b"pong").unwrap();
    let got = h.receive();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, op::RW);
    assert_eq!(got[0].0.dst_cid, GUEST_CID);
    assert_eq!(got[0].0.fwd_cnt, 4, "reports what the host consumed");
    assert_eq!(got[0].1, b"pong");

    host.shutdown(std::net::Shutdown::Write).unwrap();
    let got = h.receive();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, op::SHUTDOWN);
    assert_eq!(got[0].0.flags, SHUTDOWN_SEND);

    // The guest closes both ways: the device resets the connection and closes the socket.
    let mut hdr = h.guest_hdr(5000, 1025, op::SHUTDOWN);
    hdr.flags = 3;
    h.send(hdr, &[]);
    let got = h.receive();
    assert_eq!(got[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), 0);
    assert_eq!(host.read(&mut buf).unwrap(), 0);
}

#[test]
fn guest_connect_without_host_listener_is_reset() {
    let mut h = Harness::new();
    h.give_rx(2);
    h.send(h.guest_hdr(5000, 4444, op::REQUEST), &[]);
    let got = h.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn host_connect_line_becomes_request_and_response_gives_ok() {
    let mut h = Harness::new();
    h.give_rx(4);
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let got = h.receive();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= FIRST_HOST_PORT);

    h.send(h.guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
    let mut line = [0u8; 32];
    let n = client.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {}\n", req.src_port)
    );

    client.write_all(b"to guest").unwrap();
    let got = h.receive();
    assert_eq!(got[0].0.op, op::RW);
    assert_eq!(got[0].1, b"to guest");
}

#[test]
fn bad_connect_line_is_closed() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client.write_all(b"HELLO 1024\n").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    h.dev.process_host_events();
    let mut b = [0u8; 8];
    assert_eq!(client.read(&mut b).unwrap(), 0);
    assert!(h.receive().is_empty());
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut h = Harness::new();
    h.give_rx(8);
    let mut path = h.uds().into_os_string();
    path.push("_1025");
    let listener = UnixListener::bind(&path).unwrap();
    let mut req = h.guest_hdr(5000, 1025, op::REQUEST);
    req.buf_alloc = 4;
    h.send(req, &[]);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(h.receive()[0].0.op, op::RESPONSE);

    host.write_all(b"0123456789").unwrap();
    let got = h.receive();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"0123");
    assert!(h.receive().is_empty(), "no credit left");

    let mut credit = h.guest_hdr(5000, 1025, op::CREDIT_UPDATE);
    credit.buf_alloc = 4;
    credit.fwd_cnt = 4;
    h.send(credit, &[]);
    let got = h.receive();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"4567");
}

#[test]
fn device_sends_credit_update_once_host_consumed_enough() {
    let mut h = Harness::new();
    h.give_rx(8);
    let mut host = h.guest_connect(5000, 1025);
    let chunk = vec![7u8; MAX_PKT_PAYLOAD];
    h.send(h.guest_hdr(5000, 1025, op::RW), &chunk);
    let mut got = vec![0u8; MAX_PKT_PAYLOAD];
    host.read_exact(&mut got).unwrap();
    let pkts = h.receive();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, op::CREDIT_UPDATE);
    assert_eq!(pkts[0].0.fwd_cnt, MAX_PKT_PAYLOAD as u32);
    assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_SIZE);

    h.send(h.guest_hdr(5000, 1025, op::CREDIT_REQUEST), &[]);
    assert_eq!(h.receive()[0].0.op, op::CREDIT_UPDATE);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut h = Harness::new();
    h.give_rx(8);
    // The host never reads: the socket buffer fills, then our buffer, then the guest overruns.
    let host = h.guest_connect(5000, 1025);
    let chunk = vec![1u8; MAX_PKT_PAYLOAD];
    let mut reset = false;
    for _ in 0..64 {
        h.send(h.guest_hdr(5000, 1025, op::RW), &chunk);
        let got = h.receive();
        if got.iter().any(|(hdr, _)| hdr.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring our credit is reset");
    assert_eq!(h.dev.connection_count(), 0);
    drop(host);
}

#[test]
fn malformed_tx_chains_are_dropped_without_panic() {
    let mut h = Harness::new();
    h.give_rx(8);
    // Header shorter than 44 bytes.
    h.push_tx_descs(&[(0x10_0000, 20, 0)]);
    // Length field larger than the payload.
    let mut hdr = h.guest_hdr(1, 2, op::RW);
    hdr.len = 1000;
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(0x10_0000))
        .unwrap();
    h.push_tx_descs(&[(0x10_0000, HDR_SIZE as u32 + 10, 0)]);
    // Length above the packet limit.
    hdr.len = u32::MAX;
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(0x11_0000))
        .unwrap();
    h.push_tx_descs(&[(0x11_0000, HDR_SIZE as u32, 0)]);
    // Outside guest memory, and a device-writable descriptor in TX.
    h.push_tx_descs(&[(0xffff_ffff_f000, 4096, 0)]);
    h.push_tx_descs(&[(0x10_0000, HDR_SIZE as u32, F_WRITE)]);
    h.dev.process_tx();
    assert_eq!(h.tx.used().idx().load(), 5, "every chain is returned");
    assert!(h.receive().is_empty());
    assert_eq!(h.dev.connection_count(), 0);

    // A well-formed packet for a connection that does not exist gets an RST.
    h.send(h.guest_hdr(7, 8, op::RW), b"x");
    let got = h.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (8, 7));
}

#[test]
fn rx_buffer_too_small_or_read_only_is_dropped() {
    let mut h = Harness::new();
    let raw = RawDescriptor::from(SplitDescriptor::new(Harness::rx_addr(0), 8, F_WRITE, 0));
    h.rx.add_desc_chains(&[raw], 0).unwrap();
    let raw = RawDescriptor::from(SplitDescriptor::new(Harness::rx_addr(1), 4096, 0, 0));
    h.rx.add_desc_chains(&[raw], 1).unwrap();
    h.rx_desc = 2;
    h.send(h.guest_hdr(5000, 4444, op::REQUEST), &[]);
    h.dev.process_rx();
    assert_eq!(h.rx.used().idx().load(), 2);
    // The RST still waits for a good buffer.
    h.rx_seen = 2;
    h.give_rx(1);
    let got = h.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RST);
}

#[test]
fn round_robin_between_streams() {
    let mut h = Harness::new();
    h.give_rx(2);
    let mut a = h.guest_connect(5000, 1025);
    h.give_rx(1);
    let mut b = h.guest_connect(5001, 1026);
    a.write_all(&vec![b'a'; 64 * 1024]).unwrap();
    b.write_all(b"b").unwrap();
    h.give_rx(2);
    let got = h.receive();
    let ports: Vec<u32> = got.iter().map(|(hdr, _)| hdr.dst_port).collect();
    assert!(ports.contains(&5000) && ports.contains(&5001), "{ports:?}");
}

#[test]
fn stale_socket_is_replaced_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let config = VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    };
    let dev = Vsock::new(&config).unwrap();
    assert!(matches!(Vsock::new(&config), Err(VsockError::InUse(_))));
    let file = dir.path().join("f");
    std::fs::write(&file, b"keep").unwrap();
    assert!(matches!(
        Vsock::new(&VsockConfig {
            guest_cid: 3,
            uds_path: file.clone()
        }),
        Err(VsockError::NotASocket(_))
    ));
    assert!(file.exists());
    drop(dev);
    assert!(!path.exists(), "socket file removed with the device");
    assert!(matches!(
        Vsock::new(&VsockConfig {
            guest_cid: 2,
            uds_path: path
        }),
        Err(VsockError::Cid(2))
    ));
}

#[test]
fn guest_connections_are_capped() {
    // The mock queue serves fewer buffers than 128 connections need: a cap of 8 here, the same
    // code as MAX_CONNECTIONS in a VM.
    const CAP: usize = 8;
    let mut h = Harness::new();
    h.dev.set_max_connections(CAP);
    // The mock's avail ring overlaps its used ring past half the queue: stay below.
    h.give_rx(24);
    let mut path = h.uds().into_os_string();
    path.push("_1025");
    let listener = UnixListener::bind(&path).unwrap();
    let mut streams = Vec::new();
    for port in 0..CAP as u32 {
        h.send(h.guest_hdr(7000 + port, 1025, op::REQUEST), &[]);
        let got = h.receive();
        assert_eq!(got.len(), 1, "connection {port}: {got:?}");
        assert_eq!(got[0].0.op, op::RESPONSE, "connection {port}");
        streams.push(listener.accept().unwrap().0);
    }
    assert_eq!(h.dev.connection_count(), CAP);
    // One more is reset, and the host side never sees it.
    h.send(h.guest_hdr(9999, 1025, op::REQUEST), &[]);
    let got = h.receive();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), CAP);
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "no host connection for a refused one"
    );
    // A host client is refused too while the guest holds them all.
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let got = h.receive();
    assert!(
        got.iter().all(|(hdr, _)| hdr.op != op::REQUEST),
        "no request to the guest: {got:?}"
    );
    let mut buf = [0u8; 16];
    assert_eq!(client.read(&mut buf).unwrap_or(0), 0, "closed without OK");
    // Closing one makes room again.
    h.send(h.guest_hdr(7000, 1025, op::RST), &[]);
    assert_eq!(h.dev.connection_count(), CAP - 1);
    h.send(h.guest_hdr(9999, 1025, op::REQUEST), &[]);
    let got = h.receive();
    assert_eq!(got.last().map(|p| p.0.op), Some(op::RESPONSE), "{got:?}");
    drop(streams);
}

#[test]
fn guest_connect_to_a_full_backlog_is_refused_not_blocking() {
    let mut h = Harness::new();
    h.give_rx(64);
    let mut path = h.uds().into_os_string();
    path.push("_1025");
    // Never accepts; the backlog fills after a few connections.
    let listener = UnixListener::bind(&path).unwrap();
    // SAFETY: listen(2) on a socket the listener owns, to shrink its backlog to one.
    let r = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) };
    assert_eq!(r, 0);
    let start = std::time::Instant::now();
    let mut resets = 0;
    for port in 0..8 {
        h.send(h.guest_hdr(6000 + port, 1025, op::REQUEST), &[]);
        resets += h
            .receive()
            .iter()
            .filter(|(hdr, _)| hdr.op == op::RST)
            .count();
    }
    assert!(resets > 0, "a full backlog refuses");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn config_space_is_the_guest_cid() {
    let h = Harness::new();
    let mut b = [0u8; 8];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST_CID);
    let mut b = [0xaau8; 4];
    h.dev.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    h.dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn snapshot_with_an_open_connection_is_refused() {
    let mut h = Harness::new();
    h.give_rx(8);
    let host = h.guest_connect(5000, 1025);
    let err = h.dev.save_state().unwrap_err();
    assert!(
        err.to_string()
            .contains("vsock has 1 open connection(s); close them before a snapshot"),
        "{err}"
    );
    // Once the guest resets the connection, the snapshot is allowed.
    h.send(h.guest_hdr(5000, 1025, op::RST), &[]);
    drop(host);
    let state = h.dev.save_state().unwrap();
    assert_eq!(
        state.kind,
        DeviceKind::Vsock {
            guest_cid: GUEST_CID
        }
    );
}

#[test]
fn saved_ring_positions_carry_over_to_a_new_device() {
    let mut h = Harness::new();
    h.give_rx(8);
    let host = h.guest_connect(5000, 1025);
    h.send(h.guest_hdr(5000, 1025, op::RST), &[]);
    drop(host);
    let saved = h.dev.save_state().unwrap();
    assert_eq!(saved.queues.len(), 3);
    assert_eq!(saved.queues[TXQ].next_avail, 2, "REQUEST and RST consumed");
    assert_eq!(saved.queues[RXQ].next_used, 1, "RESPONSE delivered");

    // A new device on a new socket, activated with the saved queues, saves the same state and
    // goes on where the first stopped: the next guest connection works.
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(&VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.path().join("v.sock"),
    })
    .unwrap();
    let queues = saved.queues.iter().map(|q| q.to_queue().unwrap()).collect();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    dev.activate(h.mem.clone(), VIRTIO_F_VERSION_1, queues, irq)
        .unwrap();
    dev.restore_state(&saved.kind).unwrap();
    assert_eq!(dev.save_state().unwrap(), saved);
    assert!(dev
        .restore_state(&DeviceKind::Vsock { guest_cid: 99 })
        .is_err());
    h.dev = dev;
    h.dir = dir;
    let _host = h.guest_connect(5001, 1025);
}

#[test]
fn transport_reset_event_is_written_to_the_event_queue() {
    let mut h = Harness::new();
    assert!(!h.dev.send_transport_reset(), "no event buffer yet");
    let raw = RawDescriptor::from(SplitDescriptor::new(0x70_0000, 8, F_WRITE, 0));
    h.ev.add_desc_chains(&[raw], 0).unwrap();
    h.mem
        .write_slice(&[0xff; 8], GuestAddress(0x70_0000))
        .unwrap();
    assert!(h.dev.send_transport_reset());
    assert_eq!(h.ev.used().idx().load(), 1);
    let elem = h.ev.used().ring().ref_at(0).unwrap().load();
    assert_eq!(elem.len(), 4);
    let mut id = [0u8; 4];
    h.mem.read_slice(&mut id, GuestAddress(0x70_0000)).unwrap();
    assert_eq!(
        u32::from_le_bytes(id),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );

    // Until the guest gives the event buffer back, host connections wait (the guest's reset
    // would cut them); then they go through.
    assert!(h.dev.reset_pending());
    h.give_rx(4);
    let mut early = UnixStream::connect(h.uds()).unwrap();
    early.write_all(b"CONNECT 1024\n").unwrap();
    assert!(
        h.receive().is_empty(),
        "no REQUEST while the reset is pending"
    );
    early
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        early.read(&mut buf).unwrap(),
        0,
        "closed: the client retries"
    );
    h.dev.event_queue_notified();
    assert!(!h.dev.reset_pending());
    let mut host = UnixStream::connect(h.uds()).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let got = h.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::REQUEST);
}

mod generated {
    //! Generated guest packets: any header (operation, type, ports, lengths, credit) with any
    //! payload; the device never panics, never holds more than its connection cap, and every
    //! packet it sends the guest is well-formed.

    use proptest::prelude::*;

    use super::*;

    fn header() -> impl Strategy<Value = (Header, Vec<u8>, bool)> {
        (
            (
                prop_oneof![Just(GUEST_CID), Just(HOST_CID), any::<u64>()],
                prop_oneof![Just(HOST_CID), any::<u64>()],
                prop_oneof![5000u32..5004, any::<u32>()],
                prop_oneof![Just(1025u32), Just(1024u32), any::<u32>()],
            ),
            (
                prop_oneof![Just(TYPE_STREAM), any::<u16>()],
                prop_oneof![0u16..=7, any::<u16>()],
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
            ),
            proptest::collection::vec(any::<u8>(), 0..200),
            any::<bool>(),
        )
            .prop_map(
                |(
                    (src_cid, dst_cid, src_port, dst_port),
                    (type_, op, flags, buf_alloc, fwd_cnt),
                    payload,
                    lie,
                )| {
                    let hdr = Header {
                        src_cid,
                        dst_cid,
                        src_port,
                        dst_port,
                        len: if lie { buf_alloc } else { payload.len() as u32 },
                        type_,
                        op,
                        flags,
                        buf_alloc,
                        fwd_cnt,
                    };
                    (hdr, payload, lie)
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn any_guest_packet_sequence_is_handled(
            packets in proptest::collection::vec(header(), 1..12)
        ) {
            let mut h = Harness::new();
            h.dev.set_max_connections(4);
            // Below half the queue (the mock's rings overlap past it).
            h.give_rx(28);
            let mut path = h.uds().into_os_string();
            path.push("_1025");
            let listener = UnixListener::bind(&path).unwrap();
            listener.set_nonblocking(true).unwrap();
            let mut accepted = Vec::new();
            for (hdr, payload, _) in packets {
                h.send_raw(hdr, &payload);
                while let Ok((s, _)) = listener.accept() {
                    accepted.push(s);
                }
                for (got, data) in h.receive() {
                    prop_assert_eq!(got.len as usize, data.len());
                    prop_assert_eq!(got.src_cid, HOST_CID);
                }
                prop_assert!(h.dev.connection_count() <= 4);
            }
        }

        #[test]
        fn header_bytes_round_trip(bytes in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform12(any::<u8>())) {
            let mut raw = [0u8; HDR_SIZE];
            raw[..32].copy_from_slice(&bytes);
            raw[32..].copy_from_slice(&tail);
            prop_assert_eq!(Header::from_bytes(&raw).to_bytes(), raw);
        }

        #[test]
        fn any_connect_line_parses_or_is_refused(line in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(port) = parse_connect(&line) {
                let text = String::from_utf8_lossy(&line);
                prop_assert!(text.contains(&port.to_string()));
            }
        }
    }
}
