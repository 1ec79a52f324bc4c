//! The 16550 UART at 0x3f8 (vm-superio), its interrupt as an irqfd on GSI 4, and the
//! event-loop subscriber that feeds it from stdin.
//!
//! Input flow control: stdin is read only while the UART's receive FIFO has room. When the
//! guest has drained the FIFO, vm-superio calls `in_buffer_empty`, which signals an `EventFd`
//! that puts stdin back into the poll set.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, info, warn};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::PioDevice;
use crate::sync::lock;

pub const SERIAL_LEN: u16 = 8;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals when the guest has emptied the receive FIFO.
pub struct InputSpace(EventFd);

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        debug!("serial output byte lost");
    }
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// Writes to the process's stdout; each byte is flushed by the UART model.
pub struct StdoutOut;

impl Write for StdoutOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

/// Errors creating the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create the serial port's eventfd")]
    EventFd(#[source] io::Error),
    #[error("saved serial state holds {0} input bytes, more than the FIFO")]
    BadState(usize),
}

/// The UART.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, InputSpace, SerialOut>,
}

impl SerialDevice {
    /// A UART raising `irq` (to be registered as irqfd) and writing to `out`. Returns the device
    /// and the "FIFO has room again" `EventFd` for the input subscriber.
    pub fn new(irq: EventFd, out: SerialOut) -> Result<(SerialDevice, EventFd), SerialError> {
        let space = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let space_for_uart = space.try_clone().map_err(SerialError::EventFd)?;
        let uart = Serial::with_events(IrqTrigger(irq), InputSpace(space_for_uart), out);
        Ok((SerialDevice { uart }, space))
    }

    /// Queue input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                debug!("serial input: {e}");
                0
            }
        }
    }

    /// Register state, for saving with the VM.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Take over `state` (registers and unread input) from a migrated VM; output keeps going
    /// to this process's writer, interrupts to this VM's irqfd.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), SerialError> {
        let clone = |fd: &EventFd| fd.try_clone().map_err(SerialError::EventFd);
        let irq = clone(&self.uart.interrupt_evt().0)?;
        let space = clone(&self.uart.events().0)?;
        let placeholder = Serial::with_events(
            IrqTrigger(clone(&irq)?),
            InputSpace(clone(&space)?),
            Box::new(io::sink()) as SerialOut,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Serial::from_state(state, IrqTrigger(irq), InputSpace(space), out)
            .map_err(|_| SerialError::BadState(state.in_buffer.len()))?;
        Ok(())
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, b) {
                debug!("serial write: {e}");
            }
        }
    }
}

/// Event-loop subscriber moving host input (stdin) into the UART.
pub struct SerialInput<R: Read + AsRawFd> {
    uart: Arc<Mutex<SerialDevice>>,
    input: R,
    space: EventFd,
    pending: Vec<u8>,
    polling_input: bool,
    eof: bool,
}

impl<R: Read + AsRawFd> SerialInput<R> {
    pub fn new(uart: Arc<Mutex<SerialDevice>>, input: R, space: EventFd) -> Self {
        SerialInput {
            uart,
            input,
            space,
            pending: Vec::new(),
            polling_input: false,
            eof: false,
        }
    }

    fn input_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    /// Move pending bytes into the FIFO; poll the input only while nothing is pending.
    fn flush_pending(&mut self, ops: &mut EventOps) {
        if !self.pending.is_empty() {
            let n = lock(&self.uart).enqueue_input(&self.pending);
            self.pending.drain(..n);
        }
        let want = self.pending.is_empty() && !self.eof;
        if want != self.polling_input {
            let ev = Events::new_raw(self.input_fd(), EventSet::IN);
            let r = if want { ops.add(ev) } else { ops.remove(ev) };
            match r {
                Ok(()) => self.polling_input = want,
                Err(e) => {
                    info!("serial input disabled: stdin cannot be polled: {e:?}");
                    self.eof = true;
                    self.polling_input = false;
                }
            }
        }
    }

    fn read_input(&mut self) {
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf) {
            Ok(0) => {
                debug!("stdin closed; serial input stops");
                self.eof = true;
            }
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                debug!("stdin read failed ({e}); serial input stops");
                self.eof = true;
            }
        }
    }
}

impl<R: Read + AsRawFd> MutEventSubscriber for SerialInput<R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.space.as_raw_fd() {
            let _ = self.space.read();
        } else if events.fd() == self.input_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_input();
            } else {
                // HUP or ERR without data.
                self.eof = true;
            }
        }
        self.flush_pending(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.space, EventSet::IN)) {
            warn!("serial input disabled: cannot poll its eventfd: {e:?}");
            return;
        }
        self.flush_pending(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_goes_to_the_writer_and_raises_the_irq() {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let sink = Sink::default();
        let (mut dev, _space) =
            SerialDevice::new(irq.try_clone().expect("clone"), Box::new(sink.clone()))
                .expect("serial");
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        let _ = irq.read();
        let mut iir = [0u8];
        dev.read(2, &mut iir); // acknowledges the pending THR interrupt
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().expect("sink"), b"hi\n");
        assert!(irq.read().is_ok(), "THR empty interrupt raised");
    }

    #[test]
    fn input_fills_the_fifo_and_empty_fifo_signals_space() {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let (mut dev, space) = SerialDevice::new(irq, Box::new(io::sink())).expect("serial");
        assert_eq!(
            dev.enqueue_input(&[b'a'; 100]),
            64,
            "16550 FIFO holds 64 bytes"
        );
        assert_eq!(dev.enqueue_input(b"b"), 0);
        let mut d = [0u8];
        for _ in 0..64 {
            dev.read(0, &mut d);
            assert_eq!(d[0], b'a');
        }
        assert!(space.read().is_ok(), "drained FIFO signals room");
        assert_eq!(dev.state().in_buffer.len(), 0);
    }
}
