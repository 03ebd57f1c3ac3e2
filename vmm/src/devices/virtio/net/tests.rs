#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MEM_SIZE: u64 = 0x100_0000;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

struct Harness {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Net,
    rx_desc: u16,
    tx_desc: u16,
    rx_seen: u16,
    tx_seen: u16,
    tx_data: u64,
}

fn rx_addr(index: u16) -> u64 {
    0x80_0000 + u64::from(index) * 0x1_0000
}

impl Harness {
    fn new(tap: Option<Tap>, acked: u64) -> Harness {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        ));
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 256);
        let mut dev = Net::new(NetConfig { mac: MAC, tap }).unwrap();
        let queues = vec![
            rx.create_queue::<Queue>().unwrap(),
            tx.create_queue::<Queue>().unwrap(),
        ];
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.activate(mem.clone(), acked, queues, irq).unwrap();
        Harness {
            mem,
            rx,
            tx,
            dev,
            rx_desc: 0,
            tx_desc: 0,
            rx_seen: 0,
            tx_seen: 0,
            tx_data: 0x20_0000,
        }
    }

    fn mergeable(tap: Option<Tap>) -> Harness {
        Harness::new(
            tap,
            VIRTIO_F_VERSION_1 | features::MRG_RXBUF | features::MAC | features::GUEST_CSUM,
        )
    }

    /// Offers `n` receive buffers of `size` bytes, one descriptor each.
    fn give_rx(&mut self, n: u16, size: u32) {
        for _ in 0..n {
            let raw = RawDescriptor::from(SplitDescriptor::new(
                rx_addr(self.rx_desc),
                size,
                F_WRITE,
                0,
            ));
            self.rx.add_desc_chains(&[raw], self.rx_desc).unwrap();
            self.rx_desc += 1;
        }
    }

    /// Puts raw descriptors (addr, len, flags) on the transmit queue as one chain.
    fn push_tx(&mut self, descs: &[(u64, u32, u16)]) {
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
        self.tx_desc += descs.len() as u16;
    }

    /// Sends `frame` (an Ethernet frame) behind a zeroed header, in two descriptors.
    fn send(&mut self, frame: &[u8]) {
        let at = self.tx_data;
        self.mem
            .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(at + VNET_HDR_LEN as u64))
            .unwrap();
        self.tx_data += 0x1_0000;
        self.push_tx(&[
            (at, VNET_HDR_LEN as u32, 0),
            (at + VNET_HDR_LEN as u64, frame.len() as u32, 0),
        ]);
    }

    /// The used transmit entries since the last call: (head, len).
    fn tx_used(&mut self) -> Vec<(u32, u32)> {
        let used = self.tx.used().idx().load();
        let mut out = Vec::new();
        while self.tx_seen != used {
            let e = self
                .tx
                .used()
                .ring()
                .ref_at(usize::from(self.tx_seen % 256))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.tx_seen = self.tx_seen.wrapping_add(1);
        }
        out
    }

    /// The used receive entries since the last call: (buffer index, bytes).
    fn rx_used(&mut self) -> Vec<(u16, u32)> {
        let used = self.rx.used().idx().load();
        let mut out = Vec::new();
        while self.rx_seen != used {
            let e = self
                .rx
                .used()
                .ring()
                .ref_at(usize::from(self.rx_seen % 256))
                .unwrap()
                .load();
            out.push((e.id() as u16, e.len()));
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        out
    }

    /// Puts a frame (header and `len` bytes of payload, byte i = i) where the tap's read
    /// would have, and runs receive.
    fn receive_frame(&mut self, payload_len: usize) -> usize {
        let total = VNET_HDR_LEN + payload_len;
        self.dev.frame[..VNET_HDR_LEN].fill(0);
        for (i, b) in self.dev.frame[VNET_HDR_LEN..total].iter_mut().enumerate() {
            *b = i as u8;
        }
        self.dev.pending_len = Some(total);
        self.dev.process_rx()
    }

    /// Reads `len` bytes of the buffers `used` in order: the frame the guest got.
    fn gather(&self, used: &[(u16, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(index, len) in used {
            let mut part = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut part, GuestAddress(rx_addr(index)))
                .unwrap();
            out.extend_from_slice(&part);
        }
        out
    }
}

#[test]
fn config_space_has_the_mac_link_up_and_one_queue_pair() {
    let dev = Net::new(NetConfig {
        mac: MAC,
        tap: None,
    })
    .unwrap();
    let mut config = [0u8; 10];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), LINK_UP);
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1);
    // Odd offsets and lengths, and bytes past the end, as the guest may ask.
    let mut b = [0xffu8; 3];
    dev.read_config(5, &mut b);
    assert_eq!(b, [0x42, 1, 0]);
    let mut past = [0xffu8; 4];
    dev.read_config(9, &mut past);
    assert_eq!(past, [0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn offloads_follow_what_the_guest_acked() {
    assert_eq!(Net::tap_offloads(0), 0);
    // TSO without checksum offload cannot be used.
    assert_eq!(Net::tap_offloads(features::GUEST_TSO4), 0);
    assert_eq!(
        Net::tap_offloads(features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    assert_eq!(
        Net::tap_offloads(features::GUEST_CSUM | features::GUEST_ECN),
        libc::TUN_F_CSUM
    );
    let offered = Net::new(NetConfig {
        mac: MAC,
        tap: None,
    })
    .unwrap()
    .avail_features();
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
    assert_ne!(offered & features::MRG_RXBUF, 0);
    assert_ne!(offered & features::HOST_TSO4, 0);
}

#[test]
fn a_large_frame_spans_mergeable_buffers_and_says_how_many() {
    let mut h = Harness::mergeable(None);
    h.give_rx(4, 1024);
    assert_eq!(h.receive_frame(3000), 1);
    let used = h.rx_used();
    assert_eq!(used, vec![(0, 1024), (1, 1024), (2, 964)]);
    let got = h.gather(&used);
    assert_eq!(got.len(), VNET_HDR_LEN + 3000);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert!(got[VNET_HDR_LEN..]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == i as u8));
    assert_eq!(h.dev.counters().rx_frames, 1);
    assert_eq!(h.dev.counters().rx_bytes, 3000);
}

#[test]
fn without_mergeable_buffers_a_frame_needs_one_buffer() {
    let mut h = Harness::new(None, VIRTIO_F_VERSION_1);
    h.give_rx(2, 1024);
    assert_eq!(h.receive_frame(100), 1);
    let used = h.rx_used();
    assert_eq!(used, vec![(0, 112)]);
    let got = h.gather(&used);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    // Too large for a buffer: dropped, the buffer returned empty, the device goes on.
    assert_eq!(h.receive_frame(2000), 0);
    assert_eq!(h.rx_used(), vec![(1, 0)]);
    assert_eq!(h.dev.counters().rx_dropped, 1);
    assert!(h.dev.pending_len.is_none());
}

#[test]
fn a_guest_without_buffers_makes_the_frame_wait_and_nothing_grow() {
    let mut h = Harness::mergeable(None);
    // Two buffers for a frame that needs three: none is used, the frame waits.
    h.give_rx(2, 1024);
    assert_eq!(h.receive_frame(3000), 0);
    assert!(h.rx_used().is_empty(), "no buffer consumed");
    assert_eq!(h.dev.pending_len, Some(VNET_HDR_LEN + 3000));
    // Receive again without new buffers: returns at once, still waiting.
    assert_eq!(h.dev.process_rx(), 0);
    assert_eq!(h.dev.frame.len(), MAX_FRAME, "the frame buffer never grows");
    // The guest gives more: the waiting frame goes first.
    h.give_rx(2, 1024);
    assert_eq!(h.dev.process_rx(), 1);
    let used = h.rx_used();
    assert_eq!(used.len(), 3);
    assert!(h.dev.pending_len.is_none());
}

#[test]
fn malformed_receive_buffers_are_returned_empty_and_skipped() {
    let mut h = Harness::mergeable(None);
    // A read-only buffer, then one outside guest memory, then a good one.
    for (addr, flags) in [
        (rx_addr(0), 0),
        (MEM_SIZE - 16, F_WRITE),
        (rx_addr(2), F_WRITE),
    ] {
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, 1024, flags, 0));
        h.rx.add_desc_chains(&[raw], h.rx_desc).unwrap();
        h.rx_desc += 1;
    }
    assert_eq!(h.receive_frame(100), 1);
    assert_eq!(h.rx_used(), vec![(0, 0), (1, 0), (2, 112)]);
    let got = h.gather(&[(2, 112)]);
    assert_eq!(
        u16::from_le_bytes([got[10], got[11]]),
        1,
        "empty ones not counted"
    );
}

#[test]
fn malformed_transmit_chains_are_returned_unused_and_the_device_goes_on() {
    let mut h = Harness::mergeable(None);
    let at = 0x30_0000;
    // A device-writable descriptor.
    h.push_tx(&[(at, 64, F_WRITE)]);
    // Shorter than the header.
    h.push_tx(&[(at, 4, 0)]);
    // Longer than any frame.
    h.push_tx(&[(at, MAX_FRAME as u32 + 1, 0)]);
    // Outside guest memory.
    h.push_tx(&[(MEM_SIZE - 8, 64, 0)]);
    // A wrapping address.
    h.push_tx(&[(u64::MAX - 8, 64, 0)]);
    // Then a well-formed frame (dropped too: no tap), which must still be served.
    h.send(&[0xff; 60]);
    assert!(h.dev.process_tx());
    let used = h.tx_used();
    assert_eq!(used.len(), 6, "every chain returned: {used:?}");
    assert!(used.iter().all(|(_, len)| *len == 0));
    assert_eq!(h.dev.counters().tx_dropped, 6);
    assert_eq!(h.dev.counters().tx_frames, 0);
}

#[test]
fn without_a_tap_nothing_arrives_and_the_state_saves_the_mac() {
    let mut h = Harness::mergeable(None);
    h.give_rx(4, 2048);
    assert!(h.dev.host_events().is_empty());
    assert_eq!(h.dev.process_rx(), 0);
    let state = h.dev.save_state().unwrap();
    assert_eq!(state.kind, DeviceKind::Net { mac: MAC });
    assert_eq!(state.queues.len(), 2);
    assert!(h.dev.restore_state(&DeviceKind::Net { mac: MAC }).is_ok());
    assert!(h
        .dev
        .restore_state(&DeviceKind::Net {
            mac: [2, 0, 0, 0, 0, 1]
        })
        .is_err());
    assert!(h
        .dev
        .restore_state(&DeviceKind::Fs { tag: "x".into() })
        .is_err());
}

/// Runs `f` in a thread of its own network namespace (gone with the thread): the host's
/// network is never touched.
fn in_new_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) of this thread's network namespace; no memory is passed.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare(CLONE_NEWNET) needs root");
        f();
    })
    .join()
    .unwrap();
}

/// Sets `addr/24` on `dev` and brings it up, with the classic ioctls.
fn configure(dev: &str, addr: [u8; 4]) {
    // SAFETY: a plain socket and ioctls on a zero-initialised `ifreq` of full size.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(s >= 0);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in dev.bytes().enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        let sin = &mut *(&mut req.ifr_ifru as *mut _ as *mut libc::sockaddr_in);
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(addr);
        assert_eq!(libc::ioctl(s, libc::SIOCSIFADDR, &req), 0, "SIOCSIFADDR");
        let mask = &mut *(&mut req.ifr_ifru as *mut _ as *mut libc::sockaddr_in);
        mask.sin_addr.s_addr = u32::from_ne_bytes([255, 255, 255, 0]);
        assert_eq!(
            libc::ioctl(s, libc::SIOCSIFNETMASK, &req),
            0,
            "SIOCSIFNETMASK"
        );
        assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &req), 0, "SIOCSIFFLAGS");
        libc::close(s);
    }
}

/// An ARP request from `mac`/`sender` for `target`, as an Ethernet broadcast.
fn arp_request(mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

#[test]
fn a_real_tap_carries_the_guests_arp_request_and_delivers_the_kernels_reply() {
    in_new_netns(|| {
        let tap = Tap::create("nstest0").unwrap();
        assert_eq!(tap.name(), "nstest0");
        configure("nstest0", [10, 9, 8, 1]);
        let mut h = Harness::mergeable(Some(tap));
        assert_eq!(h.dev.host_events().len(), 1);
        assert!(h.dev.host_events()[0].edge);
        h.give_rx(16, 2048);
        let guest_mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        h.send(&arp_request(guest_mac, [10, 9, 8, 2], [10, 9, 8, 1]));
        assert!(h.dev.process_tx());
        assert_eq!(h.tx_used().len(), 1);
        assert_eq!(h.dev.counters().tx_frames, 1);
        // The kernel answers through the tap (and may send IPv6 noise of its own): find the
        // ARP reply addressed to the guest.
        let deadline = Instant::now() + Duration::from_secs(5);
        let reply = loop {
            h.dev.process_rx();
            let used = h.rx_used();
            let found = used.iter().find_map(|u| {
                let f = h.gather(&[*u]);
                let eth = &f[VNET_HDR_LEN..];
                (eth.len() >= 42 && eth[..6] == guest_mac && eth[12..14] == [0x08, 0x06])
                    .then(|| eth.to_vec())
            });
            if let Some(f) = found {
                break f;
            }
            assert!(Instant::now() < deadline, "no ARP reply through the tap");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[28..32], &[10, 9, 8, 1], "from the tap's address");
        assert!(h.dev.counters().rx_frames >= 1);
    });
}

#[test]
fn a_descriptor_that_is_not_a_tap_is_refused() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = Tap::from_fd(a.into()).unwrap_err();
    assert!(matches!(err, tap::TapError::NotTun(..)), "{err}");
}

mod generated {
    //! Generated descriptor chains and frames: the device returns every transmit chain, fills
    //! receive buffers only within their bounds, and never panics.

    use proptest::prelude::*;

    use super::*;

    fn descriptor() -> impl Strategy<Value = (u64, u32, u16)> {
        (
            prop_oneof![
                0x30_0000u64..0x40_0000,
                Just(MEM_SIZE - 8),
                Just(u64::MAX - 8),
                any::<u64>(),
            ],
            prop_oneof![
                0u32..128,
                Just(VNET_HDR_LEN as u32),
                0u32..70_000,
                any::<u32>()
            ],
            prop_oneof![Just(0u16), Just(F_WRITE)],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn any_transmit_chains_are_returned(
            chains in proptest::collection::vec(proptest::collection::vec(descriptor(), 1..6), 1..16),
            headers in proptest::collection::vec(any::<u8>(), VNET_HDR_LEN..VNET_HDR_LEN + 1),
        ) {
            let mut h = Harness::mergeable(None);
            h.mem.write_slice(&headers, GuestAddress(0x30_0000)).unwrap();
            let n = chains.len();
            for chain in &chains {
                h.push_tx(chain);
            }
            h.dev.process_tx();
            let used = h.tx_used();
            prop_assert_eq!(used.len(), n, "every chain returned");
        }

        #[test]
        fn any_receive_buffers_are_filled_within_bounds(
            buffers in proptest::collection::vec(descriptor(), 1..16),
            frame_len in 0usize..70_000,
            mergeable in any::<bool>(),
        ) {
            let mut h = if mergeable {
                Harness::mergeable(None)
            } else {
                Harness::new(None, VIRTIO_F_VERSION_1 | features::MAC)
            };
            for b in &buffers {
                let raw = RawDescriptor::from(SplitDescriptor::new(b.0, b.1, b.2, 0));
                h.rx.add_desc_chains(&[raw], h.rx_desc).unwrap();
                h.rx_desc += 1;
            }
            let frame_len = frame_len.min(h.dev.frame.len() - VNET_HDR_LEN);
            h.receive_frame(frame_len);
            for (index, len) in h.rx_used() {
                let (_, size, _) = buffers[usize::from(index)];
                prop_assert!(len <= size, "buffer {index}: {len} > {size}");
            }
        }
    }
}
