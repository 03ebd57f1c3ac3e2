//! The virtio-vsock packet header and bounded, validated access to descriptor chains.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Size of the packet header on the wire.
pub const HDR_SIZE: usize = 44;
/// Largest payload the device accepts or sends in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// The only socket type supported: stream.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    #![allow(missing_docs)]
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A vsock packet header (little endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn le_u32(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u16(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Parses the wire format.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// The wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor had the wrong direction (a device-writable one in a TX chain, or a
    /// read-only one in an RX chain).
    #[error("descriptor with the wrong direction")]
    Direction,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len} outside guest memory")]
    OutOfMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain is too short for a header.
    #[error("chain of {0} bytes cannot hold a packet header")]
    TooShort(usize),
    /// The header's length disagrees with the chain, or exceeds the payload limit.
    #[error("packet length {len} does not match the {available} bytes after the header")]
    BadLength {
        /// The header's `len`.
        len: u32,
        /// Bytes in the chain after the header.
        available: usize,
    },
    /// Guest memory access failed despite the checks.
    #[error("guest memory access failed")]
    Memory,
}

/// The validated segments of one descriptor chain, all of one direction.
#[derive(Debug, Default)]
pub struct Segments {
    segs: Vec<(GuestAddress, usize)>,
    total: usize,
}

impl Segments {
    /// Collects the chain's descriptors; each must have the direction asked for and lie inside
    /// guest memory. The total is capped at header + [`MAX_PKT_PAYLOAD`]: bytes beyond are
    /// ignored (RX) or refused by the length check (TX).
    pub fn collect<M>(
        chain: DescriptorChain<M>,
        mem: &M::Target,
        device_writable: bool,
    ) -> Result<Segments, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut out = Segments::default();
        let cap = HDR_SIZE + MAX_PKT_PAYLOAD;
        // The chain iterator stops after queue-size descriptors, so loops end.
        for desc in chain {
            if desc.is_write_only() != device_writable {
                return Err(ChainError::Direction);
            }
            let len = desc.len() as usize;
            if !mem.check_range(desc.addr(), len) {
                return Err(ChainError::OutOfMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            let take = len.min(cap - out.total);
            if take > 0 {
                out.segs.push((desc.addr(), take));
                out.total += take;
            }
        }
        Ok(out)
    }

    /// Bytes the chain holds (capped).
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the chain holds nothing.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Walks the chain's memory for bytes `offset..offset + len`, calling `f` with each
    /// contiguous guest range and the matching range of a caller's buffer.
    fn for_each_span(
        &self,
        mut offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, seg_len) in &self.segs {
            if done == len {
                break;
            }
            if offset >= *seg_len {
                offset -= seg_len;
                continue;
            }
            let n = (seg_len - offset).min(len - done);
            let at = addr.checked_add(offset as u64).ok_or(ChainError::Memory)?;
            f(at, done..done + n)?;
            done += n;
            offset = 0;
        }
        if done == len {
            Ok(())
        } else {
            Err(ChainError::TooShort(self.total))
        }
    }

    /// Copies `buf.len()` bytes starting at byte `offset` of the chain into `buf`.
    pub fn read_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        self.for_each_span(offset, buf.len(), |at, range| {
            mem.read_slice(&mut buf[range], at)
                .map_err(|_| ChainError::Memory)
        })
    }

    /// Copies `buf` into the chain starting at byte `offset`.
    pub fn write_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        self.for_each_span(offset, buf.len(), |at, range| {
            mem.write_slice(&buf[range], at)
                .map_err(|_| ChainError::Memory)
        })
    }

    /// Reads and checks a TX packet: header, then exactly `len` payload bytes.
    pub fn read_packet<M: GuestMemory>(
        &self,
        mem: &M,
        payload: &mut Vec<u8>,
    ) -> Result<Header, ChainError> {
        if self.total < HDR_SIZE {
            return Err(ChainError::TooShort(self.total));
        }
        let mut raw = [0u8; HDR_SIZE];
        self.read_at(mem, 0, &mut raw)?;
        let hdr = Header::from_bytes(&raw);
        let available = self.total - HDR_SIZE;
        let len = hdr.len as usize;
        if len > MAX_PKT_PAYLOAD || len > available {
            return Err(ChainError::BadLength {
                len: hdr.len,
                available,
            });
        }
        payload.clear();
        payload.resize(len, 0);
        self.read_at(mem, HDR_SIZE, payload)?;
        Ok(hdr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 1025,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
