//! vCPU threads: one thread per vCPU running an explicit state machine.
//!
//! ```text
//!            Pause                       Resume
//!  Running ────────▶ (complete I/O) ─▶ Paused ───────▶ Running
//!     │  fault / Finish                  │ Finish
//!     ▼                                  ▼
//!   Exited ◀─────────────────────────────┘
//! ```
//!
//! The VMM thread talks to a vCPU through its [`VcpuHandle`]: it sends a [`VcpuEvent`], kicks
//! the thread out of `KVM_RUN` (sets `immediate_exit` in the vCPU's `kvm_run` through its own
//! mapping of a duplicated vCPU fd, then sends `SIGRTMIN`, whose handler does nothing) and waits
//! for the [`VcpuResponse`] with a timeout.
//!
//! Before reporting `Paused`, the vCPU enters `KVM_RUN` once more with `immediate_exit = 1`:
//! the KVM API documentation requires this after an I/O or MMIO exit so that the pending
//! access completes and the saved vCPU state is consistent.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_EXIT_DIRTY_RING_FULL, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{KvmRunWrapper, VcpuExit, VcpuFd};
use log::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::dirty_ring::DirtyRings;
use super::memory::GuestMemoryMmap;
use crate::devices::PioBus;
use crate::exit::{ExitSignal, GuestFault, VmExit};
use crate::persist::{VcpuState, VcpuStateError};
use crate::sync::lock;

/// How long the VMM waits for a vCPU to answer an event.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping a handle waits for the thread to end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the exits handled while completing pending I/O before a pause.
const MAX_COMPLETION_EXITS: usize = 64;
/// Ring-full exits in a row with nothing to harvest after which the ring counts as wedged.
const MAX_IDLE_RING_EXITS: u32 = 1000;

/// Commands to a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    Pause,
    Resume,
    Finish,
    /// Auto-converge: stay out of the guest for this long (leaving early for any other event).
    Throttle(Duration),
    /// Save the vCPU's KVM state (only while paused), with the MSRs of this list
    /// (`KVM_GET_MSR_INDEX_LIST`); the thread answers `Saved` (or `NotAllowed` while running).
    SaveState(Arc<Vec<u32>>),
}

/// Answers of a vCPU thread.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Result<Box<VcpuState>, VcpuStateError>),
    NotAllowed(&'static str),
}

impl VcpuResponse {
    /// The answer's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            VcpuResponse::Paused => "Paused",
            VcpuResponse::Resumed => "Resumed",
            VcpuResponse::Saved(_) => "Saved",
            VcpuResponse::NotAllowed(_) => "NotAllowed",
        }
    }
}

/// Errors of vCPU creation and control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("cannot duplicate the fd of vCPU {0}")]
    DupFd(u8, #[source] std::io::Error),
    #[error("cannot map kvm_run of vCPU {0}")]
    MapKvmRun(u8, #[source] kvm_ioctls::Error),
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("vCPU {0} has exited")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("vCPU {0} answered {1} to {2}")]
    UnexpectedResponse(u8, &'static str, &'static str),
    #[error("vCPU {0} refused to {1}")]
    NotAllowed(u8, &'static str),
    #[error("cannot save the state of vCPU {0}")]
    Save(u8, #[source] VcpuStateError),
}

/// What the exit handler decided.
enum Flow {
    Continue,
    Stop(VmExit),
}

enum VcpuRunState {
    Running,
    Paused,
    Exited,
}

/// A vCPU and what its thread needs. Configure it through [`Vcpu::fd`] before [`Vcpu::start`].
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    exit: Arc<ExitSignal>,
    /// For diagnostics only: the instruction bytes at a failing rip.
    memory: GuestMemoryMmap,
    /// The VM's dirty rings and this vCPU's index in them (`run --dirty-tracker ring`).
    ring: Option<(Arc<DirtyRings>, usize)>,
    /// Ring-full exits in a row that found nothing to harvest.
    idle_ring_exits: u32,
}

/// The no-op handler of the kick signal: its only job is to interrupt `KVM_RUN`.
extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    fence(Ordering::Acquire);
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), handle_kick).map_err(VcpuError::SignalHandler);
    });
    result
}

impl Vcpu {
    pub fn new(
        id: u8,
        fd: VcpuFd,
        bus: Arc<PioBus>,
        exit: Arc<ExitSignal>,
        memory: GuestMemoryMmap,
    ) -> Vcpu {
        Vcpu {
            id,
            fd,
            bus,
            exit,
            memory,
            ring: None,
            idle_ring_exits: 0,
        }
    }

    /// This vCPU pushes the pages it dirties into ring `index` of `rings`, and harvests that
    /// ring itself when it fills up.
    pub fn set_dirty_ring(&mut self, rings: Arc<DirtyRings>, index: usize) {
        self.ring = Some((rings, index));
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Guest memory was replaced before the start (local migration).
    pub fn set_memory(&mut self, memory: GuestMemoryMmap) {
        self.memory = memory;
    }

    /// The KVM vCPU, for configuration (or state restore) before the thread starts.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Spawn the vCPU thread, initially `Running`, or `Paused` without ever having entered
    /// the guest (`paused`; it answers nothing until the first event).
    pub fn start(self, kvm_run_size: usize, paused: bool) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let id = self.id;
        // SAFETY: the fd is the open vCPU fd owned by `self.fd`, alive for this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) };
        let dup: OwnedFd = borrowed
            .try_clone_to_owned()
            .map_err(|e| VcpuError::DupFd(id, e))?;
        let run = KvmRunWrapper::mmap_from_fd(&dup, kvm_run_size)
            .map_err(|e| VcpuError::MapKvmRun(id, e))?;
        let (event_tx, event_rx) = channel();
        let (response_tx, response_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                VcpuThread {
                    vcpu: self,
                    events: event_rx,
                    responses: response_tx,
                }
                .run(if paused {
                    VcpuRunState::Paused
                } else {
                    VcpuRunState::Running
                })
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            events: event_tx,
            responses: response_rx,
            kick: Kicker {
                run: Mutex::new(run),
                _fd: dup,
            },
            thread: Some(thread),
        })
    }

    /// Enter `KVM_RUN` once and handle what it returns.
    fn run_once(&mut self) -> Result<Flow, GuestFault> {
        let handled = handle_exit(self.id, &self.bus, self.fd.run());
        self.resolve(handled)
    }

    /// Turn a handled exit into the loop's decision, reading fault details from the vCPU.
    fn resolve(&mut self, handled: Handled) -> Result<Flow, GuestFault> {
        match handled {
            Handled::Done => Ok(Flow::Continue),
            Handled::Interrupted => {
                self.fd.set_kvm_immediate_exit(0);
                Ok(Flow::Continue)
            }
            Handled::Stop(exit) => Ok(Flow::Stop(exit)),
            Handled::DirtyRingFull => {
                // KVM refuses to enter the guest again until the ring has room.
                let harvested = match &self.ring {
                    Some((rings, index)) => rings.harvest_one(*index).map_err(|e| e.to_string()),
                    None => Err("no dirty ring is mapped".to_string()),
                };
                // A ring KVM keeps calling full with nothing to harvest is wedged (it overran:
                // KVM's reset stops at an entry it overwrote): a fault, not a silent hang.
                self.idle_ring_exits = match harvested {
                    Ok(0) => self.idle_ring_exits + 1,
                    _ => 0,
                };
                let harvested = match harvested {
                    Ok(_) if self.idle_ring_exits >= MAX_IDLE_RING_EXITS => Err(format!(
                        "KVM called it full {MAX_IDLE_RING_EXITS} times in a row with nothing \
                         to harvest: it overflowed"
                    )),
                    other => other.map(|_| ()),
                };
                harvested
                    .map(|()| Flow::Continue)
                    .map_err(|error| GuestFault::DirtyRing {
                        cpu: self.id,
                        error,
                    })
            }
            Handled::TripleFault => Err(GuestFault::TripleFault {
                cpu: self.id,
                rip: self.rip(),
            }),
            Handled::InternalError => Err(self.internal_error()),
            Handled::Fault(f) => Err(f),
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// The instruction bytes at the vCPU's current rip, as hex, for error messages.
    fn instruction_bytes(&self) -> String {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return String::new();
        };
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let Ok(t) = self.fd.translate_gva(linear) else {
            return String::new();
        };
        if t.valid == 0 {
            return String::new();
        }
        let mut bytes = [0u8; 15];
        let mut n = 0;
        for (i, b) in bytes.iter_mut().enumerate() {
            match self
                .memory
                .read_obj::<u8>(GuestAddress(t.physical_address + i as u64))
            {
                Ok(v) => {
                    *b = v;
                    n += 1;
                }
                Err(_) => break,
            }
        }
        if n == 0 {
            return String::new();
        }
        let hex: Vec<String> = bytes[..n].iter().map(|b| format!("{b:02x}")).collect();
        format!(" (instruction bytes {})", hex.join(" "))
    }

    fn internal_error(&mut self) -> GuestFault {
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the kvm_run
        // exit union is the one KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "failure while delivering an event",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        GuestFault::InternalError {
            cpu: self.id,
            what,
            suberror: internal.suberror,
            rip: self.rip(),
            insn: self.instruction_bytes(),
            data: internal.data[..n].to_vec(),
        }
    }

    /// Re-enter KVM_RUN with `immediate_exit = 1` so a pending I/O or MMIO access completes.
    /// Completing it may produce further exits (the next part of a string I/O): those are
    /// handled like in the running loop.
    fn complete_pending_io(&mut self) -> Result<Flow, GuestFault> {
        for _ in 0..MAX_COMPLETION_EXITS {
            self.fd.set_kvm_immediate_exit(1);
            let handled = handle_exit(self.id, &self.bus, self.fd.run());
            if matches!(handled, Handled::Interrupted) {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(Flow::Continue);
            }
            if let Flow::Stop(e) = self.resolve(handled)? {
                return Ok(Flow::Stop(e));
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        warn!("vCPU {}: pending I/O did not complete", self.id);
        Ok(Flow::Continue)
    }
}

/// The outcome of one `KVM_RUN`, decided without the vCPU fd (its exit data borrows it).
enum Handled {
    /// Handled here; keep running.
    Done,
    /// EINTR/EAGAIN: a kick or `immediate_exit`.
    Interrupted,
    Stop(VmExit),
    /// `KVM_EXIT_DIRTY_RING_FULL`: harvest this vCPU's ring before entering again.
    DirtyRingFull,
    TripleFault,
    InternalError,
    Fault(GuestFault),
}

/// Dispatch one `KVM_RUN` result: port I/O to the bus, everything else classified.
fn handle_exit(cpu: u8, bus: &PioBus, result: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Handled {
    match result {
        Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
        Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data),
        Ok(VcpuExit::MmioRead(addr, data)) => {
            debug!(
                "vCPU {cpu}: MMIO read {addr:#x} ({} bytes) ignored",
                data.len()
            );
            data.fill(0);
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            debug!("vCPU {cpu}: MMIO write {addr:#x} <- {data:02x?} ignored");
        }
        Ok(VcpuExit::Hlt) => debug!("vCPU {cpu}: HLT exit"),
        Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
        Ok(VcpuExit::Shutdown) => return Handled::TripleFault,
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => return Handled::DirtyRingFull,
        Ok(VcpuExit::InternalError) => return Handled::InternalError,
        Ok(VcpuExit::FailEntry(reason, _)) => {
            return Handled::Fault(GuestFault::FailEntry { cpu, reason })
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => return Handled::Stop(VmExit::PowerOff),
            KVM_SYSTEM_EVENT_RESET => return Handled::Stop(VmExit::Reset),
            KVM_SYSTEM_EVENT_CRASH => return Handled::Fault(GuestFault::Crash { cpu }),
            other => debug!("vCPU {cpu}: system event {other} ignored"),
        },
        Ok(other) => {
            return Handled::Fault(GuestFault::UnexpectedExit {
                cpu,
                exit: format!("{other:?}"),
            })
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return Handled::Interrupted
        }
        Err(e) => {
            return Handled::Fault(GuestFault::Run {
                cpu,
                errno: e.errno(),
            })
        }
    }
    Handled::Done
}

/// The vCPU thread's side.
struct VcpuThread {
    vcpu: Vcpu,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
}

impl VcpuThread {
    fn run(mut self, mut state: VcpuRunState) {
        loop {
            state = match state {
                VcpuRunState::Running => self.running(),
                VcpuRunState::Paused => self.paused(),
                VcpuRunState::Exited => break,
            };
        }
        debug!("vCPU {} thread ends", self.vcpu.id);
    }

    fn respond(&self, r: VcpuResponse) {
        // The VMM may have given up waiting; nothing to do then.
        let _ = self.responses.send(r);
    }

    fn end_with(&self, exit: VmExit) -> VcpuRunState {
        info!("vCPU {}: {exit:?}", self.vcpu.id);
        self.vcpu.exit.trigger(exit);
        VcpuRunState::Exited
    }

    /// The next event without blocking; a `Throttle` sleeps first, waking for any other event.
    fn next_event(&self) -> Result<VcpuEvent, TryRecvError> {
        let mut event = self.events.try_recv();
        while let Ok(VcpuEvent::Throttle(d)) = event {
            event = match self.events.recv_timeout(d) {
                Ok(e) => Ok(e),
                Err(RecvTimeoutError::Timeout) => Err(TryRecvError::Empty),
                Err(RecvTimeoutError::Disconnected) => Err(TryRecvError::Disconnected),
            };
        }
        event
    }

    fn running(&mut self) -> VcpuRunState {
        loop {
            match self.next_event() {
                Ok(VcpuEvent::Throttle(_)) => {}
                Ok(VcpuEvent::Pause) => return self.pause(),
                Ok(VcpuEvent::Resume) => self.respond(VcpuResponse::Resumed),
                Ok(VcpuEvent::SaveState(_)) => self.respond(VcpuResponse::NotAllowed(
                    "save its state while running (only while paused)",
                )),
                Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => {
                    return VcpuRunState::Exited
                }
                Err(TryRecvError::Empty) => {}
            }
            match self.vcpu.run_once() {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop(exit)) => return self.end_with(exit),
                Err(fault) => return self.end_with(VmExit::Fault(fault)),
            }
        }
    }

    fn pause(&mut self) -> VcpuRunState {
        match self.vcpu.complete_pending_io() {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop(exit)) => {
                self.respond(VcpuResponse::Paused);
                return self.end_with(exit);
            }
            Err(fault) => {
                self.respond(VcpuResponse::Paused);
                return self.end_with(VmExit::Fault(fault));
            }
        }
        // Tell a kvmclock guest it was stopped (no soft-lockup warnings); EINVAL when the
        // guest does not use kvmclock.
        if let Err(e) = self.vcpu.fd.kvmclock_ctrl() {
            debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.vcpu.id);
        }
        self.respond(VcpuResponse::Paused);
        VcpuRunState::Paused
    }

    fn paused(&mut self) -> VcpuRunState {
        match self.events.recv() {
            Ok(VcpuEvent::Resume) => {
                self.vcpu.fd.set_kvm_immediate_exit(0);
                self.respond(VcpuResponse::Resumed);
                VcpuRunState::Running
            }
            Ok(VcpuEvent::Pause) => {
                self.respond(VcpuResponse::Paused);
                VcpuRunState::Paused
            }
            Ok(VcpuEvent::Throttle(_)) => VcpuRunState::Paused,
            Ok(VcpuEvent::SaveState(msr_index_list)) => {
                let v = &self.vcpu;
                let saved = VcpuState::save(u32::from(v.id), &v.fd, &msr_index_list).map(Box::new);
                self.respond(VcpuResponse::Saved(saved));
                VcpuRunState::Paused
            }
            Ok(VcpuEvent::Finish) | Err(_) => VcpuRunState::Exited,
        }
    }
}

/// Sets `immediate_exit` through a separate mapping of the vCPU's `kvm_run`.
struct Kicker {
    run: Mutex<KvmRunWrapper>,
    /// Keeps the vCPU (and so the mapped page) alive even after the thread dropped its fd.
    _fd: OwnedFd,
}

/// The VMM's side of a vCPU thread.
pub struct VcpuHandle {
    id: u8,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    kick: Kicker,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether the thread has ended (after a guest exit or `Finish`).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Send `event` and kick the thread out of `KVM_RUN`. Responses to earlier events that
    /// nobody waited for (after a timeout) are dropped first.
    pub fn send_event(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        while self.responses.try_recv().is_ok() {}
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.id))?;
        self.kick();
        Ok(())
    }

    /// Auto-converge: keep the vCPU out of the guest for `d` (no response; any other event
    /// ends the sleep early).
    pub fn throttle(&self, d: Duration) -> Result<(), VcpuError> {
        self.events
            .send(VcpuEvent::Throttle(d))
            .map_err(|_| VcpuError::Gone(self.id))?;
        self.kick();
        Ok(())
    }

    fn kick(&self) {
        {
            let mut run = lock(&self.kick.run);
            run.as_mut_ref().immediate_exit = 1;
        }
        fence(Ordering::Release);
        if let Some(t) = &self.thread {
            // SAFETY: the pthread id comes from a JoinHandle that has not been joined, so it
            // names a live or exited-but-unjoined thread; pthread_kill does not touch memory.
            let r = unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
            if r != 0 && r != libc::ESRCH {
                warn!("vCPU {}: kick failed: errno {r}", self.id);
            }
        }
    }

    /// Wait for the thread's next response until `deadline`.
    pub fn response(&self, deadline: Instant) -> Result<VcpuResponse, VcpuError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.responses.recv_timeout(wait) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(self.id, RESPONSE_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Ask the thread to end and join it (bounded wait).
    pub fn finish(&mut self) {
        let _ = self.send_event(VcpuEvent::Finish);
        let Some(t) = self.thread.take() else { return };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            warn!(
                "vCPU {} thread did not end within {JOIN_TIMEOUT:?}",
                self.id
            );
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish();
    }
}
