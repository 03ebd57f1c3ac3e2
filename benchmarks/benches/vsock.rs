#![allow(clippy::unwrap_used)]
//! Micro-benchmarks of the VMM's vsock data path: validating a descriptor chain and copying a
//! packet out of (TX) or into (RX) guest memory, as `nutshell-vmm` does for every packet.
//! The chains are built in real guest memory (`vm-memory`) with virtio-queue's mock queue.
//!
//! `cargo bench -p nutshell-bench --bench vsock`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nutshell_vmm::devices::virtio::vsock::packet::{Header, Segments, HDR_SIZE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DATA: u64 = 0x10_0000;
const F_WRITE: u16 = 2;

/// A header descriptor and the payload split into `pieces` descriptors.
fn descriptors(payload: usize, pieces: usize, flags: u16) -> Vec<RawDescriptor> {
    let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(
        DATA,
        HDR_SIZE as u32,
        flags,
        0,
    ))];
    let piece = payload / pieces;
    for i in 0..pieces {
        let addr = DATA + 0x1000 + (i * piece) as u64;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            addr,
            piece as u32,
            flags,
            0,
        )));
    }
    descs
}

fn vsock_copy(c: &mut Criterion) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut group = c.benchmark_group("vsock");
    for (payload, pieces) in [(4096usize, 1usize), (65536, 1), (65536, 16)] {
        group.throughput(Throughput::Bytes(payload as u64));

        // TX: the guest sent a packet; validate the chain and copy the payload out.
        let queue = MockSplitQueue::create(&mem, GuestAddress(0), 256);
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            len: payload as u32,
            type_: 1,
            op: 5,
            ..Header::default()
        };
        mem.write_slice(&hdr.to_bytes(), GuestAddress(DATA))
            .unwrap();
        let chain = queue
            .build_desc_chain(&descriptors(payload, pieces, 0))
            .unwrap();
        let mut buf = Vec::with_capacity(payload);
        group.bench_function(format!("tx {payload} B in {pieces} descriptors"), |b| {
            b.iter(|| {
                let segs = Segments::collect(chain.clone(), &mem, false).unwrap();
                let hdr = segs.read_packet(&mem, &mut buf).unwrap();
                black_box((hdr, buf.len()))
            })
        });

        // RX: the host has data for the guest; validate a writable chain and copy into it.
        let queue = MockSplitQueue::create(&mem, GuestAddress(0x8000), 256);
        let chain = queue
            .build_desc_chain(&descriptors(payload, pieces, F_WRITE))
            .unwrap();
        let data = vec![0xa5u8; payload];
        let hdr_bytes = hdr.to_bytes();
        group.bench_function(format!("rx {payload} B in {pieces} descriptors"), |b| {
            b.iter(|| {
                let segs = Segments::collect(chain.clone(), &mem, true).unwrap();
                segs.write_at(&mem, 0, &hdr_bytes).unwrap();
                segs.write_at(&mem, HDR_SIZE, &data).unwrap();
                black_box(segs.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, vsock_copy);
criterion_main!(benches);
