//! The snapshot format: a directory holding `state` (a versioned, checksummed header and the
//! serialised device and vCPU state) and `memory` (guest RAM, region after region).
//!
//! `state` is `MAGIC | format version (u32 LE) | header length (u32 LE) | header (bincode) |
//! state (bincode) | CRC-32 of everything before it (u32 LE)`. The header carries what must
//! match before anything is restored; the memory file's CRC-32 is in the header too.

mod vm;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use crate::devices::virtio::state::MmioSnapshot;
use crate::vcpu_state::VcpuState;

/// First bytes of every `state` file.
pub const MAGIC: [u8; 8] = *b"NUTSNAP\0";
/// Version of the layout of `state`; bumped on any change of the serialised types.
pub const FORMAT_VERSION: u32 = 4;
/// The VMM that wrote the snapshot; another one refuses it.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// File of the state, in the snapshot directory.
pub const STATE_FILE: &str = "state";
/// File of guest memory, in the snapshot directory.
pub const MEMORY_FILE: &str = "memory";

const PREFIX_LEN: usize = MAGIC.len() + 4 + 4;
const CRC_LEN: usize = 4;

/// Errors of writing and reading snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot could not be written or read.
    #[error("snapshot file {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state is too short to hold even the header.
    #[error("snapshot state is truncated ({len} bytes)")]
    Truncated {
        /// Bytes found.
        len: usize,
    },
    /// The state does not start with the magic: not a Nutshell snapshot.
    #[error("not a Nutshell snapshot (bad magic)")]
    BadMagic,
    /// The state's CRC-32 does not match: corrupted or truncated.
    #[error("snapshot state is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    StateChecksum {
        /// Computed.
        found: u32,
        /// Stored.
        expected: u32,
    },
    /// The memory file's CRC-32 does not match the header's.
    #[error("snapshot memory is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    MemoryChecksum {
        /// Computed.
        found: u32,
        /// Stored.
        expected: u32,
    },
    /// The memory file's size does not match the header's.
    #[error("snapshot memory file holds {found} bytes, the header says {expected}")]
    MemorySize {
        /// Found.
        found: u64,
        /// Expected.
        expected: u64,
    },
    /// Another layout version.
    #[error("snapshot format version {found} is not supported (this VMM reads version {FORMAT_VERSION})")]
    FormatVersion {
        /// Found.
        found: u32,
    },
    /// Written by another VMM version.
    #[error("snapshot was written by nutshell-vmm {found}, this is {VMM_VERSION}")]
    VmmVersion {
        /// Found.
        found: String,
    },
    /// The CPUID this host would give the VM differs from the snapshot's.
    #[error("snapshot CPUID hash {found:#010x} differs from this host's {expected:#010x} (another CPU or CPU profile)")]
    Cpuid {
        /// In the snapshot.
        found: u32,
        /// Here.
        expected: u32,
    },
    /// The VM shape (vCPUs, memory) differs from what the caller asked for.
    #[error("snapshot has {what} {found}, {expected} asked")]
    Shape {
        /// vCPUs or memory.
        what: &'static str,
        /// In the snapshot.
        found: u64,
        /// Asked.
        expected: u64,
    },
    /// The snapshot was made for another template key (kernel, initrd, shape, VMM version or
    /// CPU features).
    #[error("snapshot was made for template key {found}, {expected} is needed (another kernel, initramfs, VM shape, VMM version or CPU feature set)")]
    TemplateKey {
        /// In the snapshot (`none` when it has none).
        found: String,
        /// Asked.
        expected: String,
    },
    /// The header or state could not be (de)serialised.
    #[error("snapshot state cannot be (de)serialised")]
    Serde(#[source] bincode::Error),
    /// The state is inconsistent with its header.
    #[error("snapshot state is inconsistent: {0}")]
    Inconsistent(String),
}

/// What must match before a snapshot is restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// `CARGO_PKG_VERSION` of the VMM that wrote it.
    pub vmm_version: String,
    /// CRC-32 of the CPUID tables of all vCPUs.
    pub cpuid_hash: u32,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What was loaded into the VM (kernel and initrd, or a test program), if known.
    pub payload: Option<String>,
    /// CRC-32 of the memory file.
    pub memory_crc: u32,
    /// The template cache key this snapshot was made for, if it is a template.
    pub template_key: Option<String>,
}

/// The 8250 UART's registers (vm-superio's `SerialState`, which is not serialisable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high.
    pub baud_divisor: [u8; 2],
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<&vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor[0],
            baud_divisor_high: s.baud_divisor[1],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The VM-wide KVM state and the devices'.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP` chip ids 0, 1, 2).
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The virtio-mmio devices, in slot order.
    pub virtio: Vec<MmioSnapshot>,
}

/// Encodes header and state into the bytes of a `state` file.
pub fn encode(header: &SnapshotHeader, state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    let header = bincode::serialize(header).map_err(SnapshotError::Serde)?;
    let header_len = u32::try_from(header.len())
        .map_err(|_| SnapshotError::Inconsistent("header too large".into()))?;
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + 64 * 1024);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&header);
    bincode::serialize_into(&mut out, state).map_err(SnapshotError::Serde)?;
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Checks magic, checksum and format version, then decodes the header. The state itself is
/// decoded by [`decode_state`] only once the header was accepted.
pub fn decode_header(bytes: &[u8]) -> Result<(SnapshotHeader, &[u8]), SnapshotError> {
    if bytes.len() < PREFIX_LEN + CRC_LEN {
        return Err(SnapshotError::Truncated { len: bytes.len() });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let body = &bytes[..bytes.len() - CRC_LEN];
    let expected = u32_at(bytes, bytes.len() - CRC_LEN);
    let found = crc32fast::hash(body);
    if found != expected {
        return Err(SnapshotError::StateChecksum { found, expected });
    }
    let version = u32_at(bytes, MAGIC.len());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::FormatVersion { found: version });
    }
    let header_len = u32_at(bytes, MAGIC.len() + 4) as usize;
    let header_bytes = body
        .get(PREFIX_LEN..PREFIX_LEN + header_len)
        .ok_or(SnapshotError::Truncated { len: bytes.len() })?;
    let header: SnapshotHeader =
        bincode::deserialize(header_bytes).map_err(SnapshotError::Serde)?;
    if header.vmm_version != VMM_VERSION {
        return Err(SnapshotError::VmmVersion {
            found: header.vmm_version,
        });
    }
    Ok((header, &body[PREFIX_LEN + header_len..]))
}

/// Decodes the state following an accepted header, and checks it against the header.
pub fn decode_state(header: &SnapshotHeader, rest: &[u8]) -> Result<VmState, SnapshotError> {
    let state: VmState = bincode::deserialize(rest).map_err(SnapshotError::Serde)?;
    if state.vcpus.len() != usize::from(header.vcpus) {
        return Err(SnapshotError::Inconsistent(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            header.vcpus
        )));
    }
    if state.irqchips.len() != 3 {
        return Err(SnapshotError::Inconsistent(format!(
            "{} irqchip states, 3 expected",
            state.irqchips.len()
        )));
    }
    Ok(state)
}

/// Reads a whole file of the snapshot.
pub fn read_file(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io)?;
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a reader never sees
/// a half-written file.
pub fn write_file_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    for part in parts {
        f.write_all(part).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// CRC-32 of a file, read in 1 MiB chunks; also returns its size.
pub fn file_crc(path: &Path) -> Result<(u32, u64), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher.finalize(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (SnapshotHeader, VmState) {
        let header = SnapshotHeader {
            vmm_version: VMM_VERSION.into(),
            cpuid_hash: 0x1234_5678,
            memory_size: 16 << 20,
            vcpus: 0,
            payload: Some("test".into()),
            memory_crc: 7,
            template_key: Some("k".into()),
        };
        let mut pit = kvm_pit_state2::default();
        pit.channels[0].count = 0x1234;
        let clock = kvm_clock_data {
            clock: 42,
            ..Default::default()
        };
        let state = VmState {
            irqchips: vec![kvm_irqchip::default(); 3],
            pit,
            clock,
            serial: SerialSnapshot::from(&vm_superio::serial::SerialState::default()),
            vcpus: Vec::new(),
            virtio: vec![sample_virtio()],
        };
        (header, state)
    }

    fn sample_virtio() -> MmioSnapshot {
        use crate::devices::virtio::state::{DeviceKind, DeviceState, QueueSnapshot};
        let q = QueueSnapshot {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 7,
            next_used: 5,
            event_idx: false,
        };
        MmioSnapshot {
            device_type: 19,
            status: 15,
            acked_features: 1 << 32,
            device_features_sel: 1,
            driver_features_sel: 1,
            queue_sel: 2,
            queues: vec![q; 3],
            bad_size: vec![false; 3],
            interrupt_status: 1,
            config_generation: 0,
            activated: true,
            device: DeviceState {
                queues: vec![q; 3],
                kind: DeviceKind::Vsock { guest_cid: 42 },
            },
        }
    }

    #[test]
    fn state_round_trips() {
        let (header, state) = sample();
        let bytes = encode(&header, &state).unwrap();
        let (h, rest) = decode_header(&bytes).unwrap();
        assert_eq!(h, header);
        let s = decode_state(&h, rest).unwrap();
        assert_eq!(s.pit.channels[0].count, 0x1234);
        assert_eq!(s.clock.clock, 42);
        assert_eq!(s.serial, state.serial);
        assert_eq!(s.virtio, state.virtio);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let (header, state) = sample();
        let bytes = encode(&header, &state).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode_header(&bad).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn truncated_state_is_refused() {
        let (header, state) = sample();
        let bytes = encode(&header, &state).unwrap();
        for len in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            let err = decode_header(&bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::Truncated { .. } | SnapshotError::StateChecksum { .. }
                ),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn other_format_and_vmm_versions_are_refused() {
        let (mut header, state) = sample();
        let mut bytes = encode(&header, &state).unwrap();
        let n = bytes.len();
        bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let err = decode_header(&bytes).unwrap_err();
        assert!(
            matches!(err, SnapshotError::FormatVersion { found: 99 }),
            "{err}"
        );

        header.vmm_version = "0.0.0-other".into();
        let err = decode_header(&encode(&header, &state).unwrap()).unwrap_err();
        assert!(matches!(err, SnapshotError::VmmVersion { .. }), "{err}");
        assert!(err.to_string().contains("0.0.0-other"), "{err}");
    }

    mod generated {
        //! Generated snapshot files: a good one with bytes changed (and its checksum made to
        //! match again, so that decoding goes past it) or cut short: decoding fails or succeeds,
        //! never panics.

        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn changed_or_cut_state_files_decode_or_fail(
                changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
                cut in proptest::option::of(any::<prop::sample::Index>()),
                fix_crc in any::<bool>(),
            ) {
                let (header, state) = sample();
                let mut bytes = encode(&header, &state).unwrap();
                let body = bytes.len() - CRC_LEN;
                for (at, value) in changes {
                    // Leave the magic alone: past it is what a hostile file can change.
                    let at = MAGIC.len() + at.index(body - MAGIC.len());
                    bytes[at] = value;
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut.index(bytes.len()));
                }
                if fix_crc && bytes.len() >= PREFIX_LEN + CRC_LEN {
                    let body = bytes.len() - CRC_LEN;
                    let crc = crc32fast::hash(&bytes[..body]);
                    bytes[body..].copy_from_slice(&crc.to_le_bytes());
                }
                if let Ok((header, rest)) = decode_header(&bytes) {
                    let _ = decode_state(&header, rest);
                }
            }

            #[test]
            fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                prop_assert!(decode_header(&bytes).is_err() || bytes.starts_with(&MAGIC));
            }
        }
    }
}
