//! How a VM ends: the reason, recorded once by whoever ends it (a device, a vCPU, the control
//! socket, a signal), and an `EventFd` that wakes the event loop.

use std::sync::Mutex;

use log::debug;

use crate::sync::lock;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A guest failure that ends the VM with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestFault {
    #[error("vCPU {cpu}: triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}")]
    TripleFault { cpu: u8, rip: u64 },
    #[error("vCPU {cpu}: KVM internal error: {what} (KVM_EXIT_INTERNAL_ERROR suberror {suberror}) at rip {rip:#x}{insn}, data {data:x?}")]
    InternalError {
        cpu: u8,
        what: &'static str,
        suberror: u32,
        rip: u64,
        /// The instruction bytes at rip, formatted, or empty when unreadable.
        insn: String,
        data: Vec<u64>,
    },
    #[error("vCPU {cpu}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x}")]
    FailEntry { cpu: u8, reason: u64 },
    #[error("vCPU {cpu}: the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")]
    Crash { cpu: u8 },
    #[error("vCPU {cpu}: unexpected KVM exit {exit}")]
    UnexpectedExit { cpu: u8, exit: String },
    #[error("vCPU {cpu}: KVM_RUN failed with errno {errno}")]
    Run { cpu: u8, errno: i32 },
    #[error("vCPU {cpu}: its dirty ring was full and harvesting it failed: {error}")]
    DirtyRing { cpu: u8, error: String },
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (PM1a SLP_EN or KVM_SYSTEM_EVENT_SHUTDOWN).
    PowerOff,
    /// The guest reset (i8042 0xfe or KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The control socket asked for a shutdown.
    ShutdownRequest,
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The VM now runs elsewhere (live migration acknowledged, or snapshot written).
    Migrated(String),
    /// The guest failed.
    Fault(GuestFault),
}

impl VmExit {
    /// Whether minivmm exits with status 0.
    pub fn is_clean(&self) -> bool {
        !matches!(self, VmExit::Fault(_))
    }
}

/// Errors creating the exit signal.
#[derive(Debug, thiserror::Error)]
pub enum ExitSignalError {
    #[error("cannot create the exit eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The first recorded exit reason plus an `EventFd` for the event loop.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<VmExit>>,
}

impl ExitSignal {
    pub fn new() -> Result<ExitSignal, ExitSignalError> {
        Ok(ExitSignal {
            evt: EventFd::new(EFD_NONBLOCK).map_err(ExitSignalError::EventFd)?,
            reason: Mutex::new(None),
        })
    }

    /// Record `exit` (the first reason wins) and wake the event loop.
    pub fn trigger(&self, exit: VmExit) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            debug!("VM exit: {exit:?}");
            *r = Some(exit);
        }
        drop(r);
        // A full counter already wakes the loop, so a failed write loses nothing.
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        lock(&self.reason).clone()
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let s = ExitSignal::new().expect("eventfd");
        assert_eq!(s.reason(), None);
        s.trigger(VmExit::PowerOff);
        s.trigger(VmExit::Fault(GuestFault::Crash { cpu: 0 }));
        assert_eq!(s.reason(), Some(VmExit::PowerOff));
        assert_eq!(s.event_fd().read().expect("woken"), 2);
    }

    #[test]
    fn faults_name_the_kvm_exit() {
        let f = GuestFault::TripleFault {
            cpu: 1,
            rip: 0x1000,
        };
        assert!(f.to_string().contains("triple fault"));
        let f = GuestFault::InternalError {
            cpu: 0,
            what: "emulation failure",
            suberror: 1,
            rip: 0xffff_ffff_8100_0000,
            insn: String::new(),
            data: vec![],
        };
        assert!(f.to_string().contains("emulation failure"));
        assert!(!VmExit::Fault(f).is_clean());
        assert!(VmExit::Reset.is_clean());
    }
}
