//! x86_64 boot-time tables and vCPU set-up.
//!
//! Everything here that writes guest memory is a pure function over
//! `GuestMemoryMmap`, unit-tested without KVM; the few functions that touch a vCPU take the
//! narrow `&VcpuFd` and are exercised by the KVM tests.

pub mod acpi;
pub mod bootparams;
pub mod cpuid;
pub mod cpuid_compat;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod pvh;
pub mod regs;
