//! Emulated devices on the port-I/O bus: the 16550 serial port, the i8042 (reset only), the
//! power-off register and the ports Linux probes that we answer with "nothing here".

pub mod bus;
pub mod i8042;
pub mod legacy;
pub mod pm;
pub mod serial;

pub use bus::{BusError, PioBus, PioDevice};

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::acpi::{PM1A_EVT_LEN, PM1A_EVT_PORT};
use crate::arch::x86_64::layout::{COM1_IRQ, COM1_PORT, PM1A_CNT_PORT};
use crate::exit::ExitSignal;
use crate::kvm::vm::Vm;
use serial::{SerialDevice, SerialError, SerialOut, SERIAL_LEN};

/// Errors setting up the devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create the serial port's interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register the serial port's irqfd on GSI {COM1_IRQ}")]
    Irqfd(#[source] kvm_ioctls::Error),
    #[error("cannot create the serial port")]
    Serial(#[source] SerialError),
    #[error("cannot place a device on the port-I/O bus")]
    Bus(#[source] BusError),
}

/// The VM's devices.
pub struct Devices {
    /// The port-I/O bus the vCPUs dispatch to.
    pub bus: Arc<PioBus>,
    /// The UART, shared with the stdin subscriber and the state save and restore.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the UART's receive FIFO has room again; taken by the input subscriber.
    pub serial_input_space: Option<EventFd>,
}

impl Devices {
    /// Create the serial port (output to `out`, interrupt as irqfd on GSI 4), the i8042, the
    /// power-off port and the absent-device ranges, and put them on a new bus.
    pub fn new(vm: &Vm, exit: &Arc<ExitSignal>, out: SerialOut) -> Result<Devices, DeviceError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.fd()
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let (uart, space) = SerialDevice::new(irq, out).map_err(DeviceError::Serial)?;
        let serial = Arc::new(Mutex::new(uart));

        let mut bus = PioBus::new();
        bus.insert(COM1_PORT, SERIAL_LEN, serial.clone())
            .map_err(DeviceError::Bus)?;
        bus.insert(
            i8042::I8042_BASE,
            i8042::I8042_LEN,
            Arc::new(Mutex::new(i8042::I8042::new(exit.clone()))),
        )
        .map_err(DeviceError::Bus)?;
        bus.insert(
            PM1A_CNT_PORT,
            pm::PM_LEN,
            Arc::new(Mutex::new(pm::PowerOff::new(exit.clone()))),
        )
        .map_err(DeviceError::Bus)?;
        bus.insert(
            PM1A_EVT_PORT,
            u16::from(PM1A_EVT_LEN),
            Arc::new(Mutex::new(legacy::Zero)),
        )
        .map_err(DeviceError::Bus)?;
        for &(base, len) in legacy::ABSENT_RANGES {
            bus.insert(base, len, Arc::new(Mutex::new(legacy::Absent)))
                .map_err(DeviceError::Bus)?;
        }
        Ok(Devices {
            bus: Arc::new(bus),
            serial,
            serial_input_space: Some(space),
        })
    }
}
