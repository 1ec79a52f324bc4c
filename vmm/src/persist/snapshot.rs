//! The VM's whole state as one typed value, [`VmSnapshot`], and its one conversion to and from
//! the stream's state blobs (id, version, postcard bytes each). Nothing else builds or parses
//! blobs.

use migration::StateBlob;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    decode, encode, BlobError, MemoryHash, SerialSnapshot, VcpuState, VmState, MEMORY_HASH_ID,
    SERIAL_ID, STATE_VERSION, VCPU_ID_PREFIX, VM_STATE_ID,
};

/// Everything of a paused VM but its RAM, in restore order: the VM-wide KVM state, each vCPU,
/// the serial port, and optionally a hash of guest memory for the destination to reproduce.
pub struct VmSnapshot {
    pub vm: VmState,
    /// Index = vCPU id.
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub memory_hash: Option<MemoryHash>,
}

/// The blob id of vCPU `id`.
fn vcpu_id(id: usize) -> String {
    format!("{VCPU_ID_PREFIX}{id}")
}

/// The vCPU a blob id names (`vcpu0`, `vcpu1`...; not `vcpu01`).
fn vcpu_of(id: &str) -> Option<usize> {
    id.strip_prefix(VCPU_ID_PREFIX)
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| vcpu_id(*n) == id)
}

fn blob<T: Serialize>(id: String, value: &T) -> Result<StateBlob, BlobError> {
    let data = encode(&id, value)?;
    Ok(StateBlob {
        id,
        version: STATE_VERSION,
        data,
    })
}

fn value<T: DeserializeOwned>(b: &StateBlob) -> Result<T, BlobError> {
    decode(&b.id, b.version, &b.data)
}

impl VmSnapshot {
    /// The blobs, in restore order.
    pub fn to_blobs(&self) -> Result<Vec<StateBlob>, BlobError> {
        let mut out = vec![blob(VM_STATE_ID.to_string(), &self.vm)?];
        for (i, v) in self.vcpus.iter().enumerate() {
            out.push(blob(vcpu_id(i), v)?);
        }
        out.push(blob(SERIAL_ID.to_string(), &self.serial)?);
        if let Some(h) = &self.memory_hash {
            out.push(blob(MEMORY_HASH_ID.to_string(), h)?);
        }
        Ok(out)
    }

    /// Whether `id` is the blob id of a part of a VM with `cpus` vCPUs.
    pub fn is_known_id(id: &str, cpus: u8) -> bool {
        matches!(id, VM_STATE_ID | SERIAL_ID | MEMORY_HASH_ID)
            || vcpu_of(id).is_some_and(|n| n < usize::from(cpus))
    }

    /// The snapshot of a VM with `cpus` vCPUs from its blobs (in any order). An id that is not
    /// one of ours, a vCPU beyond `cpus`, or a missing part is an error.
    pub fn from_blobs(blobs: &[StateBlob], cpus: u8) -> Result<VmSnapshot, BlobError> {
        let mut vm = None;
        let mut serial = None;
        let mut memory_hash = None;
        let mut vcpus: Vec<Option<VcpuState>> = (0..cpus).map(|_| None).collect();
        for b in blobs {
            match b.id.as_str() {
                VM_STATE_ID => vm = Some(value(b)?),
                SERIAL_ID => serial = Some(value(b)?),
                MEMORY_HASH_ID => memory_hash = Some(value(b)?),
                id => {
                    let slot = vcpu_of(id)
                        .and_then(|n| vcpus.get_mut(n))
                        .ok_or_else(|| BlobError::Unknown(id.to_string()))?;
                    *slot = Some(value(b)?);
                }
            }
        }
        let missing = |id: String| BlobError::Missing(id);
        Ok(VmSnapshot {
            vm: vm.ok_or_else(|| missing(VM_STATE_ID.to_string()))?,
            vcpus: vcpus
                .into_iter()
                .enumerate()
                .map(|(i, v)| v.ok_or_else(|| missing(vcpu_id(i))))
                .collect::<Result<_, _>>()?,
            serial: serial.ok_or_else(|| missing(SERIAL_ID.to_string()))?,
            memory_hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(cpus: u32) -> VmSnapshot {
        VmSnapshot {
            vm: VmState::default(),
            vcpus: (0..cpus)
                .map(|id| VcpuState {
                    id,
                    ..Default::default()
                })
                .collect(),
            serial: SerialSnapshot {
                in_buffer: b"x".to_vec(),
                ..Default::default()
            },
            memory_hash: Some(MemoryHash {
                hash: 7,
                nonzero_pages: 3,
            }),
        }
    }

    fn ids(blobs: &[StateBlob]) -> Vec<&str> {
        blobs.iter().map(|b| b.id.as_str()).collect()
    }

    #[test]
    fn blobs_round_trip_in_restore_order() {
        let blobs = snapshot(2).to_blobs().expect("encode");
        assert_eq!(ids(&blobs), ["vm", "vcpu0", "vcpu1", "serial", "memhash"]);
        let mut shuffled = blobs.clone();
        shuffled.reverse();
        let back = VmSnapshot::from_blobs(&shuffled, 2).expect("decode");
        assert_eq!(back.vcpus.iter().map(|v| v.id).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(back.serial.in_buffer, b"x");
        assert_eq!(back.memory_hash, snapshot(2).memory_hash);
        assert_eq!(ids(&back.to_blobs().expect("encode")), ids(&blobs));
    }

    #[test]
    fn known_ids_are_the_parts_of_a_vm_of_that_size() {
        for id in ["vm", "serial", "memhash", "vcpu0", "vcpu1"] {
            assert!(VmSnapshot::is_known_id(id, 2), "{id}");
        }
        for id in ["vcpu2", "vcpu01", "vcpu", "vcpu-1", "pit", "VM", ""] {
            assert!(!VmSnapshot::is_known_id(id, 2), "{id}");
        }
    }

    #[test]
    fn unknown_extra_and_missing_parts_are_refused() {
        let blobs = snapshot(2).to_blobs().expect("encode");
        let err = |b: &[StateBlob], cpus| {
            VmSnapshot::from_blobs(b, cpus)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(err(&blobs, 1), "unknown state \"vcpu1\" in the stream");
        assert_eq!(err(&blobs, 3), "state \"vcpu2\" is missing from the stream");
        let mut odd = blobs.clone();
        odd[1].id = "vcpu00".into();
        assert_eq!(err(&odd, 2), "unknown state \"vcpu00\" in the stream");
        let without_vm: Vec<_> = blobs[1..].to_vec();
        assert_eq!(
            err(&without_vm, 2),
            "state \"vm\" is missing from the stream"
        );
        let mut bad = blobs.clone();
        bad[0].data.truncate(1);
        assert_eq!(err(&bad, 2), "state \"vm\" is corrupt");
    }
}
