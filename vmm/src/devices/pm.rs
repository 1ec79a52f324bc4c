//! The power-off register: a 16-bit PM1a control port. A write with SLP_EN (bit 13) set powers
//! the guest off and ends minivmm with exit status 0. The ACPI FADT points Linux at it; the test
//! guest writes 0x2000 to it directly.

use std::sync::Arc;

use log::{debug, info};

use super::PioDevice;
use crate::exit::{ExitSignal, VmExit};

pub const PM_LEN: u16 = 2;
pub const SLP_EN: u16 = 1 << 13;

/// PM1a control register.
pub struct PowerOff {
    exit: Arc<ExitSignal>,
    value: u16,
}

impl PowerOff {
    pub fn new(exit: Arc<ExitSignal>) -> PowerOff {
        PowerOff { exit, value: 0 }
    }
}

impl PioDevice for PowerOff {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(usize::from(offset) + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(usize::from(offset) + i) {
                *slot = *b;
            }
        }
        let v = u16::from_le_bytes(bytes);
        if v & SLP_EN != 0 {
            info!("guest power-off (PM1a control {v:#x})");
            self.exit.trigger(VmExit::PowerOff);
        } else {
            debug!("PM1a control <- {v:#x}");
            self.value = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slp_en_powers_off() {
        let exit = Arc::new(ExitSignal::new().expect("eventfd"));
        let mut d = PowerOff::new(exit.clone());
        d.write(0, &[0x00, 0x1c]); // SLP_TYP only
        assert_eq!(exit.reason(), None);
        d.write(0, &0x2000u16.to_le_bytes());
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
    }

    #[test]
    fn byte_write_to_high_half_counts() {
        let exit = Arc::new(ExitSignal::new().expect("eventfd"));
        let mut d = PowerOff::new(exit.clone());
        d.write(1, &[0x20]);
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
    }
}
