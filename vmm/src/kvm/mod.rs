//! The KVM side: the VM and its memory slots, guest memory, vCPU threads.

pub mod dirty_ring;
pub mod memory;
pub mod vcpu;
pub mod vm;
pub mod write_log;
