//! Saving a paused VM to a snapshot directory, and restoring a VM from one.

use std::path::Path;

use kvm_bindings::kvm_irqchip;

use super::{SnapshotError, SnapshotHeader, VmState};
use crate::arch::x86_64::mptable;
use crate::devices::virtio::manager::{self, DeviceError};
use crate::host;
use crate::memory;
use crate::vcpu_state::VcpuState;
use crate::vm::{
    kvm_err, Parts, RestoreConfig, RunningVm, Vm, VmError, VmRunState, MAX_MEMORY_MIB,
    MIN_MEMORY_MIB, PAUSE_TIMEOUT,
};

impl Vm {
    /// Restores a VM from the snapshot directory `dir`, not yet running. Everything that must
    /// match (magic, checksums, format and VMM versions, shape, CPUID) is checked before any
    /// state is set; a refused snapshot leaves nothing behind.
    pub fn restore(dir: &Path, config: RestoreConfig) -> Result<Vm, VmError> {
        let bytes = super::read_file(&dir.join(super::STATE_FILE))?;
        let (header, rest) = super::decode_header(&bytes)?;
        check_shape(&header, &config)?;
        if let Some(expected) = &config.expect_template_key {
            if header.template_key.as_ref() != Some(expected) {
                return Err(SnapshotError::TemplateKey {
                    found: header.template_key.clone().unwrap_or_else(|| "none".into()),
                    expected: expected.clone(),
                }
                .into());
            }
        }
        let memory_path = dir.join(super::MEMORY_FILE);
        let (memory_crc, memory_len) = super::file_crc(&memory_path)?;
        if memory_len != header.memory_size {
            return Err(SnapshotError::MemorySize {
                found: memory_len,
                expected: header.memory_size,
            }
            .into());
        }
        if memory_crc != header.memory_crc {
            return Err(SnapshotError::MemoryChecksum {
                found: memory_crc,
                expected: header.memory_crc,
            }
            .into());
        }
        let state = super::decode_state(&header, rest)?;
        let memory_mib = header.memory_size >> 20;
        if header.vcpus == 0
            || header.vcpus > mptable::MAX_CPUS
            || !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib)
            || memory_mib << 20 != header.memory_size
        {
            return Err(SnapshotError::Inconsistent(format!(
                "{} vCPUs, {} bytes of memory",
                header.vcpus, header.memory_size
            ))
            .into());
        }

        let devices = manager::restored_configs(&state.virtio, config.backends)?;
        let kvm = host::open_kvm()?;
        let profile = config.cpu_profile.resolve();
        let mut vm = Vm::build(
            &kvm,
            Parts {
                vcpus: header.vcpus,
                ram_size: header.memory_size,
                mem: memory::create_from_file(header.memory_size, &memory_path)?,
                console: config.console.open()?,
                serial_state: Some((&state.serial).into()),
                profile,
                started_at: config.started_at,
                devices,
            },
        )?;
        if vm.cpuid_hash != header.cpuid_hash {
            return Err(SnapshotError::Cpuid {
                found: header.cpuid_hash,
                expected: vm.cpuid_hash,
            }
            .into());
        }
        vm.devices.restore(&state.virtio)?;
        vm.set_vm_state(&state)?;
        for (vcpu, saved) in vm.vcpus.iter().zip(&state.vcpus) {
            saved.restore(vcpu.fd())?;
        }
        vm.payload = header.payload;
        vm.template_key = header.template_key;
        vm.restored = true;
        Ok(vm)
    }

    fn set_vm_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in &state.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("restore the irqchip"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("restore the PIT"))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(kvm_err("restore the clock"))?;
        Ok(())
    }
}

impl RunningVm {
    /// Writes the complete state of the paused VM to the directory `dir` (created if needed):
    /// `memory` first, then `state`, which makes the snapshot valid.
    pub fn snapshot(&self, dir: &Path) -> Result<(), VmError> {
        if self.state != VmRunState::Paused {
            return Err(VmError::IllegalTransition {
                op: "snapshot",
                state: self.state,
            });
        }
        // Device threads are held off for the whole snapshot (they could otherwise write
        // guest memory after their state was saved).
        let devices = self.devices.quiesce().map_err(|e| match e {
            DeviceError::State(e) => VmError::DeviceState(e),
            e => e.into(),
        })?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let state_path = dir.join(super::STATE_FILE);
        // An old state must not describe the new memory.
        match std::fs::remove_file(&state_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&state_path)(e).into())
            }
            _ => {}
        }

        let mut vcpus = Vec::with_capacity(self.controls.len());
        for c in &self.controls {
            let saved: VcpuState = c.save(PAUSE_TIMEOUT).ok_or(VmError::VcpuTimeout {
                index: c.index(),
                what: "save its state",
                timeout: PAUSE_TIMEOUT,
            })??;
            vcpus.push(saved);
        }
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in 0..3 {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("read the irqchip"))?;
            irqchips.push(chip);
        }
        let pit = self.fd.get_pit2().map_err(kvm_err("read the PIT"))?;
        let mut clock = self.fd.get_clock().map_err(kvm_err("read the clock"))?;
        // The restored clock goes on from the saved value: no realtime or TSC adjustment.
        clock.flags = 0;
        let serial = (&self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state())
            .into();

        let memory_path = dir.join(super::MEMORY_FILE);
        self.write_memory(&memory_path)?;
        let (memory_crc, _) = super::file_crc(&memory_path)?;
        let header = SnapshotHeader {
            vmm_version: super::VMM_VERSION.into(),
            cpuid_hash: self.cpuid_hash,
            memory_size: self.ram_size,
            vcpus: self.controls.len() as u8,
            payload: self.payload.clone(),
            memory_crc,
            template_key: self.template_key.clone(),
        };
        let state = VmState {
            irqchips,
            pit,
            clock,
            serial,
            vcpus,
            virtio: devices.saved.clone(),
        };
        let bytes = super::encode(&header, &state)?;
        super::write_file_atomic(&state_path, &[&bytes])?;
        drop(devices);
        Ok(())
    }

    fn write_memory(&self, path: &Path) -> Result<(), SnapshotError> {
        use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryRegion};
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        use std::io::{Seek, SeekFrom, Write};
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        // Pages of zeros become holes: the file takes disk space only for what the guest wrote.
        const PAGE: usize = 4096;
        let mut page = [0u8; PAGE];
        let mut size = 0u64;
        for region in self.mem.iter() {
            for offset in (0..region.len()).step_by(PAGE) {
                let len = PAGE.min((region.len() - offset) as usize);
                self.mem
                    .read_slice(&mut page[..len], region.start_addr().unchecked_add(offset))
                    .map_err(|e| io(std::io::Error::other(e)))?;
                if page[..len].iter().all(|b| *b == 0) {
                    file.seek(SeekFrom::Current(len as i64)).map_err(io)?;
                } else {
                    file.write_all(&page[..len]).map_err(io)?;
                }
                size += len as u64;
            }
        }
        file.set_len(size).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn check_shape(header: &SnapshotHeader, config: &RestoreConfig) -> Result<(), SnapshotError> {
    if let Some(vcpus) = config.expect_vcpus {
        if vcpus != header.vcpus {
            return Err(SnapshotError::Shape {
                what: "vCPUs",
                found: header.vcpus.into(),
                expected: vcpus.into(),
            });
        }
    }
    if let Some(mib) = config.expect_memory_mib {
        if mib << 20 != header.memory_size {
            return Err(SnapshotError::Shape {
                what: "MiB of memory",
                found: header.memory_size >> 20,
                expected: mib,
            });
        }
    }
    Ok(())
}
