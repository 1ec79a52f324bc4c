//! What a VM is, beyond its RAM, as migration state blobs: the configuration the destination
//! checks before it accepts anything, the vCPUs, the VM-wide KVM state, the serial port, and
//! an optional hash of guest memory that the destination must reproduce before it resumes.
//!
//! Blobs are `postcard`-encoded plain structs; each has an id and a version inside the stream
//! (the stream itself carries one format version, see `migration/FORMAT.md`).

pub mod config;
pub mod hash;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

pub use config::{CompatError, CpuidEntry, MigrationConfig};
pub use hash::{memory_hash, MemoryHash};
pub use snapshot::VmSnapshot;
pub use vcpu::{restorable_msrs, VcpuState, VcpuStateError};
pub use vm::{VmState, VmStateError};

/// Blob ids and the version of their layout.
pub const VM_STATE_ID: &str = "vm";
pub const SERIAL_ID: &str = "serial";
pub const MEMORY_HASH_ID: &str = "memhash";
pub const VCPU_ID_PREFIX: &str = "vcpu";
/// Version 2: the CPUID left the vCPU state for the configuration.
pub const STATE_VERSION: u32 = 2;

/// Errors encoding or decoding state blobs.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot encode state {0:?}")]
    Encode(String, #[source] postcard::Error),
    #[error("state {0:?} is corrupt")]
    Decode(String, #[source] postcard::Error),
    #[error("state {id:?} has version {found}, this minivmm reads version {expected}")]
    Version {
        id: String,
        found: u32,
        expected: u32,
    },
    #[error("state {0:?} is missing from the stream")]
    Missing(String),
    #[error("unknown state {0:?} in the stream")]
    Unknown(String),
}

/// Encode one state struct.
pub fn encode<T: Serialize>(id: &str, value: &T) -> Result<Vec<u8>, BlobError> {
    postcard::to_allocvec(value).map_err(|e| BlobError::Encode(id.to_string(), e))
}

/// Decode one state blob after checking its version.
pub fn decode<T: for<'de> Deserialize<'de>>(
    id: &str,
    version: u32,
    data: &[u8],
) -> Result<T, BlobError> {
    if version != STATE_VERSION {
        return Err(BlobError::Version {
            id: id.to_string(),
            found: version,
            expected: STATE_VERSION,
        });
    }
    postcard::from_bytes(data).map_err(|e| BlobError::Decode(id.to_string(), e))
}

/// The 16550's registers and unread input, mirrored from vm-superio's `SerialState`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        let r = s.regs;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_snapshot_round_trips() {
        let st = SerialState {
            baud_divisor_low: 1,
            line_control: 3,
            scratch: 9,
            in_buffer: b"ab".to_vec(),
            ..Default::default()
        };
        let snap = SerialSnapshot::from(&st);
        let bytes = encode(SERIAL_ID, &snap).unwrap();
        let back: SerialSnapshot = decode(SERIAL_ID, STATE_VERSION, &bytes).unwrap();
        assert_eq!(SerialState::from(&back), st);
    }

    #[test]
    fn wrong_version_and_garbage_are_refused() {
        let bytes = encode(SERIAL_ID, &SerialSnapshot::default()).unwrap();
        // Version 1 (the CPUID inside the vCPU state) and a future one.
        for v in [1, 3] {
            assert!(matches!(
                decode::<SerialSnapshot>(SERIAL_ID, v, &bytes),
                Err(BlobError::Version { found, .. }) if found == v
            ));
        }
        assert!(decode::<VmState>(VM_STATE_ID, STATE_VERSION, &[1, 2, 3]).is_err());
    }
}
